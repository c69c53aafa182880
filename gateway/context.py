"""What every route needs, built once per app: the config, the upstream gRPC client and the job table."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from gateway.auth import api_key, client_id
from gateway.config import GatewayConfig
from gateway.jobs import Jobs
from gateway.upstream import Upstream


@dataclass
class Gateway:
    config: GatewayConfig
    upstream: Upstream
    jobs: Jobs = field(default_factory=Jobs)
    checkpoints: dict[str, str] = field(default_factory=dict)
    """Per client: the model `POST /sdapi/v1/options` chose (`sd_model_checkpoint`)."""


@dataclass(frozen=True)
class Caller:
    key: str
    """The API key to pass through ("" when the request carries none)."""
    client: str
    """A secret-free id for per-client state."""


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def caller(request: Request) -> Caller:
    """FastAPI dependency: the caller's key (401 for malformed credentials). `async` though it awaits nothing:
    FastAPI runs a plain `def` dependency in a worker thread, a thread hop per request for a few microseconds' work."""
    key = api_key(request.headers, gateway(request).config.api_auth)
    return Caller(key, client_id(key))
