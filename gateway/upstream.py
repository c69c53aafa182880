"""The gateway's one connection to the Kiln gRPC server: a shared grpc.aio channel, the caller's API key passed
through as metadata, and the server's model list cached for a few seconds."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 64 << 20


@dataclass(eq=False)
class Call:
    """One Generate call in flight: its events, and the metadata the server sent (x-credits-*, x-request-id)."""

    call: grpc.aio.UnaryStreamCall
    metadata: dict[str, str] = field(default_factory=dict)

    async def events(self) -> AsyncIterator[pb.GenerateResponse]:
        """The events after the first (grpc.aio does not mix read() with async iteration)."""
        while (response := await self.call.read()) is not grpc.aio.EOF:
            yield response
        self.metadata.update(_metadata(await self.call.trailing_metadata()))

    def cancel(self) -> None:
        self.call.cancel()


class NoModels(Exception):
    """The server serves no model yet."""


def _metadata(md: object) -> dict[str, str]:
    return {k: v for k, v in (md or ()) if isinstance(v, str)}  # type: ignore[attr-defined]


def key_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def tls_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """TLS to the gRPC server: trust `ca` (PEM); present `cert` + `key` where it requires a client certificate."""
    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"{what}={path!r} cannot be read: {e.strerror}") from None

    return grpc.ssl_channel_credentials(read(ca, "target_tls_ca"), read(key, "target_tls_key") if key else None,
                                        read(cert, "target_tls_cert") if cert else None)


class Upstream:
    def __init__(self, target: str, timeout_s: float = 600.0, models_ttl_s: float = 5.0,
                 tls: grpc.ChannelCredentials | None = None):
        self.target, self.timeout_s, self.models_ttl_s = target, timeout_s, models_ttl_s
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        self.channel = grpc.aio.secure_channel(target, tls, options=options) if tls else \
            grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.KilnStub(self.channel)
        self._models: dict[str, tuple[float, pb.ListModelsResponse]] = {}
        self._latest: tuple[float, pb.ListModelsResponse] | None = None

    async def close(self) -> None:
        await self.channel.close()

    async def list_models(self, api_key: str = "", fresh: bool = False) -> pb.ListModelsResponse:
        """ListModels as the caller's key sees it (cached per key for `models_ttl_s`)."""
        now = time.monotonic()
        hit = self._models.get(api_key)
        if hit and not fresh and now - hit[0] < self.models_ttl_s:
            return hit[1]
        response = await self.stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=key_metadata(api_key))
        if len(self._models) > 1024:
            self._models.clear()
        self._models[api_key] = self._latest = (now, response)
        return response

    async def default_model(self, api_key: str = "") -> str:
        """The server's first model, for requests that name none. The latest listing any caller fetched is reused
        for `models_ttl_s`, so most requests cost their key no ListModels call of its own (a tier's
        requests_per_minute counts every call): requests that name their model never make one."""
        now = time.monotonic()
        if self._latest is None or now - self._latest[0] >= self.models_ttl_s:
            await self.list_models(api_key, fresh=True)
        assert self._latest is not None
        models = self._latest[1].models
        if not models:
            raise NoModels()
        return models[0].name

    async def balance(self, api_key: str) -> pb.Balance:
        return await self.stub.GetBalance(pb.GetBalanceRequest(), timeout=30, metadata=key_metadata(api_key))

    async def start(self, request: pb.GenerateRequest,
                    metadata: tuple[tuple[str, str], ...] = ()) -> tuple[Call, pb.GenerateResponse]:
        """Start a Generate call and wait for its first event (Started), so that a refused request raises
        `grpc.aio.AioRpcError` here, before the HTTP response has begun."""
        call = self.stub.Generate(request, timeout=self.timeout_s, metadata=metadata)
        out = Call(call)
        first = await call.read()
        if first is grpc.aio.EOF:  # the server ended the stream without an event or a status: not Kiln
            raise RuntimeError("the gRPC server ended Generate without an event")
        out.metadata.update(_metadata(await call.initial_metadata()))
        return out, first

    async def ready(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            r = await health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING
