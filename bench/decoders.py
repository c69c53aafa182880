"""Scenario `decoders`: decode time and peak RSS of the full SD v1 VAE decoder vs the tiny (TAESD) decoder.

Both graphs come from Kiln's own export path (compiler.export.export_component, then the compile's fusions), with
random weights (speed and memory do not depend on them): the full decoder from the SD v1 VAE config the project
ships (compiler/source/configs/sd-v1/vae), the tiny one from AutoencoderTiny's defaults, which are TAESD's
architecture. Every (decoder, size) runs in a fresh child process (`python -m bench.decoders --worker ...`) on
ONNX Runtime's CPU provider with the runtime's session options (runtime/sessions.py), so its peak RSS is its own;
a child whose RSS passes `--rss-cap-gb` is stopped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import report, workspace
from bench.memory import _status_mb, run_worker

DECODERS = ("full", "tiny")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="512,1024", help="image sizes (width = height), comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the first (which is reported apart)")
    p.add_argument("--rss-cap-gb", type=float, default=16.0,
                   help="stop a child whose RSS passes this (GiB); its row then says so")
    p.add_argument("--out", default="decoders", help="result file name")


def run(args: argparse.Namespace) -> Path:
    if args.repeats < 1:
        raise SystemExit(f"--repeats={args.repeats} must be at least 1")
    sizes = [int(s) for s in args.sizes.split(",")]
    scratch = workspace.WORK / "decoders"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    graphs = {d: scratch / d / "vae_decoder.onnx" for d in DECODERS}
    params = {}
    for d, path in graphs.items():  # in a child: the exporter's memory stays out of this process
        subprocess.run([sys.executable, "-m", "bench.decoders", "--export", d, str(path)], check=True,
                       cwd=workspace.ROOT)
        params[d] = json.loads(path.with_suffix(".json").read_text())["parameters"]

    load_before = os.getloadavg()[0]
    results = {(d, s): _measure(graphs[d], s, args.repeats, scratch / f"{d}-{s}", args.rss_cap_gb)
               for s in sizes for d in DECODERS}
    load_after = os.getloadavg()[0]

    rows = []
    for s in sizes:
        for d in DECODERS:
            r = results[(d, s)]
            label = [d, f"{s}x{s}", f"{params[d] / 1e6:.2f} M"]
            if not r.get("ok"):
                rows.append([*label, "-", r["why"], "-", "-", "-"])
                continue
            rows.append([*label, f"{r['rss_after_load_mb']:.0f}", f"{r['peak_mb']:.0f}",
                         f"{r['peak_mb'] - r['rss_after_load_mb']:.0f}", f"{r['first_s']:.2f}",
                         f"{report.median(r['call_s']):.3f}"])
    ratios = []
    for s in sizes:
        full, tiny = results[("full", s)], results[("tiny", s)]
        if full.get("ok") and tiny.get("ok"):
            ratios.append([f"{s}x{s}", f"{report.median(full['call_s']) / report.median(tiny['call_s']):.1f}x",
                           f"{full['peak_mb'] / tiny['peak_mb']:.1f}x",
                           f"{(full['peak_mb'] - full['rss_after_load_mb']) / max(tiny['peak_mb'] - tiny['rss_after_load_mb'], 1):.1f}x"])
    body = (
        "Decoders: `full` is the SD v1 VAE decoder (AutoencoderKL, compiler/source/configs/sd-v1/vae), `tiny` "
        "AutoencoderTiny's decoder with diffusers' defaults (TAESD's architecture, what `kiln compile "
        "--tiny-decoder` adds as `vae_decoder_tiny`); random weights, fp32, exported and fused as `kiln compile` "
        "does. One image per call ([1, 4, size/8, size/8] latents), ONNX Runtime CPU provider with the runtime's "
        "session options (all cores, one shared CPU arena).\n\n"
        f"Each row is a fresh process: it loads the graph, resets its peak RSS (`/proc/self/clear_refs`), then "
        f"decodes {args.repeats + 1} times. `peak RSS`: VmHWM over the calls (weights included); `call extra`: peak "
        "minus RSS after loading; `first call`: the first decode (ONNX Runtime's arena growth and memory-pattern "
        f"trace included); `median`: median wall time of the {args.repeats} decodes after it.\n\n"
        + report.table(["decoder", "size", "parameters", "RSS after load MiB", "peak RSS MiB", "call extra MiB",
                        "first call s", "median s"], rows)
        + "\n\nFull vs tiny, measured side by side in this run:\n\n"
        + report.table(["size", "decode time (median)", "peak RSS", "call extra"], ratios)
        + f"\n\nMachine load (1-minute average) at the start and end of the measurements: {load_before:.1f}, "
        f"{load_after:.1f} on {os.cpu_count()} cores. Other work (other agents' builds and tests) shared this "
        "machine while it ran, so absolute times are noisy; the ratios come from decodes measured back to back in "
        "one run. Peak RSS is not affected by other work.\n"
    )
    shutil.rmtree(scratch, ignore_errors=True)
    return report.write(args.out, "VAE decoders: full (SD v1) vs tiny (TAESD)", body)


def _measure(graph: Path, size: int, repeats: int, out: Path, cap_gb: float) -> dict:
    """Run the worker on `graph` at `size`, stopping it past `cap_gb` of RSS; its JSON result (or why not)."""
    return run_worker([sys.executable, "-m", "bench.decoders", "--worker", str(graph), str(size), str(repeats),
                       str(out)], out, cap_gb)


def _worker(graph: Path, size: int, repeats: int, out: Path) -> None:
    """One measurement: load, reset the peak, decode `repeats + 1` times; writes OUT.json."""
    import resource

    from runtime.sessions import OrtSession

    status = Path("/proc/self/status")
    session = OrtSession("vae_decoder", graph)
    after_load = _status_mb(status, "VmRSS") or 0.0
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS: the peak below is the calls'
        reset = True
    except OSError:
        reset = False
    latents = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8), dtype=np.float32)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        image = session.run({"latent_sample": latents})["sample"]
        times.append(time.perf_counter() - t)
    assert image.shape == (1, 3, size, size) and np.isfinite(image).all(), image.shape
    peak = _status_mb(status, "VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.with_suffix(".json").write_text(json.dumps({"rss_after_load_mb": after_load, "peak_mb": peak,
                                                    "first_s": times[0], "call_s": times[1:]}))


def _export(decoder: str, out: Path) -> None:
    """The decoder through Kiln's exporter and fusions, as `kiln compile` makes `vae_decoder` /
    `vae_decoder_tiny`; OUT.json records its parameter count."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from compiler.export import COMPONENTS, TINY_DECODER, export_component
    from compiler.passes import fusions
    from compiler.source.init import CONFIGS
    from compiler.source.load import SourceModel
    from model_store.onnx_files import load_graph, save_model

    config = json.loads((CONFIGS / "sd-v1" / "vae" / "config.json").read_text())
    torch.manual_seed(0)
    out.parent.mkdir(parents=True)
    if decoder == "full":
        module, spec = AutoencoderKL.from_config(config).eval(), COMPONENTS["vae_decoder"]
        source = SourceModel(out.parent, {}, {}, config, _modules={"vae": module})
        count = sum(p.numel() for p in module.decoder.parameters()) + \
            sum(p.numel() for p in module.post_quant_conv.parameters())
    else:
        module, spec = AutoencoderTiny().eval(), TINY_DECODER
        source = SourceModel(out.parent, {}, {}, config, tiny_decoder=out.parent, _modules={"vae_tiny": module})
        count = sum(p.numel() for p in module.decoder.parameters())
    export_component(spec, source, out, 17, log=lambda _: None)
    save_model(fusions.apply(load_graph(out), spec.name), out)
    out.with_suffix(".json").write_text(json.dumps({"parameters": count}))


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        _worker(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    elif sys.argv[1] == "--export":
        _export(sys.argv[2], Path(sys.argv[3]))
    else:
        raise SystemExit("run scenarios with `python -m bench decoders`; this entry point is the scenario's child")
