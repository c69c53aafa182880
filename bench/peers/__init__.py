"""Peer pipelines for the `latency` scenario: diffusers (PyTorch), Optimum (ONNX Runtime) and optimum-intel (OpenVINO).

Each measurement runs bench/peers/run_peer.py in a fresh process of the peer's own virtual environment (venvs.py), so
its cold start and peak RSS are its own and its pinned transformers / torch never meet Kiln's. `measure` is the entry
point; `image_diff` compares the images the peers (and Kiln) write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench import workspace
from bench.peers import venvs

RUN_PEER = Path(__file__).with_name("run_peer.py")
ENV_OF = {"openvino-static": "openvino"}
"""Peer pipelines that run in another one's environment, on its export."""
PIPELINES = (*venvs.PIPELINES, *ENV_OF)
LABELS = {"diffusers": "diffusers StableDiffusionPipeline (PyTorch fp32)",
          "optimum": "Optimum ORTStableDiffusionPipeline (ONNX Runtime fp32)",
          "openvino": "optimum-intel OVStableDiffusionPipeline (OpenVINO, default precision)",
          "openvino-static": "optimum-intel OVStableDiffusionPipeline, static image size (`reshape`, as FastSD CPU)"}
"""Row labels for result tables (SDXL's: `label`)."""


def label(pipeline: str, sdxl: bool = False) -> str:
    """A peer's row label; an SDXL model runs through the libraries' XL classes."""
    text = LABELS[pipeline]
    return text.replace("StableDiffusionPipeline", "StableDiffusionXLPipeline") if sdxl else text
PROMPT = "a photograph of an astronaut riding a horse"
"""bench/latency.py's prompt."""


def _say(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def latents(model: Path, size: int, seed: int) -> Path:
    """The starting latents every pipeline shares, as an .npy: drawn from `seed` with numpy exactly as
    bench/latency.py draws Kiln's and diffusers' (`default_rng(seed).standard_normal`, float32)."""
    vae = json.loads((model / "vae" / "config.json").read_text())
    unet = json.loads((model / "unet" / "config.json").read_text())
    f = 2 ** (len(vae["block_out_channels"]) - 1)
    if size % f:
        raise ValueError(f"size={size} must be a multiple of the VAE scale factor {f}")
    shape = (1, unet["in_channels"], size // f, size // f)
    path = workspace.WORK / "peers" / f"latents-{'x'.join(map(str, shape))}-seed{seed}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))
    return path


def _model_fingerprint(model: Path) -> str:
    """Cheap identity of a diffusers folder: every file's path, size and modification time."""
    h = hashlib.sha256(str(model.resolve()).encode())
    for p in sorted(model.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(model)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def exports_dir() -> Path:
    """Where peer exports are cached: $KILN_PEER_EXPORTS if set (e.g. a tmpfs when the disk is short), else
    bench/work/peers/exports. An SD v1 export takes ~4 GB, and the ONNX one ~8 GB while it is being written."""
    env = os.environ.get("KILN_PEER_EXPORTS")
    return Path(env) if env else workspace.WORK / "peers" / "exports"


def export(pipeline: str, model: Path, log: Callable[[str], None] = _say) -> Path:
    """The peer's one-time export of `model` (ONNX for optimum, OpenVINO IR for openvino), made in a process of its
    own and cached in `exports_dir()` per model contents and environment."""
    if pipeline not in venvs.ENVS:
        raise ValueError(f"pipeline={pipeline!r} needs no export; exports exist for {', '.join(venvs.ENVS)}")
    python = venvs.ensure(pipeline, log)
    key = hashlib.sha256((_model_fingerprint(model) + venvs.ENVS[pipeline].key()).encode()).hexdigest()[:12]
    out = exports_dir() / f"{pipeline}-{model.name}-{key}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # torch's ONNX exporter writes a >2 GB UNet as one file per tensor and Optimum then rewrites it as one file, so
    # an ONNX export briefly needs twice the weights; OpenVINO writes its IR once
    need = int((2.2 if pipeline == "optimum" else 1.2) * sum(p.stat().st_size for p in model.rglob("*.safetensors")))
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise RuntimeError(f"exporting {model} for {pipeline} needs about {need / 2**30:.1f} GiB on {out.parent}; "
                           f"{free / 2**30:.1f} GiB is free")
    log_path = out.with_suffix(".log")
    log(f"exporting {model} for {pipeline} into {out} (one time; SD v1: several minutes; log: {log_path})")
    with open(log_path, "w") as err:
        proc = subprocess.run([str(python), str(RUN_PEER), "--pipeline", pipeline, "--model", str(model),
                               "--export-dir", str(out), "--export-only"], stdout=subprocess.PIPE, stderr=err,
                              text=True)
    if proc.returncode:
        raise RuntimeError(f"{pipeline} export of {model} failed (exit {proc.returncode}):\n{_tail(log_path)}")
    log(f"exported: {proc.stdout.strip()}")
    return out


def prefetch(folder: Path) -> None:
    """Read every file under `folder` once, so a cold start finds the weights in the OS page cache whatever ran
    before (another benchmark's GBs may have evicted them): cold start then measures the software, not the disk."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def measure(pipeline: str, model: Path, size: int = 512, steps: int = 4, guidance: float = 7.5, seed: int = 1,
            repeats: int = 3, threads: int = 2, prompt: str = PROMPT, log: Callable[[str], None] = _say,
            sampler: str = "euler") -> dict:
    """Cold start, warm latencies and peak RSS of one peer pipeline on `model` (a local diffusers SD folder), measured
    in a fresh process: makes the peer's environment and export first if needed (neither is part of the cold start).

    The cold start is process start to first image with the weights in the OS page cache (`prefetch`).
    Returns run_peer.py's JSON: cold_start_s and its phases, warm_s (one per repeat), median_warm_s, peak_rss_bytes,
    precision, loadavg_1m, versions, and image: the first image as a PNG (for `image_diff`)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline={pipeline!r} is not one of {', '.join(PIPELINES)}")
    model = Path(model).resolve()
    env = ENV_OF.get(pipeline, pipeline)
    python = venvs.ensure(env, log)
    export_args = ["--export-dir", str(export(env, model, log))] if env in venvs.ENVS else []
    runs = workspace.WORK / "peers" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    out = runs / f"{pipeline}-{model.name}-{size}px-{steps}steps-{sampler}-seed{seed}.json"
    out.unlink(missing_ok=True)
    log_path = out.with_suffix(".log")
    cmd = [str(python), str(RUN_PEER), "--pipeline", pipeline, "--model", str(model), *export_args,
           "--size", str(size), "--steps", str(steps), "--guidance", str(guidance), "--sampler", sampler,
           "--seed", str(seed),
           "--latents", str(latents(model, size, seed)), "--repeats", str(repeats), "--threads", str(threads),
           "--prompt", prompt, "--out", str(out)]
    log(f"measuring {pipeline}: {size}x{size}, {steps} steps, 1 cold + {repeats} warm runs")
    prefetch(Path(export_args[1]) if export_args else model)
    with open(log_path, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err)
    if proc.returncode or not out.exists():
        raise RuntimeError(f"{pipeline} peer run failed (exit {proc.returncode}): {' '.join(cmd)}\n{_tail(log_path)}")
    result = json.loads(out.read_text())
    result["command"] = cmd
    return result


def image_diff(a: str | Path, b: str | Path) -> tuple[int, float]:
    """Max and mean absolute pixel difference (0-255) between two same-sized images."""
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {a} is {x.shape}, {b} is {y.shape}")
    d = np.abs(x - y)
    return int(d.max()), float(d.mean())
