"""Scenario `cold-load`: time to load a bundle into a serving process, split into verify (hash) and open (sessions).

`runtime.model.load_bundle` is what `kiln serve` runs per bundle at start (and what a model pool runs on a load):
`check_files` (every file's size, then its sha256 against the manifest, through the hash cache that remembers the
sha256 of files already verified), then `open_bundle_dir` (one ONNX Runtime session or OpenVINO compiled model per
component, the tokenizer, the schedule). Each load runs in a fresh process (`python -m bench.cold_load --worker`),
which times the two halves separately and reads its own RSS before and after. Three situations:

- **first start**: empty hash cache, the bundle's pages dropped from the page cache first (`posix_fadvise
  DONTNEED` on its files only: the rest of the machine keeps its cache): a freshly deployed bundle.
- **restart**: the hash cache holds the bundle (a server restart, `--cache-dir`), pages dropped: a reboot.
- **reload**: hash cache warm, pages in the page cache (read beforehand): a restart right after a stop, or a
  model pool loading a bundle again after evicting it.

Runs are interleaved (every precision, engine and situation once per repeat) and medians reported. SD v1
architecture with random weights: the bundles are compiled once and cached in the bench's work folder (the
`latency` scenario's names, so its cached bundles serve here too). Process start to first image and warm latency
per engine are in `latency-cold-sd-v1.md`; this scenario splits the load step only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report, workspace

PRECISIONS = {
    "fp32": ("", ()),
    "int8": ("-int8", ("--precision", "int8", "--default-steps", "4", "--calibration-prompts", "2",
                       "--calibration-steps", "4", "--fidelity-prompts", "1", "--allow-low-fidelity",
                       "--calibration-size", "256", "--fidelity-size", "256")),
}
"""Bundle name suffix and compile flags (int8: calibrated small and fast: loading does not depend on it)."""
ENGINES = ("onnxruntime", "openvino")
SITUATIONS = {"first start": (False, False, "empty"), "restart": (True, False, "warm"), "reload": (True, True, "warm"),
              "first start (no graph cache)": (False, False, "off"), "restart (no graph cache)": (True, False, "off"),
              "reload (no graph cache)": (True, True, "off")}
"""(hash cache warm, page cache warm, graph cache) per situation. Graph cache (ONNX Runtime's optimized graphs,
OpenVINO's compiled models; `kiln serve`'s default, `--no-graph-cache` turns it off): `empty` (the load writes
it), `warm` (written by an earlier load; dropped from the page cache with the bundle where the situation says
so), `off`."""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sd-v1", choices=["tiny", "sd-v1", "tiny-sdxl", "sdxl"])
    p.add_argument("--precisions", default="fp32,int8", help="comma-separated, from " + ", ".join(PRECISIONS))
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, from " + ", ".join(ENGINES))
    p.add_argument("--situations", default=",".join(SITUATIONS), help="comma-separated, from " + ", ".join(SITUATIONS))
    p.add_argument("--repeats", type=int, default=3, help="fresh-process loads per row (median)")
    p.add_argument("--out", default="", help="result file name (default cold-load-<arch>)")


def bundle(arch: str, precision: str) -> Path:
    suffix, flags = PRECISIONS[precision]
    return workspace.bundle(workspace.source_model(arch, None), f"bench-{arch}{suffix}", *flags)


def bundle_files(path: Path) -> list[Path]:
    from model_store import Manifest

    return [path / f.path for f in Manifest.read(path).files]


def drop_page_cache(files: list[Path]) -> None:
    """Drop these files' pages from the page cache (clean pages only: a bundle is never written after publish)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through(files: list[Path]) -> None:
    """Bring these files into the page cache."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(argv: list[str]) -> int:
    """One load in this (fresh) process; prints its JSON result."""
    p = argparse.ArgumentParser(prog="python -m bench.cold_load --worker")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--engine", choices=ENGINES, required=True)
    p.add_argument("--hash-cache", type=Path, required=True, help="hash cache folder (empty: a cold cache)")
    p.add_argument("--page-cache", choices=["warm", "cold"], required=True)
    p.add_argument("--graph-cache", default="", help="graph cache folder (as `kiln serve` keeps under --cache-dir); "
                                                     "empty: off")
    args = p.parse_args(argv)

    t_import = time.perf_counter()
    from model_store import BundleRef, HashCache, Manifest
    from runtime.graph_cache import GRAPHS_DIR, OPENVINO_DIR, GraphCache
    from runtime.model import open_bundle_dir
    from runtime.sessions_openvino import OpenVinoConfig

    import_s = time.perf_counter() - t_import
    files = bundle_files(args.bundle)
    graph_root = Path(args.graph_cache) if args.graph_cache else None
    cached = [f for f in graph_root.rglob("*") if f.is_file()] if graph_root and graph_root.is_dir() else []
    (read_through if args.page_cache == "warm" else drop_page_cache)(files + cached)
    rss0 = _rss("VmRSS")
    ref = BundleRef(args.bundle, Manifest.read(args.bundle))
    t0 = time.perf_counter()
    cache = HashCache(args.hash_cache)
    ref.check_files(hashes=True, cache=cache)  # what load_bundle does first
    cache.save()
    t1 = time.perf_counter()
    model = open_bundle_dir(ref.path, ref.manifest, engine=args.engine,  # then this
                            openvino=OpenVinoConfig(cache_dir=str(graph_root / OPENVINO_DIR) if graph_root else "")
                            if args.engine == "openvino" else None,
                            graphs=GraphCache(graph_root / GRAPHS_DIR) if graph_root else None)
    t2 = time.perf_counter()
    result = {"graph_cache": sorted({getattr(s, "graph_cache", "") for s in model.sessions.values()} - {""}),
              "verify_s": t1 - t0, "open_s": t2 - t1, "files_hashed": cache.hashed, "bytes_hashed": cache.hashed_bytes,
              "files": len(files), "bytes": sum(f.stat().st_size for f in files), "import_s": import_s,
              "rss_added_bytes": _rss("VmRSS") - rss0, "peak_rss_added_bytes": _rss("VmHWM") - rss0,
              "components": sorted(model.sessions)}
    print(json.dumps(result))
    return 0


def load_once(path: Path, engine: str, situation: str, hash_cache: Path, graph_cache: Path) -> dict:
    """One load in a fresh worker process; `hash_cache` and `graph_cache` (this bundle's and engine's) are used for
    the warm-cache situations."""
    warm_hashes, warm_pages, graphs = SITUATIONS[situation]
    with tempfile.TemporaryDirectory(dir=workspace.WORK, prefix="cold-load-") as empty:
        cmd = [sys.executable, "-m", "bench.cold_load", "--worker", "--bundle", str(path), "--engine", engine,
               "--hash-cache", str(hash_cache if warm_hashes else empty),
               "--page-cache", "warm" if warm_pages else "cold",
               "--graph-cache", {"off": "", "empty": str(Path(empty) / "graphs"), "warm": str(graph_cache)}[graphs]]
        out = subprocess.run(cmd, check=True, cwd=workspace.ROOT, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> Path:
    def pick(given: str, allowed: dict | tuple, what: str) -> list[str]:
        chosen = [x.strip() for x in given.split(",") if x.strip()]
        wrong = [x for x in chosen if x not in allowed]
        if wrong or not chosen:
            raise SystemExit(f"unknown --{what} {wrong}; choose from {', '.join(allowed)}")
        return chosen

    precisions = pick(args.precisions, PRECISIONS, "precisions")
    engines, situations = pick(args.engines, ENGINES, "engines"), pick(args.situations, SITUATIONS, "situations")
    bundles = {p: bundle(args.arch, p) for p in precisions}
    hash_cache = workspace.WORK / "cold-load" / "hashes"
    hash_cache.mkdir(parents=True, exist_ok=True)
    from model_store import BundleRef, HashCache, Manifest

    for path in bundles.values():  # the warm hash cache holds every bundle (hashed here, once)
        cache = HashCache(hash_cache)
        BundleRef(path, Manifest.read(path)).check_files(hashes=True, cache=cache)
        cache.save()
    graph_caches = {(p, e): workspace.WORK / "cold-load" / f"graphs-{p}-{e}" for p in precisions for e in engines}
    for (p, e), folder in graph_caches.items():  # the warm graph caches, written by one load each (not timed)
        shutil.rmtree(folder, ignore_errors=True)
        load_once(bundles[p], e, "reload", hash_cache, folder)
    results: dict[tuple[str, str, str], list[dict]] = {}
    load_before = os.getloadavg()[0]
    for r in range(args.repeats):
        for p in precisions:
            for e in engines:
                for s in situations:
                    res = load_once(bundles[p], e, s, hash_cache, graph_caches[p, e])
                    results.setdefault((p, e, s), []).append(res)
                    print(f"[cold-load] {r + 1}/{args.repeats} {p} {e} {s}: verify {res['verify_s']:.2f} s "
                          f"({res['files_hashed']} files hashed), open {res['open_s']:.2f} s, RSS +"
                          f"{res['rss_added_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return _report(args, bundles, results, (load_before, os.getloadavg()[0]))


def _report(args: argparse.Namespace, bundles: dict[str, Path], results: dict[tuple[str, str, str], list[dict]],
            load: tuple[float, float]) -> Path:
    med = report.median
    rows = []
    for (p, e, s), runs in results.items():
        verify, opened = [x["verify_s"] for x in runs], [x["open_s"] for x in runs]
        total = [a + b for a, b in zip(verify, opened, strict=True)]
        hashed = {x["files_hashed"] for x in runs}
        graphs = sorted({g for x in runs for g in x["graph_cache"]} - {"off"}) or ["-"]
        rows.append([p, e, s, f"{med(verify):.2f}", "/".join(str(h) for h in sorted(hashed)) + f" of {runs[0]['files']}",
                     "/".join(graphs),
                     f"{med(opened):.2f}", f"{med(total):.2f}", f"{min(total):.2f}-{max(total):.2f}",
                     f"{med([x['rss_added_bytes'] for x in runs]) / 2**30:.2f}",
                     f"{med([x['peak_rss_added_bytes'] for x in runs]) / 2**30:.2f}"])
    sizes = ", ".join(f"{p}: `{b.parent.name}/{b.name}`, {sum(f.stat().st_size for f in bundle_files(b)) / 1e9:.2f} GB"
                      for p, b in bundles.items())
    body = (
        f"Model: `{args.arch}` architecture (random weights). Bundles: {sizes}. Each load is a fresh process "
        f"(`python -m bench.cold_load --worker`), {args.repeats} per row, interleaved; medians (and the range of the "
        "total). **verify**: `BundleRef.check_files(hashes=True)` through a `HashCache` as `kiln serve` uses it "
        "(sizes, then sha256 of every file the cache does not know); **open**: `open_bundle_dir` (sessions, "
        "tokenizer, schedule); load = verify + open, i.e. `runtime.model.load_bundle`. Situations: **first start** "
        "= empty hash cache and graph cache (the load writes the graph cache, as `kiln serve` does by default), "
        "the bundle's files dropped from the page cache; **restart** = hash cache and graph cache warm, the "
        "bundle's and the cached graphs' files dropped from the page cache; **reload** = both caches warm, files "
        "in the page cache (a pool reloading an evicted model); **no graph cache**: the same with the graph cache "
        "off (`kiln serve --no-graph-cache`, and every Kiln before it). Graph cache: ONNX Runtime's optimized "
        "graphs (runtime/graph_cache.py), OpenVINO's compiled models (its `CACHE_DIR`); **graphs** says what the "
        "sessions did: `written` (optimized and cached), `hit` (opened the cached one). RSS added: the process's "
        "VmRSS after open minus before verify; peak: VmHWM minus the same. Engines at their serving defaults "
        "(ONNX Runtime: all graph optimisations, threads = cores; OpenVINO: its default precision, bf16 on AMX "
        "CPUs).\n\n"
        + report.table(["precision", "engine", "situation", "verify s", "files hashed", "graphs", "open s", "load s",
                        "load s range", "RSS added GiB", "peak RSS added GiB"], rows)
        + "\n\nProcess start to first image (interpreter, imports, load, one 512x512 generation) and warm latency "
          "per engine and precision: [latency-cold-sd-v1.md](latency-cold-sd-v1.md); not repeated here.\n\n"
        + f"This machine has 2 cores, shared during the run with other work (other agents' builds and tests; "
          f"1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end): seconds are indicative, "
          "compare rows of one run. Disk reads (first start, restart) depend on this VM's virtual disk.\n"
    )
    return report.write(args.out or f"cold-load-{args.arch}", f"Cold load per precision and engine ({args.arch})",
                        body)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker(sys.argv[2:]))
    sys.exit("usage: python -m bench cold-load [options] (or python -m bench.cold_load --worker ...)")
