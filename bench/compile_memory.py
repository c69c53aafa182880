"""Scenario `compile-memory`: peak RSS of `kiln compile`, whole and stage by stage, per precision.

Each precision compiles the model afresh (a scratch store of its own, so nothing is reused from another bundle)
in a child `kiln compile` process. The scenario samples the resident memory of that process and its children
every 0.1 s, tagged with the stage the compile is printing, and reads the per-stage peaks the compile records in
its manifest (`compile_stats`: the kernel's high-water mark over each stage, which no sampling can miss). A
compile whose RSS passes `--rss-cap-gb` is stopped, and its row says at which stage. The scratch stores are
removed afterwards (a SD v1 bundle is 4 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import report, workspace

INT8_FLAGS = ("--calibration-prompts", "2", "--default-steps", "4", "--calibration-steps", "4",
              "--fidelity-prompts", "1", "--allow-low-fidelity")
"""What `python -m bench precision` compiles int8 with: random weights fail the fidelity gate, which still runs
and is recorded."""
STAGE = re.compile(r"^\[\d+/\d+\] (.*?) (\.\.\.|done in)")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sd-v1", choices=["tiny", "sd-v1", "tiny-sdxl", "sdxl"])
    p.add_argument("--source", help="a local diffusers folder instead of a random-weight --arch model")
    p.add_argument("--precisions", default="fp32,int8", help="comma-separated `--precision` values")
    p.add_argument("--rss-cap-gb", type=float, default=20.0,
                   help="stop a compile whose RSS passes this (GiB); its row then says so")
    p.add_argument("--calibration-size", type=int, metavar="PX",
                   help="int8: `kiln compile --calibration-size` (default: the bundle's default size)")
    p.add_argument("--fidelity-size", type=int, metavar="PX",
                   help="int8: `kiln compile --fidelity-size` (default: the bundle's default size)")
    p.add_argument("--keep", action="store_true",
                   help="compile into the benchmarks' store (bench-<arch>, bench-<arch>-int8, as `python -m bench "
                        "latency --variants` names them) and keep the bundles, instead of scratch stores; a later "
                        "precision then reuses the first one's exports (the manifest says so)")
    p.add_argument("--out", default="", help="result file name (default compile-memory-<arch>)")


def run(args: argparse.Namespace) -> Path:
    source = workspace.source_model(args.arch, args.source)
    precisions = args.precisions.split(",")
    scratch = workspace.WORK / "compile-memory"
    results = {}
    load_before = os.getloadavg()[0]
    for precision in precisions:
        store = workspace.WORK / "store" if args.keep else scratch / precision
        name = f"bench-{args.arch}" + ("" if precision == "fp32" else f"-{precision}") if args.keep else "bench-memory"
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
        flags = _flags(precision, args)
        try:
            results[precision] = _measure(source, store, flags, args.rss_cap_gb, name)
        finally:
            if not args.keep:
                shutil.rmtree(store, ignore_errors=True)
    load_after = os.getloadavg()[0]

    gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"  # noqa: E731
    rows = []
    for precision, r in results.items():
        flags = " ".join(_flags(precision, args))
        if not r["ok"]:
            rows.append([precision, f"`{flags}`", "-", r["why"], "-", "-"])
            continue
        stats = r["stats"]
        if r.get("reused"):
            flags += f" (exports reused from {r['reused']})"
        top = max(stats["stages"], key=lambda s: s["peak_rss_bytes"] or 0)
        rows.append([precision, f"`{flags}`", f"{r['seconds']:.0f}", gib(stats["peak_rss_bytes"]),
                     f"{top['stage']}", gib(r["sampled_peak"])])
    stage_names: list[str] = []
    for r in results.values():
        for s in r.get("stats", {}).get("stages", []):
            if s["stage"] not in stage_names:
                stage_names.append(s["stage"])
    stage_rows = []
    for name in stage_names:
        row = [name]
        for r in results.values():
            s = next((s for s in r.get("stats", {}).get("stages", []) if s["stage"] == name), None)
            row += [f"{s['seconds']:.1f}", gib(s["peak_rss_bytes"])] if s else ["-", "-"]
        stage_rows.append(row)
    stage_header = ["stage"] + [h for p in results for h in (f"{p} s", f"{p} peak RSS GiB")]
    where = ("into the benchmarks' store, kept (`--keep`): a precision after the first reuses its exports where the "
             "flags say so" if args.keep else "afresh per precision into an empty store (no graphs reused)")
    body = (
        f"Model: `{args.arch if not args.source else args.source}` ({'random weights' if not args.source else 'as given'}"
        f"), compiled {where}, one `kiln compile` process each, one after another.\n\n"
        "`peak RSS`: the largest of the per-stage peaks the compile records in its manifest (`compile_stats`: the "
        "process's VmHWM, reset at the start of each stage); `sampled`: the largest RSS of the compile's process "
        "tree sampled every 0.1 s from outside, between stages included (a check on the first). GiB = 2^30 bytes.\n\n"
        + report.table(["precision", "flags", "seconds", "peak RSS GiB", "stage at the peak", "sampled GiB"], rows)
        + "\n\nPer stage (seconds, peak RSS GiB), as the manifest records them:\n\n"
        + report.table(stage_header, stage_rows)
        + f"\n\nMachine load (1-minute average) at the start and end: {load_before:.1f}, {load_after:.1f} on "
        f"{os.cpu_count()} cores; other work shares this machine, so seconds are indicative; RSS is not affected.\n"
    )
    title = f"Compile memory ({args.arch if not args.source else 'source'})"
    return report.write(args.out or f"compile-memory-{args.arch}", title, body)


def _flags(precision: str, args: argparse.Namespace) -> list[str]:
    """`kiln compile` flags of one precision's run."""
    if precision == "fp32":
        return ["--precision", precision]
    sizes = [f for flag, v in (("--calibration-size", args.calibration_size), ("--fidelity-size", args.fidelity_size))
             if v for f in (flag, str(v))]
    return ["--precision", precision, *INT8_FLAGS, *sizes]


def _measure(source: Path, store: Path, flags: list[str], cap_gb: float, name: str = "bench-memory") -> dict:
    """One `kiln compile` in a child process, sampled; its manifest's compile_stats, or why there is none."""
    from model_store import Store

    cmd = [sys.executable, "-m", "cli.main", "compile", str(source), "--name", name, "--store", str(store), *flags]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=workspace.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stage = ["(start)"]
    tail: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            for part in line.replace("\r", "\n").splitlines():
                m = STAGE.match(part)
                if m and m.group(2) == "...":
                    stage[0] = m.group(1)
                tail[:] = (tail + [part])[-5:]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    highest = highest_anon = 0
    while proc.poll() is None:
        highest = max(highest, _tree_rss(proc.pid))
        highest_anon = max(highest_anon, _tree_rss(proc.pid, "RssAnon"))
        if highest > cap_gb * 2**30:
            proc.kill()
            proc.wait()
            return {"ok": False, "why": f"> {highest / 2**30:.1f} in `{stage[0]}` (stopped at the {cap_gb:g} GiB cap)"}
        time.sleep(0.1)
    reader.join(5)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"ok": False, "why": f"failed (exit {proc.returncode}): {' / '.join(tail)}"}
    manifest = Store(store).latest(name).manifest
    return {"ok": True, "seconds": seconds, "sampled_peak": highest, "sampled_anon_peak": highest_anon,
            "stats": json.loads(json.dumps(manifest.compile_stats)),
            "reused": manifest.source.get("reused_exports_from")}


def _tree_rss(root: int, field: str = "VmRSS") -> int:
    """Resident bytes of `root` and every process below it (`RssAnon`: heap and other anonymous memory only,
    without mapped files)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
    return total
