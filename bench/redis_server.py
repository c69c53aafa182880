"""A real `redis-server` for tests and benchmarks: its own port, no persistence, stopped afterwards."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """`tls=(cert, key, ca)`: TLS only (no plaintext port); `url` is then `rediss://...?ssl_ca_certs=CA`."""

    def __init__(self, workdir: Path, tls: tuple[Path, Path, Path] | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.tls = tls
        self.url = f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={tls[2]}" if tls else \
            f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        ports = ["--port", str(self.port)]
        if self.tls:
            cert, key, ca = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert), "--tls-key-file",
                     str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if self.tls:  # listening; the ledger's own TLS handshake is the real check
                        return self
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
