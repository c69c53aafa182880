"""Scenario `latency`: Kiln's runtime vs diffusers' PyTorch pipeline, same model, latents, sampler and steps.

Variants run interleaved (A, B, C, A, B, C, ...) so machine noise hits all alike; medians are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import numpy as np

from bench import report, workspace

DIFFUSERS_SCHEDULERS = {"euler": ("EulerDiscreteScheduler", {}),
                        "euler_a": ("EulerAncestralDiscreteScheduler", {}),
                        "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                                            {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
                        "dpmpp_2m": ("DPMSolverMultistepScheduler",
                                     {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
                        "ddim": ("DDIMScheduler", {}),
                        "lcm": ("LCMScheduler", {}),
                        "turbo": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"})}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="tiny", choices=["tiny", "sd-v1"])
    p.add_argument("--source", help="a local diffusers folder instead of a random-weight --arch model")
    p.add_argument("--size", type=int, default=0, help="width and height (0: the model's default)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sampler", default="euler", choices=sorted(DIFFUSERS_SCHEDULERS))
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-grpc", action="store_true",
                   help="skip the over-gRPC variant (its server holds a second copy of the model: needed for sd-v1 "
                        "in 24 GiB)")
    p.add_argument("--out", default="", help="result file name (default latency-<arch>)")


def run(args: argparse.Namespace) -> Path:
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    from model_store import BundleRef, Manifest
    from proto.kiln.v1 import kiln_pb2 as pb
    from runtime.model import load_bundle
    from runtime.pipeline import Pipeline
    from runtime.validate import validate

    source = workspace.source_model(args.arch, args.source)
    name = f"bench-{args.arch}" if not args.source else "bench-source"
    bundle_dir = workspace.bundle(source, name)
    manifest = Manifest.read(bundle_dir)
    model = load_bundle(BundleRef(bundle_dir, manifest))
    size = args.size or manifest.defaults["width"]
    prompt = "a photograph of an astronaut riding a horse"
    request = pb.GenerateRequest(model=name, prompt=prompt, width=size, height=size, steps=args.steps,
                                 sampler=args.sampler, guidance_scale=args.guidance, seed=1)
    params = validate(request, manifest.defaults, manifest.limits)

    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None,
                                                   requires_safety_checker=False)
    cls_name, kw = DIFFUSERS_SCHEDULERS[args.sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **kw)
    pipe.set_progress_bar_config(disable=True)
    f = manifest.model["vae_scale_factor"]
    latents = np.random.default_rng(1).standard_normal((1, 4, size // f, size // f), dtype=np.float32)
    kiln = Pipeline(model)

    def run_diffusers() -> np.ndarray:
        g = torch.Generator().manual_seed(1)
        with torch.inference_mode():
            out = pipe(prompt, height=size, width=size, num_inference_steps=args.steps,
                       guidance_scale=args.guidance, latents=torch.from_numpy(latents), generator=g,
                       output_type="np").images[0]
        return (out * 255).round().astype(np.uint8)

    def run_kiln() -> np.ndarray:
        images, _ = kiln.run(params, latents=latents)
        return images[0]

    variants = {"diffusers (PyTorch fp32)": run_diffusers, "kiln runtime (ONNX Runtime fp32, in-process)": run_kiln}
    with contextlib.ExitStack() as stack:
        if not args.no_grpc:
            from runtime.client import generate

            target = stack.enter_context(workspace.server(bundle_dir))

            def run_grpc() -> None:
                generate(target, request, workspace.WORK / "latency.png", progress=False)

            variants["kiln over gRPC (loopback, end to end)"] = run_grpc  # type: ignore[assignment]
        for fn in variants.values():  # warm-up: first-run allocations and session initialisation
            fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    ref_img, kiln_img = run_diffusers(), run_kiln()
    diff = np.abs(ref_img.astype(int) - kiln_img.astype(int))

    base = report.median(times["diffusers (PyTorch fp32)"])
    rows = [[k, f"{report.median(v):.3f}", f"{min(v):.3f}", f"{base / report.median(v):.2f}x"] for k, v in times.items()]
    body = (
        f"Model: `{args.arch if not args.source else args.source}` ({'random weights' if not args.source else 'local'}), "
        f"{size}x{size}, {args.steps} steps, sampler `{args.sampler}`, guidance {args.guidance} "
        f"(classifier-free guidance: batch 2 per UNet call), 1 image, fp32 everywhere, "
        f"torch threads {torch.get_num_threads()}, ONNX Runtime threads = cores ({os.cpu_count()}).\n"
        f"One warm-up run each, then {args.repeats} interleaved repeats; wall time of the whole request "
        "(text encode, denoise, VAE decode).\n\n"
        + report.table(["variant", "median s", "best s", "speed vs diffusers"], rows)
        + f"\n\nSame latents in both pipelines: max pixel difference {diff.max()}/255, mean {diff.mean():.3f}/255.\n"
    )
    return report.write(args.out or f"latency-{args.arch}", f"Latency: Kiln vs diffusers ({args.arch})", body)
