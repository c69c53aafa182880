"""What every route needs, built once per app: the config, the upstream gRPC client and the job table."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from opentelemetry import propagate, trace

from gateway.auth import api_key, client_id
from gateway.config import GatewayConfig
from gateway.errors import no_models, rpc_errors
from gateway.image_store import ImageStore
from gateway.jobs import Jobs, preview_every
from gateway.upstream import NoModels, Upstream, key_metadata
from proto.kiln.v1 import kiln_pb2 as pb

MAX_CLIENTS = 100_000
"""Most clients whose model choice the gateway remembers (least recently chosen forgotten first)."""


@dataclass
class Gateway:
    config: GatewayConfig
    upstream: Upstream
    jobs: Jobs = field(default_factory=Jobs)
    checkpoints: OrderedDict[str, str] = field(default_factory=OrderedDict)
    """Per client: the model `POST /sdapi/v1/options` chose (`sd_model_checkpoint`), the most recent
    MAX_CLIENTS choices kept."""

    images: ImageStore = field(init=False)
    """The PNGs behind OpenAI `response_format=url` answers."""

    def __post_init__(self) -> None:
        self.images = ImageStore(self.config.image_store_bytes, self.config.image_url_ttl_s)

    def choose(self, client: str, model: str) -> None:
        self.checkpoints[client] = model
        self.checkpoints.move_to_end(client)
        while len(self.checkpoints) > MAX_CLIENTS:
            self.checkpoints.popitem(last=False)

    async def default_model(self, who: Caller) -> str:
        """The server's first model, for a request that names none (see `Upstream.default_model`)."""
        try:
            with rpc_errors():
                return await self.upstream.default_model(who.key)
        except NoModels:
            raise no_models() from None

    def progress_for(self, client: str, request: pb.GenerateRequest) -> None:
        """What a client's AUTOMATIC1111 or OpenAI request asks the server for, by what the client watches:
        previews every `--preview-every` steps if it polled `/sdapi/v1/progress` for images within
        `--preview-watch-s`, step events if it polled at all (else `omit_progress`: fewer messages to read)."""
        within = self.config.preview_watch_s
        if self.jobs.watched(client, within, images=True):
            request.preview_every = preview_every(self.config.preview_every, request)
        request.omit_progress = not self.jobs.watched(client, within, images=False)


@dataclass(frozen=True)
class Caller:
    key: str
    """The API key to pass through ("" when the request carries none)."""
    client: str
    """A secret-free id for per-client state."""
    request_id: str = ""
    """The client's `X-Request-Id`, passed on as gRPC `x-request-id` metadata (the server validates and logs it)."""
    idempotency_key: str = ""
    """The client's `Idempotency-Key`: a retry with the same key is charged once (gRPC `x-idempotency-key`)."""
    trace: tuple[tuple[str, str], ...] = ()
    """W3C trace context (`traceparent`, `tracestate`) for the gRPC calls, so the server's spans continue the
    client's trace (or the gateway's own HTTP span, where FastAPI's telemetry has an SDK to record it)."""

    def metadata(self, call: int = 0) -> tuple[tuple[str, str], ...]:
        """gRPC metadata for the request's `call`-th Generate call (AUTOMATIC1111's n_iter makes several: each
        gets its own idempotency key, `KEY:N` after the first)."""
        md = list(key_metadata(self.key))
        if self.request_id:
            md.append(("x-request-id", self.request_id if not call else f"{self.request_id}-{call}"))
        if self.idempotency_key:
            md.append(("x-idempotency-key", self.idempotency_key if not call else f"{self.idempotency_key}:{call}"))
        return (*md, *self.trace)


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def caller(request: Request) -> Caller:
    """FastAPI dependency: the caller's key (401 for malformed credentials). `async` though it awaits nothing:
    FastAPI runs a plain `def` dependency in a worker thread, a thread hop per request for a few microseconds' work."""
    key = api_key(request.headers, gateway(request).config.api_auth)
    return Caller(key, client_id(key), request.headers.get("x-request-id", "")[:128],
                  request.headers.get("idempotency-key", "")[:128], trace_context(request.headers))


def trace_context(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The trace context to pass on: the current span's where one is recording here, else the request's own
    `traceparent` (parsed and re-encoded by OpenTelemetry's W3C propagator: a malformed one is dropped)."""
    current = trace.get_current_span().get_span_context().is_valid
    carrier: dict[str, str] = {}
    propagate.inject(carrier, None if current else propagate.extract(headers))
    return tuple(carrier.items())


CallerDep = Annotated[Caller, Depends(caller)]
"""A route parameter `who: CallerDep` is the calling client."""
