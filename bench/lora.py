"""Scenario `lora`: per-request LoRA adapters (`kiln compile --lora-inputs`) against the same LoRA fused.

Two bundles of one model: `lora-inputs-ARCH`, the base compiled with `--lora-inputs` plus the LoRA added with
`kiln lora add` (twice, under two names, for the memory of an extra adapter and a two-adapter selection), and
`lora-fused-ARCH`, compiled from the same model with the same LoRA fused into its weights by diffusers
(`load_lora_weights` + `fuse_lora`, then `save_pretrained`): the graph a plain bundle has, so its step time is
the plain bundle's. The LoRA is a kohya-format file of random PEFT pairs (rank `--rank`) over every layer the
per-request path covers. Reported: the time to add an adapter and to switch a server's selection, memory per
extra adapter, UNet and text-encoder call times (adapter inputs at rank 0, at the LoRA's rank, and with two
adapters, against the fused bundle; variants interleaved, medians), and the final images with the adapter
against the fused bundle's (PSNR, max difference, pixel equality), with the image without the LoRA as a scale
for how much the LoRA changes it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import report, workspace

LORA_STRENGTH = 0.5
"""PEFT's random pairs are multiplied by this before saving (a visible, not wild, change of the image)."""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sd-v1", choices=["tiny", "shapes", "sd-v1"])
    p.add_argument("--rank", type=int, default=16, help="rank of the LoRA made for the benchmark")
    p.add_argument("--size", type=int, default=256, help="square image size of the timed calls and the images")
    p.add_argument("--steps", type=int, default=12, help="denoising steps of the compared images")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="result file name (default lora-ARCH)")


def make_lora(source: Path, rank: int, out: Path) -> None:
    """A kohya-format LoRA of random PEFT pairs for the UNet's transformer blocks and the text encoder."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    cfg = dict(r=rank, lora_alpha=rank, init_lora_weights=False)
    unet = UNet2DConditionModel.from_pretrained(source / "unet")
    unet.add_adapter(LoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                "ff.net.0.proj", "ff.net.2"], **cfg))
    te = CLIPTextModel.from_pretrained(source / "text_encoder")
    inject_adapter_in_model(LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                                       **cfg), te)
    state = {f"unet.{k}": v * LORA_STRENGTH for k, v in get_peft_model_state_dict(unet).items()}
    state |= {f"text_encoder.{k.replace('.default.', '.')}": v * LORA_STRENGTH
              for k, v in te.state_dict().items() if "lora_" in k}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(state).items()}, str(out))


def make_fused(source: Path, lora: Path, out: Path) -> None:
    """`source` with `lora` fused into its weights by diffusers, written as a diffusers folder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora), adapter_name="bench")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for folder in ("tokenizer", "scheduler"):  # the source's own files: save_pretrained rewrites them otherwise
        shutil.rmtree(tmp / folder)
        shutil.copytree(source / folder, tmp / folder)
    if (source / "kiln.json").exists():
        shutil.copy(source / "kiln.json", tmp / "kiln.json")
    tmp.rename(out)


def _child(*args: str) -> None:
    """Torch work in a child process: the benchmark process keeps none of its memory."""
    subprocess.run([sys.executable, "-m", "bench.lora", *args], cwd=workspace.ROOT, check=True)


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _compile_seconds(bundle: Path) -> float:
    stats = json.loads((bundle / "manifest.json").read_text()).get("compile_stats", {})
    return sum(s["seconds"] for s in stats.get("stages", []))


def run(args: argparse.Namespace) -> Path:
    from model_store import BundleRef, Manifest
    from runtime.model import load_bundle

    source = workspace.source_model(args.arch, None)
    lora = workspace.WORK / "lora" / f"{args.arch}-r{args.rank}.safetensors"
    if not lora.exists():
        _child("make-lora", str(source), str(args.rank), str(lora))
    fused_source = workspace.WORK / "models" / f"{args.arch}-lora-r{args.rank}-fused"
    if not (fused_source / "model_index.json").exists():
        _child("make-fused", str(source), str(lora), str(fused_source))
    fused_dir = workspace.bundle(fused_source, f"lora-fused-{args.arch}")
    inputs_dir = workspace.bundle(source, f"lora-inputs-{args.arch}", "--lora-inputs")
    if not json.loads((inputs_dir / "manifest.json").read_text())["model"].get("lora_inputs"):
        shutil.rmtree(inputs_dir)  # a cached bundle of that name compiled without them
        inputs_dir = workspace.bundle(source, f"lora-inputs-{args.arch}", "--lora-inputs")
    adapters = inputs_dir.parent / "adapters"
    shutil.rmtree(adapters, ignore_errors=True)
    add_s = []
    for name in ("style", "style2"):
        t0 = time.perf_counter()
        workspace.kiln("lora", "add", str(lora), "--model", inputs_dir.parent.name, "--store",
                       str(inputs_dir.parent.parent), "--name", name)
        add_s.append(time.perf_counter() - t0)

    base_rss = rss()
    fused = load_bundle(BundleRef(fused_dir, Manifest.read(fused_dir)))
    after_fused = rss()
    model = load_bundle(BundleRef(inputs_dir, Manifest.read(inputs_dir)))
    after_inputs = rss()
    assert model.lora is not None and sorted(model.adapters) == ["style", "style2"], model.adapters
    # memory of the adapters: both read again from disk while the loaded ones stay alive (nothing is freed for
    # the allocator to hand back)
    from runtime.adapters import load_adapters

    before_adapters = rss()
    again = load_adapters(adapters, model.lora.shapes)
    adapter_rss = rss() - before_adapters
    assert sorted(again) == ["style", "style2"]
    del again
    adapter_bytes = model.adapters["style"].nbytes

    selections = {"fused bundle": None, "rank 0 (no adapter)": (), f"1 adapter (rank {args.rank})": (("style", 1.0),),
                  f"2 adapters (rank {2 * args.rank})": (("style", 1.0), ("style2", -0.5))}
    switch = {}
    feed_bytes = {}
    for label, sel in selections.items():
        if sel is None:
            continue
        t0 = time.perf_counter()
        feeds = {c: model.lora.feeds(c, sel) for c in ("unet", "text_encoder")}
        switch[label] = time.perf_counter() - t0
        feed_bytes[label] = sum(a.nbytes for f in feeds.values() for a in f.values())

    latent = args.size // 8
    rng = np.random.default_rng(0)
    unet_feed = {"sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32),
                 "timestep": np.array([500.0, 500.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal(
                     (2, 77, int(fused.manifest.model["text_hidden_size"])), dtype=np.float32)}
    te_feed = {"input_ids": np.tile(np.arange(77, dtype=np.int64)[None], (2, 1))}

    def call(component: str, sel, feed):  # type: ignore[no-untyped-def]
        m = fused if sel is None else model
        extra = {} if sel is None else model.lora_feeds(component, sel)
        t0 = time.perf_counter()
        m.sessions[component].run({**feed, **extra})
        return time.perf_counter() - t0

    # warm-up: each variant once (ONNX Runtime plans memory per input shape), then the first call after a switch
    for sel in selections.values():
        call("unet", sel, unet_feed)
        call("text_encoder", sel, te_feed)
    times: dict[str, dict[str, list[float]]] = {c: {k: [] for k in selections} for c in ("unet", "text_encoder")}
    for _ in range(args.repeats):
        for label, sel in selections.items():
            times["unet"][label].append(call("unet", sel, unet_feed))
            times["text_encoder"][label].append(call("text_encoder", sel, te_feed))
    steady = report.median(times["unet"][f"1 adapter (rank {args.rank})"])
    after_switch = []
    for _ in range(args.repeats):  # alternate two selections: every call follows a switch
        after_switch.append(call("unet", selections[f"1 adapter (rank {args.rank})"], unet_feed))
        call("unet", (), unet_feed)

    images = _images(args, fused, model)
    body = _body(args, fused_dir, inputs_dir, lora, add_s, adapter_bytes, adapter_rss, feed_bytes, switch, times,
                 steady, after_switch, images, after_fused - base_rss, after_inputs - after_fused)
    return report.write(args.out or f"lora-{args.arch}", f"Per-request LoRA ({args.arch})", body)


def _images(args: argparse.Namespace, fused, model) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    from proto.kiln.v1 import kiln_pb2 as pb
    from runtime.pipeline import Pipeline
    from runtime.validate import validate

    out = {}
    for label, m, loras in (("fused", fused, []), ("adapter", model, [("style", 1.0)]), ("none", model, [])):
        request = pb.GenerateRequest(model=m.name, prompt="a lighthouse on a cliff at sunset", seed=3, steps=args.steps,
                                     width=args.size, height=args.size, sampler="euler", guidance_scale=7.5,
                                     loras=[pb.LoraSelection(name=n, scale=s) for n, s in loras])
        params = validate(request, m.manifest.defaults, m.manifest.limits, adapters=m.adapters, max_loras=m.max_loras)
        out[label] = Pipeline(m).run(params)[0][0]
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _body(args, fused_dir, inputs_dir, lora, add_s, adapter_bytes, adapter_rss, feed_bytes, switch, times,  # type: ignore[no-untyped-def]
          steady, after_switch, images, fused_rss, inputs_rss) -> str:
    mib = 2**20
    fm = json.loads((fused_dir / "manifest.json").read_text())
    im = json.loads((inputs_dir / "manifest.json").read_text())
    targets = im["model"]["lora_inputs"]["targets"]
    lines = [
        f"Model: `{args.arch}` (random weights: `kiln models init --arch {args.arch}`). LoRA: kohya format, rank "
        f"{args.rank}, random PEFT pairs x {LORA_STRENGTH} over the {targets['unet']} UNet and "
        f"{targets['text_encoder']} text-encoder layers the per-request path covers ({lora.stat().st_size / mib:.1f} "
        "MiB file). Other agents' work shared this 2-core machine during the run: compare the ratios of variants "
        "timed side by side (interleaved), not absolute times across result files.",
        "",
        "## Bundles",
        "",
        report.table(["bundle", "compile s", "UNet Attention / MultiHeadAttention nodes", "UNet MatMul nodes",
                      "process RSS after loading, MiB"], [
            [f"`lora-fused-{args.arch}` (LoRA fused by diffusers before export)", f"{_compile_seconds(fused_dir):.0f}",
             str(fm["components"]["unet"]["op_counts"].get("Attention", 0)
                 + fm["components"]["unet"]["op_counts"].get("MultiHeadAttention", 0)),
             str(fm["components"]["unet"]["op_counts"].get("MatMul", 0)), f"+{fused_rss / mib:.0f}"],
            [f"`lora-inputs-{args.arch}` (`--lora-inputs`)", f"{_compile_seconds(inputs_dir):.0f}",
             str(im["components"]["unet"]["op_counts"].get("Attention", 0)
                 + im["components"]["unet"]["op_counts"].get("MultiHeadAttention", 0)),
             str(im["components"]["unet"]["op_counts"].get("MatMul", 0)), f"+{inputs_rss / mib:.0f}"],
        ]),
        "",
        "## Adapters: adding, memory, switching",
        "",
        f"- `kiln lora add` (a fresh process: imports, the weightless model skeletons, diffusers' loader): "
        f"{report.median(add_s):.1f} s (median of {len(add_s)}).",
        f"- memory per extra adapter: {adapter_bytes / mib:.2f} MiB of arrays (fp32; process RSS grew "
        f"{adapter_rss / mib:.1f} MiB reading both adapters), plus the cached feeds of each selection in use "
        f"(at most {8} kept): " + ", ".join(f"{k}: {v / mib:.2f} MiB" for k, v in feed_bytes.items()) + ".",
        "- switching a selection: building its feeds (cache miss; a hit is a dictionary lookup): "
        + ", ".join(f"{k}: {v * 1e3:.1f} ms" for k, v in switch.items())
        + f". A UNet call right after a switch (alternating rank 0 and rank {args.rank}) took "
        f"{report.median(after_switch):.3f} s vs {steady:.3f} s steady (medians of {args.repeats}).",
        "",
        f"## Call times ({args.size}x{args.size}, batch 2 as with guidance; medians of {args.repeats}, interleaved)",
        "",
    ]
    base_u = report.median(times["unet"]["fused bundle"])
    base_t = report.median(times["text_encoder"]["fused bundle"])
    rows = []
    for label in times["unet"]:
        u, t = report.median(times["unet"][label]), report.median(times["text_encoder"][label])
        rows.append([label, f"{u:.3f}", f"{u / base_u:.2f}x", f"{t * 1e3:.1f}", f"{t / base_t:.2f}x"])
    lines += [report.table(["variant", "UNet call s", "vs fused", "text encoder ms", "vs fused"], rows), ""]
    a, f, n = images["adapter"], images["fused"], images["none"]
    diff = np.abs(a.astype(np.int16) - f.astype(np.int16))
    lines += [
        f"## Images ({args.size}x{args.size}, {args.steps} euler steps, guidance 7.5, seed 3)",
        "",
        report.table(["compared", "PSNR dB", "max abs diff (0-255)", "pixel-identical"], [
            ["adapter `style` at 1.0 vs the fused bundle", f"{psnr(a, f):.1f}", str(int(diff.max())),
             "yes" if not diff.any() else "no"],
            ["no adapter vs the fused bundle (how much the LoRA changes the image)", f"{psnr(n, f):.1f}",
             str(int(np.abs(n.astype(np.int16) - f.astype(np.int16)).max())), "-"],
        ]),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "make-lora":
        make_lora(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    elif sys.argv[1] == "make-fused":
        make_fused(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
