"""Scenario `precision`: fp32 vs int8 / nf4 / int4 bundles of one model: UNet step time, end-to-end latency,
bundle size per component, peak RSS of a process serving the bundle, and PSNR/SSIM against fp32.

Each bundle is measured in its own child process (`python -m bench.precision_worker`), so its peak RSS is
that of the runtime serving it alone; the processes run in rounds (fp32, int8, ..., fp32, int8, ...) so
machine noise hits every precision alike, and medians over rounds are reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench import report, workspace

VARIANTS = {
    "fp32": ("fp32",),
    "int8": ("int8",),
    "int8-s8": ("int8", "--int8-activations", "s8"),
    "int8-w8": ("int8", "--int8-weight-bits", "8"),
    "nf4": ("nf4",),
    "int4": ("int4",),
    "fp16": ("fp16",),
}
"""Variant name -> `--precision` value and extra compile flags."""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sd-v1", choices=["tiny", "sd-v1"])
    p.add_argument("--variants", default="fp32,int8,int8-s8,nf4,int4",
                   help=f"comma-separated, from: {', '.join(VARIANTS)} (int8-s8: int8 with S8S8 activations; "
                        "int8-w8: int8 with full-range 8-bit weights)")
    p.add_argument("--sizes", default="512,256", help="comma-separated square sizes")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="child processes per variant, interleaved")
    p.add_argument("--calibration-prompts", type=int, default=4)
    p.add_argument("--out", default="", help="result file name (default precision-<arch>)")


def _bundle(source: Path, arch: str, variant: str, args: argparse.Namespace) -> Path:
    precision, *extra = VARIANTS[variant]
    name = f"bench-{arch}" if variant == "fp32" else f"bench-{arch}-{variant}"
    flags = ["--precision", precision, *extra]
    if variant != "fp32":
        # the gate runs at the default steps; random weights may fail it, and the table reports the figures
        flags += ["--default-steps", str(args.steps), "--calibration-prompts", str(args.calibration_prompts),
                  "--calibration-steps", str(args.steps), "--fidelity-prompts", "1", "--allow-low-fidelity"]
    return workspace.bundle(source, name, *flags)


def _sizes_on_disk(bundle: Path) -> dict[str, int]:
    from model_store import Manifest

    m = Manifest.read(bundle)
    out = {}
    for name, c in m.components.items():
        files = [bundle / c.file] + ([bundle / c.external_data] if c.external_data else [])
        out[name] = sum(f.stat().st_size for f in files)
    return out


def run(args: argparse.Namespace) -> Path:
    from model_store import Manifest
    from quantize.fidelity import psnr, ssim

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: {unknown} not in {list(VARIANTS)}")
    if variants[0] != "fp32":
        raise SystemExit("--variants must start with fp32 (the reference)")
    source = workspace.source_model(args.arch, None)
    bundles = {v: _bundle(source, args.arch, v, args) for v in variants}
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    scratch = workspace.WORK / "precision"
    scratch.mkdir(parents=True, exist_ok=True)
    for r in range(args.rounds):
        for v in variants:
            out = scratch / f"{v}-{r}.json"
            cmd = [sys.executable, "-m", "bench.precision_worker", str(bundles[v]), "--sizes", args.sizes,
                   "--steps", str(args.steps), "--out", str(out), "--images", str(scratch / v)]
            subprocess.run(cmd, check=True, cwd=workspace.ROOT)
            runs[v].append(json.loads(out.read_text()))

    rows, size_rows = [], []
    ref_images = {s: np.load(scratch / "fp32" / f"{s}.npy") for s in sizes}
    disk = {v: _sizes_on_disk(b) for v, b in bundles.items()}
    med = report.median
    base_rss = med([x["peak_rss_mb"] for x in runs["fp32"]])
    base_step = {s: med([x[str(s)]["unet_step_s"] for x in runs["fp32"]]) for s in sizes}
    base_e2e = {s: med([x[str(s)]["e2e_s"] for x in runs["fp32"]]) for s in sizes}
    for v in variants:
        m = Manifest.read(bundles[v])
        for s in sizes:
            step = med([x[str(s)]["unet_step_s"] for x in runs[v]])
            e2e = med([x[str(s)]["e2e_s"] for x in runs[v]])
            img = np.load(scratch / v / f"{s}.npy")
            p = psnr(ref_images[s], img)
            rows.append([v, f"{s}x{s}", f"{step:.3f}", f"{step / base_step[s]:.2f}x", f"{e2e:.2f}",
                         f"{e2e / base_e2e[s]:.2f}x", "-" if v == "fp32" else f"{p:.1f}",
                         "-" if v == "fp32" else f"{ssim(ref_images[s], img):.4f}"])
        rss = med([x["peak_rss_mb"] for x in runs[v]])
        total = sum(disk[v].values())
        size_rows.append([v, ", ".join(f"{k} {p}" for k, p in sorted(m.precision.items())),
                          *(f"{disk[v][c] / 2**20:.1f} ({disk[v][c] / disk['fp32'][c]:.2f}x)" for c in
                            ("unet", "text_encoder", "vae_decoder")),
                          f"{total / 2**20:.0f}", f"{rss:.0f} ({rss / base_rss:.2f}x)",
                          "-" if v == "fp32" else f"{m.fidelity.get('psnr', float('nan')):.1f}"])
    body = (
        f"Model: `{args.arch}` architecture with deterministic random weights; {args.steps} steps, "
        "dpmpp_2m_karras, guidance 7.5 (batch 2 per UNet call), 1 image, ONNX Runtime CPU provider, all cores. "
        f"Each variant ran in its own process, {args.rounds} rounds interleaved; medians. `UNet step`: one UNet "
        "call at batch 2 (a classifier-free-guided step). `e2e`: text encode + all steps + VAE decode. PSNR/SSIM: "
        "the final image against fp32's for the same prompt, seed and latents.\n\n"
        + report.table(["variant", "size", "UNet step s", "vs fp32", "e2e s", "vs fp32", "PSNR dB", "SSIM"], rows)
        + "\n\nBundle size (MiB, and vs fp32) and peak RSS of a process that loads the bundle with the runtime and "
        f"generates at every size (MiB). Gate PSNR: the compile's own fidelity figure at {args.steps} steps.\n\n"
        + report.table(["variant", "precision per component", "unet MiB", "text_encoder MiB", "vae_decoder MiB",
                        "bundle MiB", "peak RSS MiB", "gate PSNR dB"], size_rows)
        + "\n"
    )
    return report.write(args.out or f"precision-{args.arch}", f"Precision: fp32 vs int8 / nf4 / int4 ({args.arch})",
                        body)
