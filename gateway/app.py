"""The gateway's ASGI app: routes, CORS, the body-size limit, and one error shape for every refusal."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import GatewayConfig
from gateway.context import Gateway
from gateway.errors import ApiError, from_validation, internal
from gateway.upstream import Upstream, tls_credentials

log = logging.getLogger("kiln.gateway")
WEB = Path(__file__).parent / "web"


def create_app(config: GatewayConfig, upstream: Upstream | None = None) -> FastAPI:
    from gateway import a1111, kiln_api, openai_images

    if upstream is None:
        tls = tls_credentials(config.target_tls_ca, config.target_tls_cert, config.target_tls_key) \
            if config.target_tls_ca else None
        upstream = Upstream(config.target, config.timeout_s, config.models_ttl_s, tls)
    gw = Gateway(config, upstream)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await gw.upstream.close()

    app = FastAPI(title="Kiln gateway", version="1", lifespan=lifespan,
                  description="AUTOMATIC1111's /sdapi/v1 API, OpenAI's Images API and Kiln's own JSON/SSE API, "
                              f"in front of the Kiln gRPC server at {config.target}.")
    app.state.gateway = gw

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return render(e, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return await _api_error(request, from_validation(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if isinstance(e.__cause__, ApiError):  # BodyLimit's 413 for a streamed body, which FastAPI wraps in a 400
            return await _api_error(request, e.__cause__)
        if e.status_code == 400:  # FastAPI's "error parsing the body": JSON that is not UTF-8, or nested too deep
            text = f"body: {e.detail} (JSON must be UTF-8 and nested at most a few hundred levels deep)"
            return await _api_error(request, ApiError(400, "INVALID_ARGUMENT", text, [("body", text)]))
        return await _api_error(request, ApiError(e.status_code, "NOT_FOUND" if e.status_code == 404 else "HTTP",
                                                  str(e.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        rid = uuid.uuid4().hex[:16]
        log.exception("request %s %s %s: internal gateway error", rid, request.method, request.url.path, exc_info=e)
        return await _api_error(request, internal(rid))

    app.include_router(kiln_api.router)
    app.include_router(a1111.router)
    app.include_router(openai_images.router)
    if (WEB / "index.html").exists():
        app.mount("/", StaticFiles(directory=WEB, html=True), name="web")
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id", "x-credits-remaining",
                                                                "x-credits-cost", "x-credits-reset", "retry-after"])
    return app


def render(e: ApiError, path: str) -> JSONResponse:
    """The refusal in the shape of the route it answers: OpenAI's error object under /v1/images, else Kiln's."""
    body = e.openai_body() if path.startswith("/v1/images") else e.body()
    return JSONResponse(body, status_code=e.status, headers=e.headers)


class BodyLimit:
    """413 with the JSON error body for a request body over `max_bytes`, by Content-Length or as it streams."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, int(length))
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, "INVALID_ARGUMENT", self._message(seen), [("body", self._message(seen))])
            return message

        await self.app(scope, counted, send)

    def _message(self, size: int) -> str:
        return f"the request body has {size} bytes or more; at most {self.max_bytes} are accepted"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        e = ApiError(413, "INVALID_ARGUMENT", self._message(size), [("body", self._message(size))],
                     headers={"Connection": "close"})
        await render(e, scope.get("path", ""))(scope, receive, send)
