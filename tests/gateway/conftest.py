"""Gateway fixtures: a real `kiln gateway` process on loopback in front of a real `kiln serve` (the tiny model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess, free_port


@dataclass
class GatewayProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"gateway not healthy after {timeout}s:\n{log_path.read_text()}")


def start_gateway(target: str, log_path: Path, *extra: str) -> GatewayProcess:
    """`kiln gateway --target TARGET` on a free loopback port, healthy (its gRPC server SERVING) on return."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "gateway", "--target", target, "--port", str(port),
                                 *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_http(url, proc, log_path)
    return GatewayProcess(proc, url, log_path)


@pytest.fixture(scope="session")
def gateway(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway in front of the session's tiny-model server (no accounts), CORS open to one test origin."""
    g = start_gateway(server.target, tmp_path_factory.mktemp("gateway") / "gateway.log",
                      "--cors-allow-origins", "http://app.example")
    yield g
    g.stop()
