"""Scenario `tome`: token merging (ToMe) baked into the exported UNet: step time and fidelity vs no merging.

Each ratio's UNet is exported with compiler/passes/tome.py and fused as `kiln compile` does (ONNX Runtime's
fusions, then tome.fuse_attention), in a child process, and cached under bench/work/tome/. One UNet call with
batch 2 (classifier-free guidance) is timed per size with the runtime's ONNX Runtime session on the CPU; one
variant is loaded at a time, variants interleaved (A, B, C, A, B, C, ...), medians reported. Fidelity: PSNR of
the UNet output against ratio 0 on the same inputs.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import report, workspace


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sd-v1", choices=["tiny", "sd-v1"])
    p.add_argument("--source", help="a local diffusers folder instead of a random-weight --arch model")
    p.add_argument("--ratios", default="0.3,0.5", help="comma-separated merge ratios, each compared with 0")
    p.add_argument("--sizes", default="512,768", help="comma-separated square image sizes (multiples of 8)")
    p.add_argument("--timestep", type=float, default=500.0, help="UNet timestep of the timed call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="tome", help="result file name")


def cache_key(source: Path) -> str:
    """Source content, Kiln's export code (with this pass) and the exporter's versions."""
    from compiler import reuse
    from compiler.source import load_source

    h = hashlib.sha256(load_source(source).content_hash().encode())
    h.update(repr(sorted(reuse.exporter_identity(17, True).items())).encode())
    h.update((Path(reuse.__file__).parent / "passes" / "tome.py").read_bytes())
    return h.hexdigest()[:12]


def unet_path(source: Path, ratio: float, key: str) -> Path:
    """The fused fp32 UNet with ToMe at `ratio` (0: none), exported once per cache key."""
    out = workspace.WORK / "tome" / key / f"unet-r{ratio:g}.onnx"
    if not out.exists():
        for stale in (p for p in out.parent.parent.glob("*") if p != out.parent):  # GBs each, never read again
            shutil.rmtree(stale)
        out.parent.mkdir(parents=True, exist_ok=True)
        # a child process, so the benchmark does not keep the exporter's memory
        subprocess.run([sys.executable, "-m", "bench.tome", "export", str(source), str(ratio), str(out)],
                       cwd=workspace.ROOT, check=True)
    return out


def export(source: Path, ratio: float, out: Path) -> None:
    import onnx

    from compiler.export import COMPONENTS, export_component
    from compiler.passes import fusions, tome
    from compiler.source import load_source
    from model_store.onnx_files import save_model

    src = load_source(source)
    raw = out.with_name(f"raw-{out.name}")
    with tome.patched(src.module("unet"), ratio):
        export_component(COMPONENTS["unet"], src, raw, opset=17)
    src.release_all()
    model, fused = tome.fuse_attention(fusions.apply(onnx.load(str(raw)), "unet"))
    print(f"ratio {ratio:g}: {fused} merged self-attentions fused; ops {fusions.op_counts(model)}", flush=True)
    # written aside, then moved beside the others graph last: an interrupted export leaves nothing that looks done
    tmp = out.parent / f".tmp-{out.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for path in reversed(save_model(model, tmp / out.name, external=True)):
        path.rename(out.parent / path.name)
    tmp.rmdir()
    for path in (raw, raw.with_name(raw.name + ".data")):
        path.unlink(missing_ok=True)


def psnr(reference: np.ndarray, x: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, the peak being the reference's range (max - min)."""
    mse = float(np.mean((reference.astype(np.float64) - x.astype(np.float64)) ** 2))
    peak = float(reference.max() - reference.min())
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


def run(args: argparse.Namespace) -> Path:
    from compiler.source import load_source
    from runtime.sessions import OrtSession

    ratios = [0.0, *(float(r) for r in args.ratios.split(",") if float(r) != 0)]
    sizes = [int(s) for s in args.sizes.split(",")]
    source = workspace.source_model(args.arch, args.source)
    src = load_source(source)
    latent_ch, f = int(src.vae_config["latent_channels"]), src.vae_scale_factor
    hidden = int(src.unet_config["cross_attention_dim"])
    key = cache_key(source)
    paths = {r: unet_path(source, r, key) for r in ratios}

    rng = np.random.default_rng(1)
    feeds = {s: {"sample": rng.standard_normal((2, latent_ch, s // f, s // f), dtype=np.float32),
                 "timestep": np.full(2, args.timestep, np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, hidden), dtype=np.float32)} for s in sizes}
    times: dict[tuple[float, int], list[float]] = {(r, s): [] for r in ratios for s in sizes}
    outputs: dict[tuple[float, int], np.ndarray] = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up (arena growth, first-run allocations)
        for r in ratios:
            session = OrtSession("unet", paths[r])
            for s in sizes:
                t0 = time.perf_counter()
                out = session.run(feeds[s])["out_sample"]
                if round_:
                    times[(r, s)].append(time.perf_counter() - t0)
                outputs[(r, s)] = out
                print(f"round {round_} ratio {r:g} size {s}: {time.perf_counter() - t0:.2f} s", flush=True)
            del session
            gc.collect()

    rows = []
    for s in sizes:
        base = report.median(times[(0.0, s)])
        tokens = (s // f) ** 2
        for r in ratios:
            t = times[(r, s)]
            rows.append([f"{s}x{s}", f"{r:g}", f"{tokens} -> {tokens - int(tokens * r)}", f"{report.median(t):.2f}",
                         f"{min(t):.2f}", f"{base / report.median(t):.2f}x",
                         "(reference)" if r == 0 else f"{psnr(outputs[(0.0, s)], outputs[(r, s)]):.1f}"])
    body = (
        f"Model: `{args.arch if not args.source else args.source}` "
        f"({'random weights' if not args.source else 'local'}), fp32 UNet exported with opset 17 and fused as "
        "`kiln compile` does (ONNX Runtime fusions + tome.fuse_attention); ToMe in the latent-resolution "
        "self-attention only (tomesd's max_downsample=1, sx=sy=2, deterministic destinations).\n"
        f"One UNet call, batch 2 (classifier-free guidance), timestep {args.timestep:g}, seeded random latents and "
        f"text embeddings; ONNX Runtime CPU, threads = cores ({os.cpu_count()}), the runtime's session options. "
        f"One warm-up round, then {args.repeats} interleaved rounds, one variant loaded at a time.\n"
        "PSNR: UNet output vs ratio 0 on the same inputs, peak = the reference output's range.\n\n"
        + report.table(["size", "ratio", "self-attention tokens", "median s", "best s", "speed vs ratio 0",
                        "PSNR dB"], rows)
        + "\n"
    )
    return report.write(args.out, f"Token merging (ToMe) in the UNet ({args.arch})", body)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "export":
        export(Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit("usage: python -m bench.tome export SOURCE RATIO OUT (the scenario runs as `python -m bench tome`)")
