"""Observation: one record per Kiln call — what was asked, what the server resolved (Started), the stage timings
(Artifact), the outcome — handed to its sinks (Prometheus metrics, the JSON access log). Sits just inside the
error interceptor, so it sees the KilnError of each refusal (with its reason) before it becomes a status."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from runtime.errors import KilnError
from runtime.server.context import ACCOUNT, REQUEST_ID
from runtime.server.interceptors.base import KILN_PREFIX, Streaming, Unary, wrap_handler


@dataclass
class CallRecord:
    method: str
    """The Kiln method's name (Generate, ListModels, ...)."""
    request_id: str = ""
    key_id: str = ""
    """The caller's key id (never its secret); "" without accounts."""
    tier: str = ""
    model: str = ""
    """The served model's own name (for NAME@VERSION and aliases too); "unknown" for a name the server does not
    serve (labels stay bounded)."""
    version: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    """Denoising steps run."""
    sampler: str = ""
    images: int = 0
    cost: int = 0
    status: str = "OK"
    reason: str = ""
    """Why it was refused or failed (ErrorInfo reason, else the status); "" when OK."""
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)


Sink = Callable[[CallRecord], None]


def _mode(request: Any) -> str:
    if not getattr(request, "init_image", b""):
        return "text_to_image"
    return "inpaint" if request.mask_image else "img2img"


def _outcome(error: BaseException) -> tuple[str, str]:
    if isinstance(error, asyncio.CancelledError | GeneratorExit):  # the client went away
        return "CANCELLED", "CANCELLED"
    if isinstance(error, KilnError):
        return error.code.name, str(getattr(error, "reason", "") or error.code.name)
    return "INTERNAL", "INTERNAL"


class ObserveInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, sinks: list[Sink], model_name: Callable[[str], str | None]):
        """`model_name`: the model a request's `model` names (NAME, NAME@VERSION, an alias), None if none."""
        self.sinks = sinks
        self.model_name = model_name

    @contextlib.contextmanager
    def _observed(self, record: CallRecord) -> Iterator[None]:
        """Times the call and hands its record, with the outcome, to the sinks."""
        t0 = time.perf_counter()
        try:
            yield
        except BaseException as e:
            record.status, record.reason = _outcome(e)
            raise
        finally:
            record.seconds = time.perf_counter() - t0
            record.request_id = REQUEST_ID.get()
            account = ACCOUNT.get()
            if account is not None:
                record.key_id, record.tier = account.key_id, account.tier.name
            for sink in self.sinks:
                sink(record)

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        if not details.method.startswith(KILN_PREFIX):
            return handler
        method = details.method.removeprefix(KILN_PREFIX)

        def unary(behaviour: Unary) -> Unary:
            async def run(request, context):  # type: ignore[no-untyped-def]
                with self._observed(CallRecord(method)):
                    return await behaviour(request, context)

            return run

        def streaming(behaviour: Streaming) -> Streaming:
            async def run(request, context):  # type: ignore[no-untyped-def]
                record = CallRecord(method, model=self.model_name(request.model) or "unknown",
                                    mode=_mode(request))
                with self._observed(record):
                    async for response in behaviour(request, context):
                        kind = response.WhichOneof("event")
                        if kind == "started":
                            s = response.started
                            record.version, record.mode, record.width, record.height = (
                                s.model_version, s.mode or record.mode, s.width, s.height)
                            record.steps, record.sampler, record.cost = s.denoising_steps or s.steps, s.sampler, s.cost
                        elif kind == "artifact":
                            record.images += 1
                            if record.images == 1:
                                record.stages = {t.stage: t.seconds for t in response.artifact.timings}
                        yield response

            return run

        return wrap_handler(handler, unary, streaming)
