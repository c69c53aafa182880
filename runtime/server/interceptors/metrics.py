"""Metrics: counts and times every Generate call from its events (Started, Artifact timings) and its outcome, and
every refusal of any Kiln call by its reason. Sits just inside the error interceptor, so it sees the KilnError
each refusal raises (with its reason) before it becomes a status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc

from runtime.errors import KilnError
from runtime.server.context import ACCOUNT
from runtime.server.interceptors.base import KILN_PREFIX, Streaming, Unary, wrap_handler
from runtime.server.metrics import Metrics


def _mode(request: Any) -> str:
    if not getattr(request, "init_image", b""):
        return "text_to_image"
    return "inpaint" if request.mask_image else "img2img"


def _reason(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(error, KilnError):
        return str(getattr(error, "reason", "") or error.code.name)
    return "INTERNAL"


def _status(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return error.code.name if isinstance(error, KilnError) else "INTERNAL"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, served: Callable[[str], bool]):
        self.metrics = metrics
        self.served = served
        """Whether a model name is served: other names (a client's typo) are labelled "unknown", so a client
        cannot grow the label set."""

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        m = self.metrics
        if not details.method.startswith(KILN_PREFIX):
            return handler

        def unary(behaviour: Unary) -> Unary:
            async def run(request, context):  # type: ignore[no-untyped-def]
                try:
                    return await behaviour(request, context)
                except BaseException as e:
                    m.refused.labels(_reason(e)).inc()
                    raise

            return run

        def streaming(behaviour: Streaming) -> Streaming:
            async def run(request, context):  # type: ignore[no-untyped-def]
                t0 = time.perf_counter()
                model = request.model if self.served(request.model) else "unknown"
                mode, started, images = _mode(request), None, 0
                try:
                    async for response in behaviour(request, context):
                        kind = response.WhichOneof("event")
                        if kind == "started":
                            started, mode = response.started, response.started.mode or mode
                        elif kind == "artifact":
                            images += 1
                            if images == 1:
                                for t in response.artifact.timings:
                                    m.stage_seconds.labels(model, t.stage).observe(t.seconds)
                        yield response
                except BaseException as e:
                    m.requests.labels(model, mode, _status(e)).inc()
                    m.refused.labels(_reason(e)).inc()
                    raise
                m.requests.labels(model, mode, "OK").inc()
                m.request_seconds.labels(model, mode).observe(time.perf_counter() - t0)
                m.images.labels(model).inc(images)
                if started is not None:
                    m.steps.labels(model).inc(started.denoising_steps or started.steps)
                    account = ACCOUNT.get()
                    if started.cost and account is not None:
                        m.credits.labels(account.tier.name).inc(started.cost)

            return run

        return wrap_handler(handler, unary, streaming)
