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
    p.add_argument("--arch", default="tiny", choices=["tiny", "sd-v1", "tiny-sdxl", "sdxl"])
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
    p.add_argument("--variants", default="",
                   help="cold-start mode: comma-separated, from " + ", ".join(COLD_VARIANTS) + "; each runs in a fresh "
                        "process (cold start, warm runs, peak RSS); peers in their own virtual environments")
    p.add_argument("--restart", action="store_true",
                   help="cold-start mode: Kiln's cold start is a restart's, as `kiln serve --cache-dir` restarts: each "
                        "Kiln variant first opens its bundle once in a fresh cache folder (a first start, which "
                        "verifies the files and writes ONNX Runtime's optimized graphs / OpenVINO's compiled models), "
                        "then the measured process opens it from those caches")
    p.add_argument("--calibration-prompts", type=int, default=2, help="int8 bundles of the cold-start mode")
    p.add_argument("--calibration-size", type=int, help="int8 bundles of the cold-start mode (default: the model's)")
    p.add_argument("--fidelity-size", type=int, help="int8 bundles of the cold-start mode (default: the model's)")


COLD_SAMPLERS = ("euler", "turbo")
"""The samplers the cold-start mode gives every pipeline (bench/peers/run_peer.py SAMPLERS)."""
COLD_VARIANTS = {
    # name: (bundle suffix, compile flags, engine, OpenVINO precision)
    "kiln-fp32": ("", (), "onnxruntime", ""),
    "kiln-int8": ("-int8", ("--precision", "int8"), "onnxruntime", ""),
    # on SD v1 these do not compile in 24 GiB: ONNX Runtime's static quantizer is OOM-killed on the token-merged UNet
    # (calibrating at 256x256 too, so not by activation size); they run on the tiny model
    "kiln-int8-tome0.5": ("-int8-tome0.5", ("--precision", "int8", "--tome", "0.5"), "onnxruntime", ""),
    "kiln-fp32-tome0.5": ("-tome0.5", ("--tome", "0.5"), "onnxruntime", ""),
    "kiln-openvino": ("", (), "openvino", ""),
    "kiln-openvino-tome0.5": ("-tome0.5", ("--tome", "0.5"), "openvino", ""),
    "kiln-openvino-int8": ("-int8", ("--precision", "int8"), "openvino", ""),
    "kiln-openvino-int8-tome0.5": ("-int8-tome0.5", ("--precision", "int8", "--tome", "0.5"), "openvino", ""),
    "diffusers": None, "optimum": None, "openvino": None, "openvino-static": None,
}
"""Cold-start mode variants: Kiln bundles (compiled once, cached) run by bench/kiln_worker.py; the rest are peers
(bench/peers). A Kiln variant takes modifiers after `+` (MODIFIERS), e.g. `kiln-openvino-int8+ge0.5+tiny`."""
MODIFIERS = {
    "geF": "classifier-free guidance on the first F of the steps only (GenerateRequest.guidance_end = F)",
    "tiny": "the tiny (TAESD-design) decoder draws the image (GenerateRequest.decoder = tiny): its bundle is compiled "
            "with `--tiny-decoder` of a random-weight AutoencoderTiny (bench/workspace.py tiny_decoder)",
    "static": "OpenVINO variants: static-shape compiled models, one per input shape (`kiln serve "
              "--openvino-static-shapes`), compiled when a call first brings the shape (with `--restart`, the first "
              "start runs the request once, so the restart reads them from its cache)",
}


def _base(variant: str) -> str:
    """The variant without its `+` modifiers."""
    return variant.partition("+")[0]


def _modifiers(variant: str) -> dict[str, str]:
    """A Kiln variant's modifiers, keyed as MODIFIERS: {"geF": "0.5", "tiny": ""}; SystemExit naming one that is
    not there."""
    mods: dict[str, str] = {}
    for m in variant.split("+")[1:]:
        if m in ("tiny", "static"):
            mods[m] = ""
        elif m.startswith("ge") and _is_fraction(m[2:]):
            mods["geF"] = m[2:]
        else:
            raise SystemExit(f"--variants {variant}: unknown modifier +{m}; modifiers: "
                             + "; ".join(f"+{k}: {v}" for k, v in MODIFIERS.items()))
    return mods


def _is_fraction(text: str) -> bool:
    try:
        return 0.0 < float(text) <= 1.0
    except ValueError:
        return False


def run(args: argparse.Namespace) -> Path:
    if args.variants:
        return run_cold(args)
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


def _kiln_bundle(source: Path, arch: str, variant: str, args: argparse.Namespace) -> Path:
    suffix, flags, _, _ = COLD_VARIANTS[_base(variant)]  # type: ignore[misc]
    flags = list(flags)
    if "tiny" in _modifiers(variant):
        suffix += "-tiny"
        flags += ["--tiny-decoder", str(workspace.tiny_decoder(source))]
    if "--precision" in flags:  # as bench/precision.py compiles them, so its cached bundles serve here too
        flags += ["--default-steps", str(args.steps), "--calibration-prompts", str(args.calibration_prompts),
                  "--calibration-steps", str(args.steps), "--fidelity-prompts", "1", "--allow-low-fidelity"]
        for flag, value in (("--calibration-size", args.calibration_size), ("--fidelity-size", args.fidelity_size)):
            if value:
                flags += [flag, str(value)]
    return workspace.bundle(source, f"bench-{arch}{suffix}", *flags)


def run_cold(args: argparse.Namespace) -> Path:
    """Every variant in a fresh process, one at a time: cold start (process start to first image), warm latency
    (median of --repeats) and peak RSS; images compared with diffusers' (same latents, same Euler sampler)."""
    import json
    import shutil
    import subprocess
    import sys

    from bench import peers

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if _base(v) not in COLD_VARIANTS or (v != _base(v) and not COLD_VARIANTS[_base(v)])]
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; choose from {', '.join(COLD_VARIANTS)}")
    if args.sampler not in COLD_SAMPLERS:
        raise SystemExit(f"cold-start mode runs every pipeline with one of the samplers {', '.join(COLD_SAMPLERS)}; "
                         f"got --sampler {args.sampler}")
    source = workspace.source_model(args.arch, args.source)
    size = args.size or 512
    latents = peers.latents(source, size, 1)
    for v in variants:  # unknown modifiers stop the run before anything is compiled
        if "static" in _modifiers(v) and COLD_VARIANTS[_base(v)][2] != "openvino":  # type: ignore[index]
            raise SystemExit(f"--variants {v}: +static is for OpenVINO variants (kiln-openvino...)")
    bundles = {v: _kiln_bundle(source, args.arch, v, args) for v in variants if COLD_VARIANTS[_base(v)]}
    results: dict[str, dict] = {}
    path = Path()
    for v in variants:
        print(f"[latency] {v} ...", file=sys.stderr, flush=True)
        if COLD_VARIANTS[_base(v)] is None:
            results[v] = peers.measure(v, source, size=size, steps=args.steps, guidance=args.guidance, seed=1,
                                       repeats=args.repeats, sampler=args.sampler)
            path = _cold_report(args, size, results, bundles)
            continue
        _, _, engine, ov_precision = COLD_VARIANTS[_base(v)]  # type: ignore[misc]
        out = workspace.WORK / "latency" / f"{v}-{args.arch}-{size}px-{args.steps}steps-{args.sampler}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bench.kiln_worker", "--bundle", str(bundles[v]), "--engine", engine,
               "--size", str(size), "--steps", str(args.steps), "--guidance", str(args.guidance),
               "--sampler", args.sampler, "--latents", str(latents), "--repeats", str(args.repeats), "--out", str(out)]
        if ov_precision:
            cmd += ["--openvino-precision", ov_precision]
        mods = _modifiers(v)
        if "geF" in mods:
            cmd += ["--guidance-end", mods["geF"]]
        if "tiny" in mods:
            cmd += ["--decoder", "tiny"]
        if "static" in mods:
            cmd += ["--openvino-static-shapes"]
        prime = None
        if args.restart:  # the first start, in a fresh cache folder; its load time is reported beside the restart's
            cache = workspace.WORK / "latency" / f"cache-{v}"
            shutil.rmtree(cache, ignore_errors=True)
            cmd += ["--cache-dir", str(cache)]
            subprocess.run([*cmd, "--prime"], check=True, cwd=workspace.ROOT, stdout=subprocess.DEVNULL)
            prime = json.loads(out.read_text())
        subprocess.run(cmd, check=True, cwd=workspace.ROOT, stdout=subprocess.DEVNULL)
        results[v] = json.loads(out.read_text())
        if prime is not None:
            results[v]["first_start_load_s"] = prime["load_s"]
        path = _cold_report(args, size, results, bundles)  # after every variant: a cut-short run keeps its rows
    return path


SAMPLER_NOTES = {"euler": "Euler: diffusers' EulerDiscreteScheduler",
                 "turbo": "SDXL-Turbo's: EulerAncestralDiscreteScheduler, trailing timesteps"}


STAGES = ("tokenize", "text_encode", "prepare", "denoise", "decode", "png")
"""Kiln's pipeline stages in the cold-start report's breakdown, in order."""


def _cold_report(args: argparse.Namespace, size: int, results: dict[str, dict], bundles: dict[str, Path]) -> Path:
    from bench import peers

    base = results.get("diffusers")
    rows = []
    for v, r in results.items():
        warm, cold = r["median_warm_s"], r["cold_start_s"]
        diff = "(reference)" if v == "diffusers" else (
            "max {}/255, mean {:.2f}/255".format(*peers.image_diff(base["image"], r["image"])) if base else "")
        rows.append([
            peers.label(v, (workspace.source_model(args.arch, args.source) / "text_encoder_2").is_dir())
            if v in peers.LABELS else f"Kiln `{v}`", f"{warm:.2f}", f"{base['median_warm_s'] / warm:.2f}x" if base else "",
            f"{cold:.1f}", f"{cold / base['cold_start_s']:.2f}x" if base else "",
            f"{r['peak_rss_bytes'] / 2**30:.2f}", diff,
        ])
    phases = "; ".join(f"{v}: " + ", ".join(f"{k.removesuffix('_s')} {x:.1f}" for k, x in r["phases"].items())
                       + (f" (first start's load {r['first_start_load_s']:.1f})" if "first_start_load_s" in r else "")
                       for v, r in results.items())
    restart = ("Kiln's cold start is a restart's (`--restart`): each Kiln variant first opened its bundle once in a "
               "fresh cache folder (as `kiln serve --cache-dir` does at its first start: sha256 of every file "
               "remembered, ONNX Runtime's optimized graphs and OpenVINO's compiled models written), then the measured "
               "process opened it from those caches; the first start's load time is in the phases below. "
               if args.restart else "")
    model = (f"`{args.source}` (a local diffusers folder)" if args.source
             else f"`{args.arch}` architecture (random weights)")
    mods = sorted({m for v in results if v not in peers.LABELS for m in _modifiers(v)})
    modifiers = ("Variant modifiers: " + "; ".join(f"`+{m}`: {MODIFIERS[m]}" for m in mods) + ".\n\n") if mods else ""
    stage_rows = [[f"Kiln `{v}`", f"{r['median_warm_s']:.2f}"]
                  + [f"{r['stages'].get(k, 0.0):.3f}" for k in STAGES]
                  + [f"{r['stages'].get('denoise', 0.0) / args.steps:.2f}",
                     f"{r['median_warm_s'] - sum(r['stages'].get(k, 0.0) for k in STAGES if k != 'png'):.3f}"]
                  for v, r in results.items() if "stages" in r]
    stage_rows += [[f"Kiln `{v}`, first image", f"{r['phases']['first_image_s']:.2f}"]
                   + [f"{r['first_image_stages'].get(k, 0.0):.3f}" for k in STAGES if k != "png"] + ["-"]
                   + [f"{r['first_image_stages'].get('denoise', 0.0) / args.steps:.2f}",
                      f"{r['phases']['first_image_s'] - sum(r['first_image_stages'].values()):.3f}"]
                   for v, r in results.items() if "first_image_stages" in r]
    stages = ("\n\nWhere Kiln's warm time goes (medians over the warm runs, s; `runtime/pipeline.py`'s stage timers): "
              "tokenize; text encode (one text-encoder call); prepare (starting latents, sampler); denoise (every "
              "UNet call and sampler update; per step: that over the steps); decode (the VAE decoder); png (encoding "
              "the image with its parameters chunk, outside the warm time, as the peers make no PNG); rest: warm "
              "time minus the timed stages. The `first image` rows split the cold start's first generation the "
              "same way (each session's first call included; no PNG made).\n\n"
              + report.table(["variant", "warm s", *STAGES, "denoise per step", "rest"], stage_rows)
              if stage_rows else "")
    body = (
        f"Model: {model}, {size}x{size}, {args.steps} steps, sampler "
        f"`{args.sampler}` ({SAMPLER_NOTES[args.sampler]}), guidance {args.guidance:g} "
        f"({'batch 2 per UNet call' if args.guidance > 1 else 'no classifier-free guidance: batch 1 per UNet call'}), "
        "1 image, the same starting latents everywhere. Each variant runs "
        f"in a fresh process, one at a time: cold start = process start to the first image (interpreter, imports, "
        f"loading, one generation; exports made beforehand and cached), then {args.repeats} warm runs (median). "
        "Peak RSS is the process's VmHWM. Kiln runs in-process (bench/kiln_worker.py, no gRPC); peers run in their "
        f"own virtual environments (bench/peers). Threads: 2 (the machine's cores). {restart}\n\n" + modifiers
        + report.table(["variant", "warm s (median)", "speed vs diffusers", "cold start s", "cold vs diffusers",
                        "peak RSS GiB", "image vs diffusers"], rows)
        + stages
        + f"\n\nCold-start phases (s): {phases}.\n"
        + "\nBundles: " + ", ".join(f"`{v}` = {bundles[v].parent.name}/{bundles[v].name}" for v in bundles) + "\n"
    )
    return report.write(args.out or f"latency-cold-{args.arch}", f"Latency and cold start: Kiln vs peers ({args.arch})",
                        body)
