"""Running the gateway: `kiln gateway` (its own process, in front of any Kiln gRPC server) or beside
`kiln serve` in the same event loop (`--gateway-port`, for a single box)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import Iterator

import grpc
import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from proto.kiln.v1 import kiln_pb2 as pb

log = logging.getLogger("kiln.gateway")


class Exposed(Exception):
    """The gateway would serve openly on the network."""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Uvicorn(uvicorn.Server):
    """uvicorn that leaves signals to its caller (`kiln serve` stops the gRPC server and the gateway together)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayServer:
    """uvicorn serving the gateway app; `start()` returns once the port is bound (the bound port in `.port`)."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.app = create_app(config)
        self.server = _Uvicorn(uvicorn.Config(
            self.app, host=config.host, port=config.port, log_level="warning", access_log=False,
            lifespan="on", timeout_graceful_shutdown=10, log_config=None))  # logs go through kiln's handlers
        self.port = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        await self._check_exposure()
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises the bind error
                raise OSError(f"the gateway could not bind {self.config.host}:{self.config.port}")
            await asyncio.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        log.info("gateway on http://%s:%d (AUTOMATIC1111 /sdapi/v1, OpenAI /v1/images, SSE /v1/generate, web "
                 "page /, docs /docs) -> gRPC %s", self.config.host, self.port, self.config.target)
        return self.port

    async def _check_exposure(self) -> None:
        """A gateway on a non-loopback address in front of a server without accounts would hand out free
        generations: refused unless `insecure_open`, as `kiln serve` refuses such a --host."""
        if _is_loopback(self.config.host) or self.config.insecure_open:
            return
        upstream = self.app.state.gateway.upstream
        try:
            await upstream.stub.GetBalance(pb.GetBalanceRequest(), timeout=10)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                return  # the server requires API keys: the gateway passes them through
            why = ("serves without accounts (no --auth-db)" if e.code() == grpc.StatusCode.FAILED_PRECONDITION
                   else f"could not be asked whether it requires API keys ({e.code().name})")
            raise Exposed(f"host={self.config.host!r} is not a loopback address and the gRPC server at "
                          f"{self.config.target} {why}: anyone who can reach the gateway could generate for free. "
                          "Start the server with --auth-db, or give --insecure-open to serve openly on purpose") \
                from None

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task:
            await self._task


async def serve(config: GatewayConfig) -> int:
    """`kiln gateway`: run until SIGTERM or SIGINT."""
    server = GatewayServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    return 0
