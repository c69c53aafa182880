"""Tracing: one SERVER span per Kiln call (`kiln.Generate`, ...), continuing the caller's W3C trace context
(`traceparent` metadata), current while the call runs, so the checks' spans and the engine's stage spans are its
children. Sits just inside the error interceptor: it sees each refusal's KilnError (status and reason)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from runtime.server.context import REQUEST_ID
from runtime.server.interceptors.base import KILN_PREFIX, Streaming, Unary, text_metadata, wrap_handler
from runtime.server.tracing import TRACER, Tracing, fail


class TraceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tracing: Tracing):
        self.tracer = tracing.tracer

    @contextlib.contextmanager
    def _traced(self, method: str, metadata: dict[str, str]) -> Iterator[None]:
        span = self.tracer.start_span(f"kiln.{method}", propagate.extract(metadata), SpanKind.SERVER, attributes={
            "rpc.system": "grpc", "rpc.service": "kiln.v1.Kiln", "rpc.method": method,
            "kiln.request_id": REQUEST_ID.get()})
        TRACER.set(self.tracer)
        with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
            try:
                yield
            except BaseException as e:
                fail(span, e)
                raise

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        if not details.method.startswith(KILN_PREFIX):
            return handler
        method = details.method.removeprefix(KILN_PREFIX)
        metadata = text_metadata(details)

        def unary(behaviour: Unary) -> Unary:
            async def run(request, context):  # type: ignore[no-untyped-def]
                with self._traced(method, metadata):
                    return await behaviour(request, context)

            return run

        def streaming(behaviour: Streaming) -> Streaming:
            async def run(request, context):  # type: ignore[no-untyped-def]
                with self._traced(method, metadata):
                    async for response in behaviour(request, context):
                        yield response

            return run

        return wrap_handler(handler, unary, streaming)
