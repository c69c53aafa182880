"""Gateway fixtures: a real `kiln gateway` process on loopback in front of a real `kiln serve` (the tiny model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.workspace import wait_gateway
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
    """`bench.workspace.wait_gateway`, failing the test with the gateway's log."""
    try:
        wait_gateway(url, proc, timeout)
    except (RuntimeError, TimeoutError) as e:
        proc.kill()
        raise AssertionError(f"{e}:\n{log_path.read_text()}") from None


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
