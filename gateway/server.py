"""Running the gateway: `kiln gateway` (its own process, in front of any Kiln gRPC server) or beside
`kiln serve` in the same event loop (`--gateway-port`, for a single box)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig

log = logging.getLogger("kiln.gateway")


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
            lifespan="on", timeout_graceful_shutdown=10))
        self.port = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
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
