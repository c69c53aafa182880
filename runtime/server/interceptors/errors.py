"""Exceptions -> gRPC status with google.rpc details; every RPC gets a request id (x-request-id) and the
metadata the other interceptors collected (`context.RESPONSE_METADATA`) in its trailers."""

from __future__ import annotations

import logging

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from runtime.errors import DOMAIN, KilnError
from runtime.server.context import REQUEST_ID, RESPONSE_METADATA
from runtime.server.interceptors.base import Streaming, Unary, wrap_handler
from runtime.validate import REQUEST_ID_RE, new_request_id

log = logging.getLogger("kiln.errors")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        sent = dict(details.invocation_metadata or ())
        method = details.method

        def start(request, context: grpc.aio.ServicerContext) -> None:  # type: ignore[no-untyped-def]
            # the request's own request_id field, else x-request-id metadata, else a new one
            rid = getattr(request, "request_id", "") or sent.get("x-request-id", "")
            rid = rid if isinstance(rid, str) and REQUEST_ID_RE.match(rid) else new_request_id()
            REQUEST_ID.set(rid)
            RESPONSE_METADATA.set({})
            context.set_trailing_metadata((("x-request-id", rid),))

        def finish(context: grpc.aio.ServicerContext) -> None:
            context.set_trailing_metadata((("x-request-id", REQUEST_ID.get()), *(RESPONSE_METADATA.get() or {}).items()))

        def unary(behaviour: Unary) -> Unary:
            async def run(request, context):  # type: ignore[no-untyped-def]
                start(request, context)
                try:
                    out = await behaviour(request, context)
                except Exception as e:
                    await _abort(context, e, method)
                finish(context)
                return out

            return run

        def streaming(behaviour: Streaming) -> Streaming:
            async def run(request, context):  # type: ignore[no-untyped-def]
                start(request, context)
                try:
                    async for response in behaviour(request, context):
                        yield response
                except Exception as e:
                    await _abort(context, e, method)
                finish(context)

            return run

        return wrap_handler(handler, unary, streaming)


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    rid = REQUEST_ID.get() or new_request_id()
    if isinstance(error, grpc.aio.AbortError):
        raise error  # the servicer already chose a status
    if isinstance(error, KilnError):
        log.info("request %s %s: %s: %s", rid, method, error.code.name, error)
        status = error.to_status()
    else:
        log.exception("request %s %s: internal error", rid, method, exc_info=error)
        info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN, metadata={"request_id": rid})
        status = status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error; request id {rid}")
        status.details.add().Pack(info)
    grpc_status = rpc_status.to_status(status)
    extra = tuple((RESPONSE_METADATA.get() or {}).items())
    await context.abort(grpc_status.code, grpc_status.details,
                        (*grpc_status.trailing_metadata, ("x-request-id", rid), *extra))
