"""What every route needs, built once per app: the config, the upstream gRPC client and the job table."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from gateway.auth import api_key, client_id
from gateway.config import GatewayConfig
from gateway.image_store import ImageStore
from gateway.jobs import Jobs
from gateway.upstream import Upstream


@dataclass
class Gateway:
    config: GatewayConfig
    upstream: Upstream
    jobs: Jobs = field(default_factory=Jobs)
    checkpoints: dict[str, str] = field(default_factory=dict)
    """Per client: the model `POST /sdapi/v1/options` chose (`sd_model_checkpoint`)."""
    images: ImageStore = field(init=False)
    """The PNGs behind OpenAI `response_format=url` answers."""

    def __post_init__(self) -> None:
        self.images = ImageStore(self.config.image_store_bytes, self.config.image_url_ttl_s)


@dataclass(frozen=True)
class Caller:
    key: str
    """The API key to pass through ("" when the request carries none)."""
    client: str
    """A secret-free id for per-client state."""


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


def caller(request: Request) -> Caller:
    """FastAPI dependency: the caller's key (401 for malformed credentials)."""
    key = api_key(request.headers, gateway(request).config.api_auth)
    return Caller(key, client_id(key))
