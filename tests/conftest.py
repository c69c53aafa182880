"""Shared fixtures: a tiny random model, its compiled bundle, and real `kiln serve` processes on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def hash_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Servers the tests start remember verified bundle hashes here, not in the user's ~/.cache/kiln."""
    path = tmp_path_factory.mktemp("kiln-cache")
    os.environ["KILN_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from compiler.source import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_store(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from compiler.compile import compile_model
    from compiler.config import CompileConfig

    store = tmp_path_factory.mktemp("store")
    compile_model(tiny_source, store, CompileConfig(name="tiny"), progress=False)
    return store


@pytest.fixture(scope="session")
def tiny_sdxl_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SDXL design at tiny size: two text encoders, text_time added conditioning, SDXL's VAE scaling."""
    from compiler.source import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", "tiny-sdxl", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_sdxl_store(tiny_sdxl_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from compiler.compile import compile_model
    from compiler.config import CompileConfig

    store = tmp_path_factory.mktemp("sdxl-store")
    compile_model(tiny_sdxl_source, store, CompileConfig(name="tiny-sdxl"), progress=False)
    return store


@pytest.fixture(scope="session")
def tiny_sdxl_model(tiny_sdxl_store: Path):  # type: ignore[no-untyped-def]
    from model_store import Store
    from runtime.model import load_bundle

    return load_bundle(Store(tiny_sdxl_store).latest("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_store: Path) -> Path:
    from model_store import Store

    return Store(tiny_store).latest("tiny").path


@pytest.fixture(scope="session")
def tiny_model(tiny_bundle: Path):  # type: ignore[no-untyped-def]
    from model_store import BundleRef, Manifest
    from runtime.model import load_bundle

    return load_bundle(BundleRef(tiny_bundle, Manifest.read(tiny_bundle)))


@pytest.fixture(scope="session")
def lora_files(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real-format LoRA files for the tiny model (tests/lora_files.py): `peft`, `kohya`, and two that must be
    refused: `locon` (a 3x3 conv layer) and `foreign` (a layer the tiny UNet lacks)."""
    from tests import lora_files as lf

    d = tmp_path_factory.mktemp("loras")
    kohya = lf.write_kohya(tiny_source, d / "kohya_style.safetensors")
    return {
        "peft": lf.write_peft(tiny_source, d / "peft"),
        "kohya": kohya,
        "locon": lf.write_kohya(tiny_source, d / "locon.safetensors", unet_targets=["to_q", "conv1"], text=False),
        "foreign": lf.write_foreign(kohya, d / "foreign.safetensors"),
    }


@pytest.fixture(scope="session")
def lora_store(tiny_source: Path, lora_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with `tiny-lora`, the tiny model compiled with --lora-inputs, and adapters `kohya` and `peft`."""
    from compiler.adapters import add_adapter
    from compiler.compile import compile_model
    from compiler.config import CompileConfig

    store = tmp_path_factory.mktemp("lora-store")
    compile_model(tiny_source, store, CompileConfig(name="tiny-lora", lora_inputs=True, max_loras=2), progress=False)
    for name in ("kohya", "peft"):
        add_adapter(lora_files[name], store, "tiny-lora", name)
    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    target: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in server log after {timeout}s:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def start_server(store: Path, log_path: Path, *extra: str) -> ServerProcess:
    from runtime.client import wait_ready

    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--store", str(store), "--port", str(port), *extra],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = ServerProcess(proc, f"127.0.0.1:{port}", log_path)
    try:
        wait_ready(server.target, timeout=60)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"server did not become ready:\n{server.log()}") from None
    return server


@pytest.fixture(scope="session")
def server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(tiny_store, tmp_path_factory.mktemp("server") / "serve.log")
    yield s
    s.stop()


def kiln(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `kiln` CLI as a user would."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


REDIS_MISSING = "redis-server is not installed here"
"""The skip reason of every Redis test on a machine without redis-server; the run's end counts them."""


@contextmanager
def redis_url(workdir: Path) -> Iterator[str]:
    """The URL of a real `redis-server` started for the test. Where none is installed: a failure when
    KILN_REQUIRE_REDIS is set (`make test` sets it once redis-server is there, after installing it if it can),
    else a skip that the end of the run reports in a banner (`pytest_unconfigure` below)."""
    if shutil.which("redis-server") is None:
        if os.environ.get("KILN_REQUIRE_REDIS"):
            pytest.fail("redis-server is missing and KILN_REQUIRE_REDIS is set; Debian: apt-get install redis-server")
        pytest.skip(REDIS_MISSING)
    from bench.redis_server import RedisServer

    with RedisServer(workdir) as server:
        yield server.url


@pytest.fixture(params=["sqlite", "redis"])
def auth_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A ledger URL for each backend: a SQLite file, and a real Redis server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'auth.db'}"
    else:
        with redis_url(tmp_path) as url:
            yield url


def pytest_report_header(config: pytest.Config) -> str:
    found = shutil.which("redis-server")
    if found:
        required = " (required: KILN_REQUIRE_REDIS)" if os.environ.get("KILN_REQUIRE_REDIS") else ""
        return f"redis-server: {found}{required}"
    return "redis-server: NOT INSTALLED, the Redis ledger and multi-replica tests will skip (banner at the end)"


def untested_banner(config: pytest.Config, reason: str, title: str, lines: tuple[str, ...]) -> None:
    """A banner after the run's last line when tests skipped with `reason`: `-ra` lists the skips among the
    others, and a passing run that never tried a claim must not look like one that proved it."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = [r for r in reporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and r.longrepr[2].endswith(reason)]
    if not skipped:
        return
    reporter.write_sep("!", title, red=True, bold=True)
    for line in (f"{len(skipped)} test(s) skipped: {lines[0]}", *lines[1:]):
        reporter.write_line(line, red=True, bold=True)
    reporter.write_sep("!", red=True, bold=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    untested_banner(config, REDIS_MISSING, "THE MULTI-REPLICA REDIS CLAIM WENT UNTESTED", (
        "redis-server is not installed, so the Redis ledger",
        "(`--auth-db redis://`) and replicas sharing one Redis (no overdraw, holds, rates, clock)",
        "were NOT tested. Install it (Debian: sudo apt-get install redis-server) and run",
        "`make test` again: it requires Redis once installed, and CI (.ci/run) always does.",
    ))


@dataclass
class VaeFiles:
    """Real VAE files for the VAE-swap and tiny-decoder tests (tests/compiler/vae_files.py writes them)."""

    taesd: Path
    """A diffusers AutoencoderTiny folder (TAESD design, small channels) for the tiny model's latents."""
    kl_folder: Path
    """A diffusers AutoencoderKL folder with the tiny model's VAE config and other weights (fp16-representable)."""
    kl_single: Path
    """The same weights as one fp16 .safetensors in the original layout, under `first_stage_model.`."""
    with_vae: Path
    """The tiny model as a diffusers folder that already has `kl_folder` as its VAE."""


@pytest.fixture(scope="session")
def vae_files(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> VaeFiles:
    import torch

    from tests.compiler.vae_files import tiny_vae_config, write_kl, write_single_file, write_taesd

    root = tmp_path_factory.mktemp("vae-files")
    taesd = write_taesd(root / "taesd", seed=3)
    kl = write_kl(root / "kl-fp32", tiny_vae_config(tiny_source), seed=7)
    with torch.no_grad():  # most shared VAE files are fp16: weights that survive the round trip exactly
        for p in kl.parameters():
            p.copy_(p.half().float())
    kl.save_pretrained(root / "kl", safe_serialization=True)
    single = write_single_file(root / "kl.safetensors", kl, prefix="first_stage_model.", dtype=torch.float16)
    with_vae = root / "tiny-with-kl"
    shutil.copytree(tiny_source, with_vae)
    shutil.rmtree(with_vae / "vae")
    shutil.copytree(root / "kl", with_vae / "vae")
    return VaeFiles(taesd, root / "kl", single, with_vae)


@pytest.fixture(scope="session")
def vae_store(tiny_source: Path, vae_files: VaeFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with `swapped` (the tiny model, --vae the single file, --tiny-decoder TAESD), `with-vae` (the
    folder that already has that VAE) and `taesd` (the tiny model with TAESD as its only VAE)."""
    from compiler.compile import compile_model
    from compiler.config import CompileConfig
    from compiler.source.options import SourceOptions

    store = tmp_path_factory.mktemp("vae-store")
    compile_model(tiny_source, store, CompileConfig(name="swapped"), progress=False,
                  options=SourceOptions(vae=str(vae_files.kl_single), tiny_decoder=str(vae_files.taesd)))
    compile_model(vae_files.with_vae, store, CompileConfig(name="with-vae"), progress=False)
    compile_model(tiny_source, store, CompileConfig(name="taesd"), progress=False,
                  options=SourceOptions(vae=str(vae_files.taesd)))
    return store


def load_latest(store: Path, name: str):  # type: ignore[no-untyped-def]
    """The latest bundle `name` in `store`, verified and loaded as the server would."""
    from model_store import Store
    from runtime.model import load_bundle

    return load_bundle(Store(store).latest(name))


def publish_copy(bundle: Path, store: Path, name: str, version: str) -> Path:
    """Publish a copy of `bundle` as `name` version `version` (now), the way `kiln compile` publishes: built in a
    hidden staging folder of the store, then renamed into place. The manifest's files are unchanged, so it verifies."""
    import json
    from datetime import UTC, datetime

    from model_store.store import TMP_PREFIX

    staging = store / name / f"{TMP_PREFIX}{version}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    manifest.update(name=name, version=version, created_at=datetime.now(UTC).isoformat())
    (staging / "manifest.json").write_text(json.dumps(manifest))
    final = store / name / version
    staging.rename(final)
    return final


@pytest.fixture(scope="session")
def three_models(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with models a, b and c (copies of the tiny bundle, version v1), for the model pool's tests."""
    store = tmp_path_factory.mktemp("three-models")
    for name in "abc":
        publish_copy(tiny_bundle, store, name, "v1")
    return store
