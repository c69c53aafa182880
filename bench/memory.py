"""Scenario `memory`: peak RSS and time of one CFG UNet call, with and without attention slicing.

For the fused graph (the default compile's UNet) and the plain one (what `--no-fusions` ships: the export
itself), each without and with compiler/passes/attention_slicing.py, at each size. Every (variant, size)
runs in a fresh child process (`python -m bench.memory --worker ...`) so its peak RSS is its own; a child
whose RSS passes `--rss-cap-gb` is stopped and reported as such, so a graph that does not fit cannot take the
machine down. Sliced copies are made for the run and removed after it; the plain export is kept in the scratch
folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench import report, workspace

GRAPHS = ("fused", "plain")
"""`fused`: the UNet of the bench's fp32 bundle (workspace.bundle); `plain`: the UNet exported without fusions."""
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "Softmax")


VARIANTS = (("fused", False, True), ("fused", True, True), ("fused", True, False),
            ("plain", False, True), ("plain", True, True), ("plain", True, False))
"""(graph, sliced, ONNX Runtime memory pattern on) in the order measured."""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sd-v1", choices=["tiny", "sd-v1"])
    p.add_argument("--source", help="a local diffusers folder instead of a random-weight --arch model")
    p.add_argument("--sizes", default="512,768", help="image sizes (width = height), comma-separated")
    p.add_argument("--graphs", default="fused,plain", help=f"comma-separated, from: {', '.join(GRAPHS)}")
    p.add_argument("--slicing", default="auto", help="the attention-slicing argument of the sliced variants")
    p.add_argument("--repeats", type=int, default=1,
                   help="calls after the first; ONNX Runtime plans its memory pattern in the first, so at least 1")
    p.add_argument("--rss-cap-gb", type=float, default=16.0,
                   help="stop a child whose RSS passes this (GiB); its row then says so")
    p.add_argument("--scratch", default="",
                   help="folder for the plain export and the sliced graphs (default: bench/work/memory); a tmpfs "
                        "such as /dev/shm/kiln-memory where disk is short (the plain SD v1 UNet is 3.3 GiB)")
    p.add_argument("--out", default="memory", help="result file name")


def run(args: argparse.Namespace) -> Path:
    from compiler.passes import attention_slicing
    from compiler.source import load_source

    slicing = attention_slicing.parse(args.slicing)
    graphs = args.graphs.split(",")
    unknown = [g for g in graphs if g not in GRAPHS]
    if unknown:
        raise SystemExit(f"--graphs: {unknown} not in {list(GRAPHS)}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats={args.repeats} must be at least 1")
    sizes = [int(s) for s in args.sizes.split(",")]
    source = workspace.source_model(args.arch, args.source)
    scratch = Path(args.scratch) if args.scratch else workspace.WORK / "memory"
    scratch.mkdir(parents=True, exist_ok=True)
    name = f"bench-{args.arch}" if not args.source else "bench-source"
    loaded = load_source(source)
    config = loaded.unet_config
    shapes = {"in_channels": int(config["in_channels"]), "context": int(config["cross_attention_dim"]),
              "scale": loaded.vae_scale_factor}
    # diffusers' SD v1 configs name the head count `attention_head_dim`
    heads = config.get("num_attention_heads") or config["attention_head_dim"]
    heads = heads[0] if isinstance(heads, list) else int(heads)

    unets: dict[tuple[str, bool], Path] = {}
    for g in graphs:
        unets[(g, False)] = workspace.bundle(source, name) / "unet.onnx" if g == "fused" else \
            _plain_export(source, scratch)
        unets[(g, True)] = _sliced(unets[(g, False)], str(slicing), scratch)
    variants = [v for v in VARIANTS if v[0] in graphs]

    def stem(v: tuple[str, bool, bool], size: int) -> Path:
        return scratch / f"{v[0]}-{'sliced' if v[1] else 'whole'}-{'pattern' if v[2] else 'nopattern'}-{size}"

    load_before = os.getloadavg()[0]
    results = {}
    for size in sizes:
        for v in variants:
            results[(v, size)] = _measure(unets[v[:2]], size, args.repeats, stem(v, size), args.rss_cap_gb, shapes,
                                          v[2])
    load_after = os.getloadavg()[0]

    rows = []
    for size in sizes:
        for v in variants:
            r = results[(v, size)]
            diff = "-" if not v[1] else _diff(v, size, results, stem)
            label = [v[0], str(slicing) if v[1] else "no", "on" if v[2] else "off", f"{size}x{size}",
                     _attention_ops(unets[v[:2]])]
            if not r.get("ok"):
                rows.append([*label, "-", r["why"], "-", "-", "-", "-", diff])
                continue
            rows.append([*label, f"{r['rss_after_load_mb']:.0f}", f"{r['peak_mb']:.0f}",
                         f"{r['peak_mb'] - r['rss_after_load_mb']:.0f}", f"{r['first_s']:.2f}",
                         f"{report.median(r['step_s']):.2f}", f"{report.median(r['step_cpu_s']):.1f}", diff])
    lat = {s: (s // shapes["scale"]) ** 2 for s in sizes}
    scores = ", ".join(f"{s}x{s}: {2 * heads * lat[s] ** 2 * 4 / 2**30:.2f} GiB" for s in sizes)
    body = (
        f"Model: `{args.arch if not args.source else args.source}` UNet, fp32, one call at batch 2 (a classifier-"
        "free-guided step), ONNX Runtime CPU provider with the runtime's session options (runtime/sessions.py: "
        "all cores, one shared CPU arena), ONNX Runtime's memory pattern on (its default, what the runtime serves "
        "with) or off (`SessionOptions.enable_mem_pattern = False`). Graphs: `fused` is the default compile's UNet, "
        "`plain` the `--no-fusions` one (the export itself); sliced graphs are those through "
        f"`compiler.passes.attention_slicing.apply(model, {str(slicing)!r})`.\n\n"
        f"Each row is a fresh process: it loads the graph, resets its peak RSS (`/proc/self/clear_refs`), then "
        f"calls the UNet {args.repeats + 1} times with the same inputs. `peak RSS`: VmHWM over the calls (weights "
        "included); `call extra`: peak minus RSS after loading. `first call`: the first call (arena growth and the "
        f"memory-pattern trace included); `step`: median wall time of the {args.repeats} call(s) after it, "
        "`step CPU s` their median CPU time over all threads (less swayed than wall time by other work on the "
        "machine; ONNX Runtime's threads spin while they wait, which counts too). `max abs diff`: the "
        "output against the unsliced graph's (memory pattern on), or the fused graph's where the unsliced one did "
        "not run (the two graphs differ by the fusions' rounding).\n\n"
        "What slicing does to each graph: in `fused`, self-attention is `Attention` (packed Q/K/V, no tiled CPU "
        "kernel: it holds the whole score matrix) and cross-attention `MultiHeadAttention` (tiled flash-attention "
        "kernel); slicing moves self-attention onto `MultiHeadAttention` too. In `plain`, attention is MatMul -> "
        "Softmax -> MatMul; slicing cuts each self-attention's queries into slices run one after another "
        "(`auto`: at most 64 MiB of scores per slice, at most 64 slices; unused slices are empty).\n\n"
        f"The full score matrix of one highest-resolution self-attention (2 images x {heads} heads x S x S fp32, "
        f"S = latent pixels): {scores}.\n\n"
        + report.table(["graph", "slicing", "mem pattern", "size", "attention ops", "RSS after load MiB",
                        "peak RSS MiB", "call extra MiB", "first call s", "step s", "step CPU s", "max abs diff"], rows)
        + f"\n\nMachine load (1-minute average) at the start and end of the measurements: {load_before:.1f}, "
        f"{load_after:.1f} on {os.cpu_count()} cores; other work shares this machine, so times are indicative; "
        "peak RSS is not affected.\n"
    )
    for g in graphs:  # gigabytes each where the weights were copied; remade in a minute
        shutil.rmtree(unets[(g, True)].parent, ignore_errors=True)
    return report.write(args.out, f"Memory: attention slicing ({args.arch} UNet)", body)


def _diff(v: tuple[str, bool, bool], size: int, results: dict, stem: Callable[..., Path]) -> str:
    """Max abs difference of a sliced variant's output from its unsliced graph's, or from the fused graph's
    where that did not run."""
    if not results[(v, size)].get("ok"):
        return "n/a"
    for ref, note in (((v[0], False, True), ""), (("fused", False, True), " (vs fused)")):
        if (ref, size) in results and results[(ref, size)].get("ok"):
            a, b = np.load(stem(ref, size).with_suffix(".npy")), np.load(stem(v, size).with_suffix(".npy"))
            return f"{np.abs(a - b).max():.1e}{note}"
    return "n/a"


def _plain_export(source: Path, scratch: Path) -> Path:
    """The UNet exported without fusions, made once per source model in a child process."""
    from compiler.source import load_source

    out = scratch / f"plain-{load_source(source).content_hash()[:12]}" / "unet.onnx"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "bench.memory", "--export", str(source), str(out)], check=True,
                       cwd=workspace.ROOT)
    return out


def _sliced(unet: Path, slicing: str, scratch: Path) -> Path:
    """The sliced copy of `unet`, made once per (graph, slicing, pass source) in a child process."""
    from compiler.passes import attention_slicing

    code = hashlib.sha256(Path(attention_slicing.__file__).read_bytes()).hexdigest()[:8]
    key = hashlib.sha256(str(unet.resolve()).encode()).hexdigest()[:8]
    # a copy of a bundle's weights goes to disk even when the scratch folder is a tmpfs (memory)
    base = scratch if scratch.resolve() in unet.resolve().parents else workspace.WORK / "memory"
    out = base / f"sliced-{key}-{slicing}-{code}" / "unet.onnx"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "bench.memory", "--slice", str(unet), str(out), slicing], check=True,
                       cwd=workspace.ROOT)
    return out


def _attention_ops(unet: Path) -> str:
    import onnx

    from compiler.passes.fusions import op_counts

    counts = op_counts(onnx.load(str(unet), load_external_data=False))
    return ", ".join(f"{counts[k]} {k}" for k in ATTENTION_OPS if counts.get(k))


def _measure(unet: Path, size: int, repeats: int, out: Path, cap_gb: float, shapes: dict[str, int],
             mem_pattern: bool) -> dict:
    """Run the worker on `unet` at `size`, stopping it past `cap_gb` of RSS; its JSON result (or why not)."""
    return run_worker([sys.executable, "-m", "bench.memory", "--worker", str(unet), str(size), str(repeats), str(out),
                       json.dumps(shapes), str(int(mem_pattern))], out, cap_gb)


def run_worker(cmd: list[str], out: Path, cap_gb: float) -> dict:
    """Run a measuring child process, stopping it past `cap_gb` of RSS; its OUT.json result (or why not)."""
    proc = subprocess.Popen(cmd, cwd=workspace.ROOT)
    highest = 0.0
    while proc.poll() is None:
        rss = _status_mb(Path(f"/proc/{proc.pid}/status"), "VmRSS")
        highest = max(highest, rss or 0.0)
        if highest > cap_gb * 1024:
            proc.kill()
            proc.wait()
            return {"ok": False, "why": f"> {highest:.0f} (stopped at the {cap_gb:g} GiB cap)"}
        time.sleep(0.05)
    result = out.with_suffix(".json")
    if proc.returncode != 0 or not result.exists():
        return {"ok": False, "why": f"failed (exit {proc.returncode})"}
    return {"ok": True, **json.loads(result.read_text())}


def _status_mb(path: Path, key: str) -> float | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def _worker(unet: Path, size: int, repeats: int, out: Path, shapes: dict[str, int], mem_pattern: bool) -> None:
    """One measurement: load, reset the peak, call the UNet `repeats + 1` times; writes OUT.json and OUT.npy."""
    import resource

    from runtime.sessions import OrtSession

    status = Path("/proc/self/status")
    if mem_pattern:
        run = OrtSession("unet", unet).run
    else:
        import onnxruntime as ort

        from runtime import sessions

        options = ort.SessionOptions()  # OrtSession's options, memory pattern off
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.enable_mem_pattern = False
        sessions._use_shared_cpu_arena(options)
        session = ort.InferenceSession(str(unet), options, providers=["CPUExecutionProvider"])

        def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"out_sample": session.run(["out_sample"], feed)[0]}
    after_load = _status_mb(status, "VmRSS") or 0.0
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS: the peak below is the calls'
        reset = True
    except OSError:
        reset = False
    rng = np.random.default_rng(0)
    latent = size // shapes["scale"]
    feed = {"sample": rng.standard_normal((2, shapes["in_channels"], latent, latent), dtype=np.float32),
            "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, shapes["context"]), dtype=np.float32)}
    times, cpu = [], []
    for _ in range(repeats + 1):
        t, c = time.perf_counter(), time.process_time()
        result = run(feed)["out_sample"]
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = _status_mb(status, "VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(out.with_suffix(".npy"), result)
    out.with_suffix(".json").write_text(json.dumps({
        "rss_after_load_mb": after_load, "peak_mb": peak, "first_s": times[0], "step_s": times[1:],
        "step_cpu_s": cpu[1:],
    }))


def _export(source: Path, out: Path) -> None:
    from compiler.export import COMPONENTS, export_component
    from compiler.source import load_source

    partial = out.parent.with_name(out.parent.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    export_component(COMPONENTS["unet"], load_source(source), partial / out.name, 17)
    os.replace(partial, out.parent)


def _slice(src: Path, out: Path, slicing: str) -> None:
    """`src` through the pass; the weights it leaves alone stay in `src`'s data file, linked or copied beside."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    from compiler.passes import attention_slicing

    model = onnx.load(str(src), load_external_data=False)
    # the only weights the pass reads: the packed Q/K/V of fused self-attention, which it splits
    packed = {n.input[1] for n in model.graph.node if n.op_type == "Attention" and len(n.input) > 1}
    locations = set()
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        if tensor.name in packed:
            load_external_data_for_tensor(tensor, str(src.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        else:
            locations.add(next(e.value for e in tensor.external_data if e.key == "location"))
    model, _ = attention_slicing.apply(model, slicing)
    partial = out.parent.with_name(out.parent.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # ONNX Runtime refuses data files outside the graph's folder (symbolic links included), so: a hard link to a
    # file this scenario made itself (the plain export), a copy of any other (a second link to a bundle's file
    # makes onnx.load refuse that file as a possible hard-link attack)
    own = out.parent.parent.resolve() in src.resolve().parents
    for location in locations:
        if own:
            os.link((src.parent / location).resolve(), partial / location)
        else:
            shutil.copyfile(src.parent / location, partial / location)
    onnx.save_model(model, str(partial / out.name))  # new tensors inline (the split Q/K/V: ~150 MB for SD v1)
    os.replace(partial, out.parent)


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        _worker(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), json.loads(sys.argv[6]),
                sys.argv[7] == "1")
    elif sys.argv[1] == "--slice":
        _slice(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    elif sys.argv[1] == "--export":
        _export(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit("run scenarios with `python -m bench memory`; this entry point is the scenario's child")
