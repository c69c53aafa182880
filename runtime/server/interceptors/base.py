"""Wrap an RPC handler's behaviour for unary and server-streaming methods alike."""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from runtime.server.tracing import check_span

Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Streaming = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
KILN_PREFIX = "/kiln.v1.Kiln/"
"""Methods of the Kiln service; health checks and reflection are not Kiln methods."""


def wrap_handler(
    handler: grpc.RpcMethodHandler | None,
    unary: Callable[[Unary], Unary],
    streaming: Callable[[Streaming], Streaming],
) -> grpc.RpcMethodHandler | None:
    """A copy of `handler` whose unary-unary or unary-stream behaviour is wrapped."""
    if handler is None:
        return None
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kw)
    return handler  # client-streaming methods: none in kiln.v1


def text_metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    """The call's text metadata (binary `-bin` entries left out)."""
    return {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}


Check = Callable[[str, Any, dict[str, str]], Awaitable[None]]
"""(method, request, invocation metadata) -> None, raising a KilnError to refuse the call."""


class CheckInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor whose whole job is one check before a Kiln method runs (auth, rate, tier limits). In a traced
    call the check is a span of its own (`kiln.auth`, `kiln.rate`, `kiln.tier_limits`: the subclass's name)."""

    async def check(self, method: str, request: Any, metadata: dict[str, str]) -> None:
        raise NotImplementedError

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        method = details.method
        if not method.startswith(KILN_PREFIX):
            return handler
        metadata = text_metadata(details)
        span = _span_name(type(self).__name__)

        async def check(method: str, request: Any, metadata: dict[str, str]) -> None:
            with check_span(span):
                await self.check(method, request, metadata)

        def unary(behaviour: Unary) -> Unary:
            async def run(request, context):  # type: ignore[no-untyped-def]
                await check(method, request, metadata)
                return await behaviour(request, context)

            return run

        def streaming(behaviour: Streaming) -> Streaming:
            async def run(request, context):  # type: ignore[no-untyped-def]
                await check(method, request, metadata)
                async for response in behaviour(request, context):
                    yield response

            return run

        return wrap_handler(handler, unary, streaming)


@functools.cache
def _span_name(cls: str) -> str:
    """AuthInterceptor -> kiln.auth, TierLimitsInterceptor -> kiln.tier_limits."""
    return "kiln." + re.sub(r"(?<!^)(?=[A-Z])", "_", cls.removesuffix("Interceptor")).lower()
