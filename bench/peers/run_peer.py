"""One peer measurement in a fresh process: cold start, warm latency and peak RSS of a third-party SD pipeline.

Standalone on purpose (stdlib + the peer's own libraries, nothing from Kiln): a peer's virtual environment runs it,
e.g. `bench/work/venvs/optimum/bin/python bench/peers/run_peer.py --pipeline optimum --model DIR --export-dir E ...`.

- `diffusers`: diffusers' `StableDiffusionPipeline`, PyTorch fp32, straight from the diffusers folder.
- `optimum`: Optimum's `ORTStableDiffusionPipeline` (ONNX Runtime, fp32, default session options, CPU provider).
- `openvino`: optimum-intel's `OVStableDiffusionPipeline` with OpenVINO's default CPU settings (its default
  inference precision: bf16 on AMX CPUs, fp32 elsewhere).
- `openvino-static`: the same, with its models reshaped to the request's image size before they are compiled
  (`pipe.reshape(batch_size=-1, height, width, num_images_per_prompt=1)`, then `compile()`), as FastSD CPU runs it:
  static spatial shapes, the batch left dynamic (a static batch would be 2, classifier-free guidance's, and could
  not run a guidance-0 turbo request).

An SDXL folder (`text_encoder_2` beside `text_encoder`) runs through the SDXL classes of the same libraries:
`StableDiffusionXLPipeline`, `OVStableDiffusionXLPipeline`, `ORTStableDiffusionXLPipeline`.

Optimum and OpenVINO need the diffusers folder exported first (ONNX / OpenVINO IR). That one-time step runs in its
own process (`--export-only`) and is cached in `--export-dir`, so it is not part of the cold start, which is measured
from this process's start (the kernel's start time) to the first image: interpreter start, importing the library,
loading the pipeline (and, for OpenVINO, compiling the models), then one full generation.

Every pipeline gets the same sampler (`--sampler euler`: `EulerDiscreteScheduler` from the model's scheduler config;
`turbo`: `EulerAncestralDiscreteScheduler` with trailing timesteps, as SDXL-Turbo and Kiln's `turbo` run), the same
starting latents (`--latents`, an .npy the caller makes; else drawn from `--seed` with numpy), the same prompt,
steps and guidance, and `--threads` CPU threads.
"""

from __future__ import annotations

import os
import time

_T_TOP = time.perf_counter()


def _process_age_s() -> float:
    """Seconds since the kernel started this process (10 ms resolution: /proc/uptime and clock ticks)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start_ticks = int(fields[19])  # field 22 of stat(5), counted from the one after the command name
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


_AGE_AT_TOP = _process_age_s()
_LOAD_AT_TOP = os.getloadavg()[0]

import argparse  # noqa: E402 (the clock above starts before any import that takes time)
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from importlib.metadata import PackageNotFoundError, version  # noqa: E402
from pathlib import Path  # noqa: E402

PIPELINES = ("diffusers", "optimum", "openvino", "openvino-static")
SAMPLERS = {"euler": ("EulerDiscreteScheduler", {}),
            "turbo": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"})}
"""`--sampler`: the diffusers scheduler class and the config overrides (bench/latency.py's DIFFUSERS_SCHEDULERS)."""
VERSIONED = ("torch", "diffusers", "transformers", "numpy", "optimum", "optimum-onnx", "onnxruntime", "onnx",
             "optimum-intel", "openvino", "nncf")
PROMPT = "a photograph of an astronaut riding a horse"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", required=True, choices=PIPELINES)
    p.add_argument("--model", required=True, type=Path, help="local diffusers Stable Diffusion folder")
    p.add_argument("--export-dir", type=Path,
                   help="where the ONNX / OpenVINO IR export lives (optimum, openvino): made by --export-only")
    p.add_argument("--export-only", action="store_true", help="export --model into --export-dir and exit")
    p.add_argument("--size", type=int, default=512, help="width and height in pixels")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="euler", choices=list(SAMPLERS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--latents", type=Path, help=".npy of starting latents (1, 4, size/f, size/f); default: from --seed")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--repeats", type=int, default=3, help="warm runs after the first (cold) image")
    p.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime / OpenVINO CPU threads")
    p.add_argument("--out", type=Path, help="result JSON (the image goes beside it as .png); default: stdout only")
    args = p.parse_args(argv)
    if args.size % 8 or not 64 <= args.size <= 2048:
        p.error(f"--size={args.size} must be a multiple of 8 between 64 and 2048")
    if args.steps < 1:
        p.error(f"--steps={args.steps} must be at least 1")
    if args.repeats < 0:
        p.error(f"--repeats={args.repeats} must be 0 or more")
    if args.pipeline != "diffusers" and args.export_dir is None:
        p.error(f"--pipeline {args.pipeline} needs --export-dir (made once with --export-only)")
    if args.export_only and args.pipeline == "diffusers":
        p.error("--export-only is for optimum and openvino; diffusers loads the diffusers folder itself")
    return args


def is_sdxl(model: Path) -> bool:
    """An SDXL diffusers folder: a second text encoder."""
    return (model / "text_encoder_2").is_dir()


def transformers4_view(model: Path, out: Path) -> Path:
    """`model` as transformers 4 can read it: transformers 5 saves CLIPTextModel weights without the `text_model.`
    key prefix that transformers 4 expects, and transformers 4 then silently starts from random text-encoder weights.
    Returns `model` itself when nothing needs renaming, else `out`: a copy with the prefix (other files symlinked)."""
    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = model / "text_encoder" / "model.safetensors"
    if int(transformers.__version__.split(".")[0]) >= 5 or not weights.exists():
        return model
    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())  # a safe_open handle is not iterable
        if all(k.startswith("text_model.") for k in names):
            return model
        tensors = {k if k.startswith("text_model.") else f"text_model.{k}": f.get_tensor(k) for k in names}
    out.mkdir(parents=True)
    for entry in model.iterdir():
        if entry.name != "text_encoder":
            (out / entry.name).symlink_to(entry.resolve())
    (out / "text_encoder").mkdir()
    for entry in (model / "text_encoder").iterdir():
        if entry.name != "model.safetensors":
            (out / "text_encoder" / entry.name).symlink_to(entry.resolve())
    save_file(tensors, str(out / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    return out


def export(pipeline: str, model: Path, out: Path) -> None:
    """The libraries' own export of a diffusers folder, as their `from_pretrained(export=True)` does it."""
    staging = out.with_name(out.name + ".source")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        source = transformers4_view(model, staging)
        if pipeline == "optimum":
            from optimum.exporters.onnx import main_export

            # the same call ORTDiffusionPipeline.from_pretrained(export=True) makes (optimum-onnx 0.1.0)
            main_export(model_name_or_path=str(source), output=out, task="text-to-image", device="cpu",
                        no_post_process=True, do_validation=False)
        else:
            from optimum import intel

            # default export settings: OpenVINO IR with the library's default weight format
            cls = intel.OVStableDiffusionXLPipeline if is_sdxl(model) else intel.OVStableDiffusionPipeline
            cls.from_pretrained(str(source), export=True, compile=False).save_pretrained(out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # an SD v1 export is GBs: do not leave half of one behind
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The pipeline with its Euler scheduler, ready to generate; imports its library here so the import is timed."""
    import torch
    import transformers
    from diffusers.utils import logging as diffusers_logging

    torch.set_num_threads(args.threads)
    diffusers_logging.disable_progress_bar()  # loading bars: noise in the run's log
    transformers.utils.logging.disable_progress_bar()
    import diffusers

    xl = is_sdxl(args.model)
    if args.pipeline == "diffusers":
        if xl:
            pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(args.model)
        else:
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None,
                                                                     requires_safety_checker=False)
    elif args.pipeline == "optimum":
        import onnxruntime as ort
        from optimum import onnxruntime as ortp

        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        cls = ortp.ORTStableDiffusionXLPipeline if xl else ortp.ORTStableDiffusionPipeline
        pipe = cls.from_pretrained(args.export_dir, export=False, session_options=so, provider="CPUExecutionProvider")
    else:
        from optimum import intel

        cls = intel.OVStableDiffusionXLPipeline if xl else intel.OVStableDiffusionPipeline
        static = args.pipeline == "openvino-static"
        pipe = cls.from_pretrained(args.export_dir, export=False, compile=not static,
                                   ov_config={"INFERENCE_NUM_THREADS": args.threads})
        if static:  # FastSD CPU's OpenVINO setup: static shapes for the one size it serves, then compile
            pipe.reshape(batch_size=-1, height=args.size, width=args.size, num_images_per_prompt=1)
            pipe.compile()
    # from the diffusers folder's own scheduler config, not the export's: the exporters write out every default of
    # the original scheduler class (PNDM's timestep_spacing="leading"), which Euler would then inherit
    name, overrides = SAMPLERS[args.sampler]
    cls = getattr(diffusers, name)
    pipe.scheduler = cls.from_config(cls.load_config(args.model / "scheduler"), **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents_for(args: argparse.Namespace, vae_scale_factor: int):  # type: ignore[no-untyped-def]
    import numpy as np

    shape = (1, 4, args.size // vae_scale_factor, args.size // vae_scale_factor)
    if args.latents:
        lat = np.load(args.latents)
        if lat.shape != shape or lat.dtype != np.float32:
            raise ValueError(f"--latents {args.latents} holds {lat.dtype}{list(lat.shape)}; "
                             f"{args.size}x{args.size} needs float32{list(shape)}")
        return lat
    return np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32)


def generate(pipe, args: argparse.Namespace, latents):  # type: ignore[no-untyped-def]
    """One image as uint8 HxWx3, rounded the way bench/latency.py rounds diffusers' output."""
    import numpy as np
    import torch

    with torch.inference_mode():
        out = pipe(args.prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, latents=torch.from_numpy(latents.copy()),
                   generator=torch.Generator().manual_seed(args.seed), output_type="np").images[0]
    return (np.asarray(out) * 255).round().astype(np.uint8)


def peak_rss_bytes() -> int:
    """VmHWM: the most resident memory this process has held."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def precision(pipe, pipeline: str) -> str:  # type: ignore[no-untyped-def]
    if not pipeline.startswith("openvino"):
        return "fp32"
    try:
        hint = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type, e.g. bf16
        return hint.to_string() if hasattr(hint, "to_string") else str(hint)
    except Exception as e:  # noqa: BLE001 (a report field: say why it is unknown, do not fail the run)
        return f"unknown ({type(e).__name__})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export_only:
        t0 = time.perf_counter()
        tmp = args.export_dir.with_name(args.export_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)  # left by an export that died
        export(args.pipeline, args.model, tmp)
        tmp.rename(args.export_dir)
        print(json.dumps({"export_dir": str(args.export_dir), "export_s": round(time.perf_counter() - t0, 2),
                          "peak_rss_bytes": peak_rss_bytes()}))
        return 0
    if args.export_dir is not None and not args.export_dir.is_dir():
        raise SystemExit(f"--export-dir {args.export_dir} does not exist: make it first with --export-only")

    t_import = time.perf_counter()
    import numpy as np
    from PIL import Image

    if args.pipeline == "diffusers":
        import diffusers  # noqa: F401
    elif args.pipeline == "optimum":
        import optimum.onnxruntime  # noqa: F401
    else:
        import optimum.intel  # noqa: F401
    t_load = time.perf_counter()
    pipe = load(args)
    t_first = time.perf_counter()
    latents = latents_for(args, pipe.vae_scale_factor)
    image = generate(pipe, args, latents)
    t_done = time.perf_counter()
    rss_cold = peak_rss_bytes()

    warm = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        again = generate(pipe, args, latents)
        warm.append(time.perf_counter() - t0)
        if not np.array_equal(again, image):
            print(f"warning: {args.pipeline} gave a different image on a warm run "
                  f"(max diff {np.abs(again.astype(int) - image.astype(int)).max()})", file=sys.stderr)

    phases = {"interpreter_s": _AGE_AT_TOP + (t_import - _T_TOP),  # process start -> first line of main()
              "import_s": t_load - t_import, "load_s": t_first - t_load, "first_image_s": t_done - t_first}
    result = {
        "pipeline": args.pipeline,
        "model": str(args.model),
        "export_dir": str(args.export_dir) if args.export_dir else None,
        "size": args.size, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
        "prompt": args.prompt, "scheduler": type(pipe.scheduler).__name__, "sampler": args.sampler,
        "threads": args.threads,
        "precision": precision(pipe, args.pipeline),
        "cold_start_s": round(sum(phases.values()), 3),
        "phases": {k: round(v, 3) for k, v in phases.items()},
        "warm_s": [round(t, 3) for t in warm],
        "median_warm_s": round(statistics.median(warm), 3) if warm else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_after_first_image_bytes": rss_cold,
        # 1-minute load average before and after: well above `threads` means other work shared the CPUs
        "loadavg_1m": [round(_LOAD_AT_TOP, 2), round(os.getloadavg()[0], 2)],
        "versions": versions(),
        "python": sys.executable,
        "image": None,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        png = args.out.with_suffix(".png")
        Image.fromarray(image).save(png)
        result["image"] = str(png)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
