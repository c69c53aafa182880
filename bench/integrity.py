"""Scenario `integrity`: what verifying a bundle against its manifest costs a server start.

Every file of the bundle is checked against the manifest's size and sha256 (`model_store.integrity`), as `kiln
serve` does before opening sessions: once with no hash cache (a first start, or a file that changed), and once
as a restart, with the cache the first run wrote. The files are read right before, so they are in the page cache:
the first figure is hashing, not disk reads. Runs interleaved, medians reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench import report, workspace


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sd-v1", choices=["tiny", "sd-v1"])
    p.add_argument("--source", help="a local diffusers folder instead of a random-weight --arch model")
    p.add_argument("--precision", default="fp32", help="the bundle's --precision")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="", help="result file name (default: integrity-ARCH)")


def run(args: argparse.Namespace) -> Path:
    from model_store import BundleRef, HashCache, Manifest

    source = workspace.source_model(args.arch, args.source)
    name = f"bench-{args.arch}" + ("" if args.precision == "fp32" else f"-{args.precision}")  # as precision's
    path = workspace.bundle(source, name, "--precision", args.precision)
    ref = BundleRef(path, Manifest.read(path))
    size = sum(f.size for f in ref.manifest.files)
    ref.check_files(hashes=True, cache=HashCache(persist=False))  # warm the page cache
    first, restart = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            cache = HashCache(Path(tmp))
            t0 = time.perf_counter()
            ref.check_files(hashes=True, cache=cache)
            first.append(time.perf_counter() - t0)
            assert cache.hashed == len(ref.manifest.files)
            cache.save()
            again = HashCache(Path(tmp))
            t0 = time.perf_counter()
            ref.check_files(hashes=True, cache=again)
            restart.append(time.perf_counter() - t0)
            assert again.hashed == 0
            (Path(tmp) / cache.path.name).unlink()  # type: ignore[union-attr]
    f, r = statistics.median(first), statistics.median(restart)
    rows = [
        ["first start (no cache)", f"{f:.2f} s", f"{size / f / 1e9:.2f} GB/s"],
        ["restart (cache hit for every file)", f"{r * 1000:.2f} ms", "-"],
    ]
    body = (f"Bundle: {args.source or args.arch} ({args.precision}), {len(ref.manifest.files)} files, "
            f"{size / 1e9:.2f} GB. {args.repeats} runs each, medians.\n\n"
            + report.table(["verification", "time", "hashing rate"], rows))
    return report.write(args.out or f"integrity-{args.arch}", "Integrity: verifying a bundle at server start", body)
