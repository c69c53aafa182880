"""Scratch models and bundles for benchmarks, cached under bench/work/ (git-ignored).

Models are made and compiled in child processes with the `kiln` CLI, so the benchmark process
does not carry the compiler's memory into its measurements.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WORK = Path(os.environ.get("KILN_BENCH_WORK", Path(__file__).parent / "work"))
"""Scratch folder (models, bundles); tests point it at a temporary folder."""
ROOT = Path(__file__).parent.parent
PIDS: dict[str, int] = {}
"""The process serving each running `server()` target and `gateway()` URL (for benches that report CPU time)."""


def kiln(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, check=True)


def source_model(arch: str | None, source: str | None, seed: int = 0) -> Path:
    """A local diffusers folder: `source` as given, a random-weight `arch` model made once and cached, or a
    shipped trained `arch` copied afresh."""
    if source:
        return Path(source)
    from compiler.source.init import TRAINED_ARCHS

    path = WORK / "models" / f"{arch}-seed{seed}"
    if arch in TRAINED_ARCHS and path.exists():  # copied afresh (cheap): the shipped weights may have changed
        shutil.rmtree(path)
    if not (path / "model_index.json").exists():
        kiln("models", "init", str(path), "--arch", str(arch), "--seed", str(seed))
    return path


def tiny_decoder(source: Path, seed: int = 0) -> Path:
    """A diffusers AutoencoderTiny folder (TAESD's architecture, diffusers' defaults, with as many blocks as `source`'s
    VAE has, so it fits its latents) with random weights, made once in a child process and cached: what `kiln compile
    --tiny-decoder` takes. Its speed is TAESD's; its images are noise."""
    vae = json.loads((source / "vae" / "config.json").read_text())
    blocks, channels = len(vae["block_out_channels"]), int(vae.get("latent_channels", 4))
    path = WORK / "models" / f"taesd-random-{blocks}blocks-{channels}ch-seed{seed}"
    if not (path / "config.json").exists():
        config = {"latent_channels": channels, "encoder_block_out_channels": [64] * blocks,
                  "decoder_block_out_channels": [64] * blocks, "num_encoder_blocks": [1] + [3] * (blocks - 1),
                  "num_decoder_blocks": [3] * (blocks - 1) + [1]}
        code = ("import json, sys, torch; from diffusers import AutoencoderTiny; torch.manual_seed(int(sys.argv[2])); "
                "AutoencoderTiny(**json.loads(sys.argv[3])).save_pretrained(sys.argv[1])")
        subprocess.run([sys.executable, "-c", code, str(path), str(seed), json.dumps(config)], cwd=ROOT, check=True)
    return path


def bundle(source: Path, name: str, *compile_args: str) -> Path:
    """The latest bundle called `name` compiled from `source` with `compile_args` (e.g. `--precision int8`),
    compiling one if there is none (or the cached one came from another source, another precision or another
    exporter: Kiln's export code or the torch / onnx / onnxruntime versions)."""
    from compiler.reuse import exporter_identity, recorded_versions
    from compiler.source import load_source
    from model_store import ManifestError, Store

    store = Store(WORK / "store")
    def arg(flag: str, default: str) -> str:
        return compile_args[compile_args.index(flag) + 1] if flag in compile_args else default

    precision = arg("--precision", "fp32")
    tome, slicing = float(arg("--tome", "0")), arg("--attention-slicing", "off")
    tiny = "--tiny-decoder" in compile_args
    try:
        ref = store.latest(name)
        if (ref.manifest.source["path"] == str(source.resolve())
                and ref.manifest.source["sha256"] == load_source(source).content_hash()
                and ref.manifest.compile_config.get("precision", "fp32") == precision
                and ref.manifest.compile_config.get("tome", 0.0) == tome
                and ref.manifest.compile_config.get("attention_slicing", "off") == slicing
                and ("vae_decoder_tiny" in ref.manifest.components) == tiny
                and ref.manifest.tool_versions == recorded_versions(
                    exporter_identity(ref.manifest.opset, bool(ref.manifest.compile_config["fusions"])),
                    precision != "fp32")):
            return ref.path
    except ManifestError:
        pass
    kiln("compile", str(source), "--name", name, "--store", str(store.root), *compile_args)
    return store.latest(name).path


@contextmanager
def server(*bundle_dirs: Path, timeout: float = 600, extra: tuple[str, ...] = (),
           log: Path | None = None) -> Iterator[str]:
    """`kiln serve` on a free loopback port over a store holding only `bundle_dirs` (links to them, so a scratch
    store full of other bundles, e.g. SD v1 ones, is not loaded too); yields its target. `log`: a file its stderr
    (its log lines) is appended to, else discarded."""
    import tempfile

    from runtime.client import wait_ready

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK, prefix="serve-") as tmp:
        for b in bundle_dirs:
            (Path(tmp) / b.parent.name).mkdir(exist_ok=True)
            (Path(tmp) / b.parent.name / b.name).symlink_to(b.resolve(), target_is_directory=True)
        stderr = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (closed below)
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--store", tmp, "--port", str(port), *extra],
                                stderr=stderr, cwd=ROOT)
        target = f"127.0.0.1:{port}"
        PIDS[target] = proc.pid
        try:
            wait_ready(target, timeout=timeout)
            yield target
        finally:
            PIDS.pop(target, None)
            proc.terminate()
            proc.wait(60)
            if log is not None:
                stderr.close()  # type: ignore[union-attr]


def wait_gateway(url: str, proc: subprocess.Popen, timeout: float) -> None:  # type: ignore[type-arg]
    """Until the gateway at `url` answers `/healthz` 200 (its gRPC server SERVING); RuntimeError if its process
    exits first, TimeoutError after `timeout` seconds."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"kiln gateway exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"kiln gateway not healthy after {timeout}s")
        time.sleep(0.1)


@contextmanager
def gateway(target: str, *extra: str, timeout: float = 120) -> Iterator[str]:
    """`kiln gateway --target TARGET` on a free loopback port, its own process; yields its URL once `/healthz`
    answers 200 (the gRPC server SERVING)."""

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "gateway", "--target", target, "--port", str(port),
                             *extra], stderr=subprocess.DEVNULL, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    PIDS[url] = proc.pid
    try:
        wait_gateway(url, proc, timeout)
        yield url
    finally:
        PIDS.pop(url, None)
        proc.terminate()
        proc.wait(60)
