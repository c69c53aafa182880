"""OpenTelemetry spans of Kiln RPCs besides the server span (interceptors/trace.py): the interceptors' checks, the
call record as attributes, and each request's engine stage spans, built after the fact from the times the engine
kept (`runtime.engine.StageMark`), so nothing is wrapped around the model calls themselves.

The runtime needs only `opentelemetry-api`. Without an endpoint (tracing_config.py) the server installs no
tracing interceptor and no engine hook: these functions are not called at all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from runtime.errors import KilnError
from runtime.server.tracing_config import kiln_version

if TYPE_CHECKING:
    from runtime.engine import Job
    from runtime.server.interceptors.observe import CallRecord

log = logging.getLogger("kiln.tracing")

TRACER: ContextVar[Tracer | None] = ContextVar("kiln_tracer", default=None)
"""The running RPC's tracer, set by the tracing interceptor; None when the RPC is not traced."""


def outcome(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status an exception becomes, and its reason (ErrorInfo reason, else the status name)."""
    if isinstance(error, KilnError):
        return error.code, str(getattr(error, "reason", "") or error.code.name)
    if isinstance(error, asyncio.CancelledError | GeneratorExit):  # the client went away
        return grpc.StatusCode.CANCELLED, "CANCELLED"
    return grpc.StatusCode.INTERNAL, "INTERNAL"


def fail(span: Span, error: BaseException) -> None:
    """Marks `span` failed with the gRPC status and reason `error` becomes (a refusal is an error here too: the
    caller did not get its images)."""
    code, reason = outcome(error)
    span.set_attributes({"rpc.grpc.status_code": code.value[0], "kiln.status": code.name, "kiln.error.reason": reason})
    if violations := getattr(error, "violations", None):  # INVALID_ARGUMENT: which fields (BadRequest)
        span.set_attribute("kiln.error.fields", [v.field for v in violations])
    span.set_status(Status(StatusCode.ERROR, f"{code.name} {reason}: {error}"[:500]))
    if code is grpc.StatusCode.INTERNAL:
        span.record_exception(error)


_UNTRACED = contextlib.nullcontext()


def check_span(name: str) -> contextlib.AbstractContextManager[None]:
    """A child span of the RPC's span around an interceptor's check; when the RPC is not traced, a shared
    do-nothing context (a few hundred ns, where a generator-based one costs 1.5 us)."""
    tracer = TRACER.get()
    return _UNTRACED if tracer is None else _check_span(tracer, name)


@contextlib.contextmanager
def _check_span(tracer: Tracer, name: str) -> Iterator[None]:
    with tracer.start_as_current_span(name, record_exception=False, set_status_on_exception=False) as span:
        try:
            yield
        except BaseException as e:
            fail(span, e)
            raise


def annotate(record: CallRecord) -> None:
    """An observe sink: the call's record (request id, key id, model, ..., status) as attributes of its span."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attributes: dict[str, Any] = {"kiln.request_id": record.request_id, "kiln.status": record.status,
                                  "rpc.grpc.status_code": grpc.StatusCode[record.status].value[0]}
    if record.key_id:
        attributes |= {"kiln.key_id": record.key_id, "kiln.tier": record.tier}
    if record.model:
        attributes |= {"kiln.model": record.model, "kiln.model_version": record.version, "kiln.mode": record.mode,
                       "kiln.width": record.width, "kiln.height": record.height, "kiln.steps": record.steps,
                       "kiln.sampler": record.sampler, "kiln.images": record.images, "kiln.cost": record.cost}
    if record.reason:
        attributes["kiln.error.reason"] = record.reason
    span.set_attributes(attributes)


def stage_spans(tracer: Tracer, job: Job, status: str) -> None:
    """The request's engine stages as child spans of its RPC's span, with the times the engine kept: queue,
    text_encode, prepare, one denoise span (an event per step), and per image vae_decode and png_encode."""
    if job.marks is None or job.context is None or not job.marks:
        return
    parent: otel_context.Context = job.context.run(otel_context.get_current)
    traced = trace.get_current_span(parent).get_span_context()  # ended already when the client cancelled: still ours
    if not (traced.is_valid and traced.trace_flags.sampled):
        return
    gen = job.gen
    common: dict[str, Any] = {"kiln.request_id": job.request_id, "kiln.model": gen.model.name,
                              "kiln.model_version": gen.model.version}
    steps = [m for m in job.marks if m.stage == "denoise"]
    for m in job.marks:
        if m.stage == "denoise":
            continue
        attributes = dict(common)
        if m.rows:
            attributes |= {"kiln.batch.rows": m.rows, "kiln.batch.requests": m.requests}
        if m.stage in ("vae_decode", "png_encode"):
            attributes["kiln.image_index"] = m.index
        _span(tracer, parent, m.stage, m.start_ns, m.end_ns, attributes)
    if steps:
        span = tracer.start_span("kiln.denoise", parent, start_time=steps[0].start_ns, attributes={
            **common, "kiln.steps": len(steps), "kiln.steps_planned": gen.total_steps,
            "kiln.sampler": gen.params.sampler, "kiln.batch.rows_max": max(m.rows for m in steps),
            "kiln.unet_seconds": sum(m.end_ns - m.start_ns for m in steps) / 1e9})
        for m in steps:
            span.add_event("step", {"kiln.step": m.index, "kiln.batch.rows": m.rows, "kiln.batch.requests": m.requests,
                                    "kiln.seconds": (m.end_ns - m.start_ns) / 1e9}, timestamp=m.start_ns)
        if status != "finished" and steps[-1].index < gen.total_steps:
            span.set_status(Status(StatusCode.ERROR, f"{status} after {steps[-1].index}/{gen.total_steps} steps"))
        span.end(end_time=steps[-1].end_ns)


def _span(tracer: Tracer, parent: otel_context.Context, stage: str, start: int, end: int,
          attributes: dict[str, Any]) -> None:
    tracer.start_span(f"kiln.{stage}", parent, start_time=start, attributes=attributes).end(end_time=end)


class Tracing:
    """What a traced server holds: the tracer (from its provider), the engine hook and the provider's shutdown."""

    def __init__(self, provider: Any, owned: bool = False):
        self.provider, self.owned = provider, owned
        """`owned`: the server built the provider (from its config) and shuts it down when it stops."""
        self.tracer = provider.get_tracer("kiln.runtime", kiln_version())

    def engine_finished(self, job: Job, status: str) -> None:
        try:
            stage_spans(self.tracer, job, status)
        except Exception:  # tracing must never break the engine loop
            log.exception("tracing: could not record the stage spans of request %s", job.request_id)

    def shutdown(self) -> None:
        """Exports what is still batched and stops the provider, when the server built it."""
        if self.owned:
            self.provider.shutdown()


__all__ = ["TRACER", "Tracing", "annotate", "check_span", "fail", "outcome", "stage_spans"]
