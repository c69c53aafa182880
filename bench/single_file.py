"""Scenario `single-file`: compile time and peak RSS of a single-file checkpoint vs the same model as a folder.

The model (`--arch`, random weights) is written once as a diffusers folder and once as an original-layout
`.safetensors` checkpoint per `--dtypes` entry (shared checkpoints are mostly fp16). Each source is compiled to
fp32 afresh in a child `kiln compile` process (scratch store of its own: nothing reused), sampled as in
`compile-memory`; the per-stage figures come from the manifest's `compile_stats`.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from bench import report, workspace
from bench.compile_memory import _measure


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sd-v1", choices=["tiny", "sd-v1"])
    p.add_argument("--dtypes", default="fp16,fp32", help="checkpoint dtypes to write and compile (fp16, bf16, fp32)")
    p.add_argument("--rss-cap-gb", type=float, default=20.0)
    p.add_argument("--out", default="", help="result file name (default single-file-<arch>)")


def write_checkpoint(folder: Path, out: Path, dtype: str) -> Path:
    import torch
    from safetensors.torch import save_file

    from tests.compiler.ldm_layout import to_ldm  # the test suite's diffusers -> original-layout writer

    if not out.exists():
        tmp = out.with_name(out.name + ".partial")
        save_file(to_ldm(folder, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]),
                  str(tmp))
        tmp.rename(out)
    return out


def run(args: argparse.Namespace) -> Path:
    folder = workspace.source_model(args.arch, None)
    sources: list[tuple[str, Path]] = [("diffusers folder", folder)]
    for dtype in args.dtypes.split(","):
        sources.append((f"single file, {dtype}",
                        write_checkpoint(folder, workspace.WORK / "models" / f"{args.arch}-seed0-{dtype}.safetensors",
                                         dtype)))
    scratch = workspace.WORK / "single-file"
    load_before = os.getloadavg()[0]
    results = {}
    for label, src in sources:
        store = scratch / label.replace(" ", "-").replace(",", "")
        shutil.rmtree(store, ignore_errors=True)
        try:
            results[label] = (src, _measure(src, store, ["--precision", "fp32"], args.rss_cap_gb))
        finally:
            shutil.rmtree(store, ignore_errors=True)
    load_after = os.getloadavg()[0]

    gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"  # noqa: E731
    rows, stage_names = [], []
    for label, (src, r) in results.items():
        size = f"{src.stat().st_size / 2**30:.2f}" if src.is_file() else \
            f"{sum(p.stat().st_size for p in src.rglob('*') if p.is_file()) / 2**30:.2f}"
        if not r["ok"]:
            rows.append([label, size, "-", "-", r["why"], "-", "-", "-"])
            continue
        stages = r["stats"]["stages"]
        top = max(stages, key=lambda s: s["peak_rss_bytes"] or 0)
        prep = sum(s["seconds"] for s in stages if s["stage"].startswith(("load the single-file", "write the prepared")))
        rows.append([label, size, f"{r['seconds']:.0f}", f"{prep:.0f}", gib(r["stats"]["peak_rss_bytes"]),
                     top["stage"], gib(r["sampled_peak"]), gib(r["sampled_anon_peak"])])
        stage_names += [s["stage"] for s in stages if s["stage"] not in stage_names]
    stage_rows = []
    for name in stage_names:
        row = [name]
        for _, r in results.values():
            s = next((s for s in r.get("stats", {}).get("stages", []) if s["stage"] == name), None)
            row += [f"{s['seconds']:.1f}", gib(s["peak_rss_bytes"])] if s else ["-", "-"]
        stage_rows.append(row)
    body = (
        f"Model: `{args.arch}` (random weights, seed 0), compiled to fp32 from each source into an empty store, one "
        "`kiln compile` process each, one after another. Single files are the same weights in the original "
        "(CompVis) layout, written by the test suite's writer (tests/compiler/ldm_layout.py); Kiln converts them with "
        "diffusers' converters into a prepared diffusers folder (`load the single-file checkpoint`, `write the prepared "
        "diffusers folder`) and compiles that.\n\n"
        "`prepare s`: those two stages; `peak RSS`: the largest per-stage VmHWM the manifest records; `sampled`: the "
        "largest RSS of the process tree sampled every 0.1 s; `sampled anon`: the same for anonymous memory only "
        "(RssAnon: the heap, without pages of files mapped read-only, such as a checkpoint safetensors maps, "
        "which the kernel can drop under pressure). GiB = 2^30 bytes.\n\n"
        + report.table(["source", "source GiB", "seconds", "prepare s", "peak RSS GiB", "stage at the peak",
                        "sampled GiB", "sampled anon GiB"], rows)
        + "\n\nPer stage (seconds, peak RSS GiB):\n\n"
        + report.table(["stage"] + [h for k in results for h in (f"{k} s", f"{k} GiB")], stage_rows)
        + f"\n\nMachine load (1-minute average) at the start and end: {load_before:.1f}, {load_after:.1f} on "
        f"{os.cpu_count()} cores; where other work shared the machine, seconds are indicative; RSS is not affected.\n"
    )
    return report.write(args.out or f"single-file-{args.arch}", f"Single-file checkpoint vs folder ({args.arch})",
                        body)
