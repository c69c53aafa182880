"""Generations in flight, per client: what `/sdapi/v1/progress` reports (step, ETA, latest preview), what
`/sdapi/v1/interrupt` cancels, and `run`, the one loop that drives a Generate call and records its events."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field

import grpc

from gateway.errors import ApiError, from_rpc_error, rpc_errors
from gateway.upstream import Call, Upstream
from proto.kiln.v1 import kiln_pb2 as pb


@dataclass
class Job:
    """One HTTP request's generation, possibly several gRPC calls long (AUTOMATIC1111's `n_iter`)."""

    client: str
    job_count: int = 1
    """gRPC calls this job makes (AUTOMATIC1111's n_iter)."""
    job_no: int = 0
    """Calls finished so far."""
    started: float = field(default_factory=time.monotonic)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    stage: str = "queued"
    step: int = 0
    total_steps: int = 0
    preview_png: bytes = b""
    interrupted: bool = False
    calls: set[Call] = field(default_factory=set)

    @property
    def progress(self) -> float:
        """0..1 over all of the job's calls (the current call by its denoising steps)."""
        within = self.step / self.total_steps if self.total_steps else 0.0
        return min(1.0, (self.job_no + within) / max(1, self.job_count))

    @property
    def eta_s(self) -> float:
        done = self.progress
        return (time.monotonic() - self.started) * (1 - done) / done if done > 0 else 0.0

    def observe(self, event: pb.GenerateResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "started":
            self.stage, self.step = "text_encode", 0
            self.total_steps = event.started.denoising_steps or event.started.steps
        elif kind == "progress":
            p = event.progress
            self.stage = p.stage
            if p.total_steps:
                self.step, self.total_steps = p.step, p.total_steps
            if p.preview_png:
                self.preview_png = p.preview_png

    def interrupt(self) -> None:
        self.interrupted = True
        for call in list(self.calls):
            call.cancel()


class Jobs:
    def __init__(self) -> None:
        self._jobs: dict[str, list[Job]] = {}
        self._watched: dict[str, float] = {}
        """Per client: when it last asked `/sdapi/v1/progress` for a preview image."""
        self._polled: dict[str, float] = {}
        """Per client: when it last asked `/sdapi/v1/progress` at all."""

    def watch(self, client: str, images: bool = True) -> None:
        """The client polled progress (`images`: with the preview image)."""
        for seen, yes in ((self._polled, True), (self._watched, images)):
            if yes:
                if len(seen) > 10_000:
                    seen.clear()
                seen[client] = time.monotonic()

    def watched(self, client: str, within_s: float, images: bool = True) -> bool:
        """Whether the client polled progress (`images`: for a preview) within `within_s` seconds (always, for 0)."""
        seen = (self._watched if images else self._polled).get(client)
        return within_s <= 0 or (seen is not None and time.monotonic() - seen <= within_s)

    def open(self, client: str, job_count: int = 1) -> Job:
        job = Job(client, job_count)
        self._jobs.setdefault(client, []).append(job)
        return job

    def close(self, job: Job) -> None:
        jobs = self._jobs.get(job.client, [])
        if job in jobs:
            jobs.remove(job)
        if not jobs:
            self._jobs.pop(job.client, None)

    @contextlib.contextmanager
    def track(self, client: str, job_count: int = 1) -> Iterator[Job]:
        job = self.open(client, job_count)
        try:
            yield job
        finally:
            self.close(job)

    def current(self, client: str) -> Job | None:
        """The client's oldest running job (AUTOMATIC1111 shows one job at a time)."""
        jobs = self._jobs.get(client)
        return jobs[0] if jobs else None

    def interrupt(self, client: str) -> int:
        jobs = list(self._jobs.get(client, ()))
        for job in jobs:
            job.interrupt()
        return len(jobs)


@dataclass
class Result:
    started: pb.Started
    artifacts: list[pb.Artifact]
    metadata: dict[str, str]
    interrupted: bool = False


def preview_every(every: int, request: pb.GenerateRequest) -> int:
    """The gateway's preview interval (for the progress routes), within the denoising steps the request runs
    when it says how many; a model default the gateway cannot see is met by `run(gateway_previews=True)`."""
    if not request.steps:
        return every
    steps = request.steps
    if request.init_image:
        strength = request.strength if request.HasField("strength") else 1.0
        steps = max(1, int(steps * strength)) if 0 < strength <= 1 else steps
    return min(every, steps)


async def run(upstream: Upstream, job: Job, request: pb.GenerateRequest, metadata: tuple[tuple[str, str], ...],
              gateway_previews: bool = False) -> Result:
    """One Generate call to the end, recorded in `job`; gRPC refusals raise `ApiError`. An interrupt returns what
    arrived before it (AUTOMATIC1111 returns the images it has). `gateway_previews`: the request's
    `preview_every` is the gateway's own ask, dropped if the server refuses it (a model without latent previews,
    or fewer steps than the interval)."""
    try:
        return await _run(upstream, job, request, metadata)
    except ApiError as e:
        if not (gateway_previews and request.preview_every and e.field == "preview_every"):
            raise
    request.preview_every = 0
    return await _run(upstream, job, request, metadata)


async def _run(upstream: Upstream, job: Job, request: pb.GenerateRequest,
               metadata: tuple[tuple[str, str], ...]) -> Result:
    events = stream(upstream, job, request, metadata)
    started, artifacts = pb.Started(), []
    got: dict[str, str] = {}
    try:
        async for call, event in events:
            got = call.metadata  # the same dict each time: the trailers fill it when the stream ends
            kind = event.WhichOneof("event")
            if kind == "started":
                started = event.started
            elif kind == "artifact":
                artifacts.append(event.artifact)
    except Interrupted as e:
        return Result(started, artifacts, e.metadata, interrupted=True)
    return Result(started, artifacts, got)


class Interrupted(Exception):
    def __init__(self, metadata: dict[str, str]):
        super().__init__("interrupted")
        self.metadata = metadata


async def stream(upstream: Upstream, job: Job, request: pb.GenerateRequest,
                 metadata: tuple[tuple[str, str], ...]) -> AsyncGenerator[tuple[Call, pb.GenerateResponse], None]:
    """The call's events, each recorded in `job`. Raises ApiError for a refusal (before the first event, or
    mid-stream), Interrupted when the client's interrupt cancelled it; cancels the call if the consumer stops."""
    if job.interrupted:
        raise Interrupted({})
    with rpc_errors():
        call, first = await upstream.start(request, metadata)
    job.calls.add(call)
    if job.interrupted:  # interrupted while the call started: the read after Started raises
        call.cancel()
    finished = False
    try:
        job.observe(first)
        yield call, first
        try:
            async for event in call.events():
                job.observe(event)
                yield call, event
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and job.interrupted:
                raise Interrupted(call.metadata) from None
            raise from_rpc_error(e) from None
        except asyncio.CancelledError:  # grpc.aio's read() after call.cancel(); not this task being cancelled
            task = asyncio.current_task()
            if job.interrupted and task is not None and not task.cancelling():
                raise Interrupted(call.metadata) from None
            raise
        finished = True
        job.job_no += 1
    finally:
        job.calls.discard(call)
        if not finished:
            call.cancel()
