"""The engine: one step loop over the active requests, like vLLM's `step()`.

Each turn of the loop (1) drops cancelled requests, (2) text-encodes newly arrived ones (one text-encoder call
per model and LoRA adapter selection), (3) gives every request that is denoising one step -- requests that share
a model, latent size and LoRA adapter selection go through the UNet together, one call per batch, each row with its own timestep, guidance and sampler state --
and (4) decodes the next image of each request that has finished denoising, images of the same size together
up to a pixel budget. Requests join a batch at the turn after they arrive
and leave it when done or cancelled, so batches change between steps. All model work runs on one thread;
events go to a per-request queue.

A request that breaks fails alone: each unit of work is one call its requests share, which changes none of
them (when it raises, they run again one by one), then each request's own update from its share, where a
failure is that request's only.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import ResourceExhausted
from runtime.pipeline import Generation, Pipeline, decode_batch, encode_text_batch, unet_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches and how much work it accepts (`kiln serve --max-batch ...`)."""

    batching: bool = True
    """Run the denoising steps of concurrent requests that share a model and image size in one UNet call.
    Off: one UNet call per request per step (requests still interleave step by step)."""
    max_batch_size: int = 8
    """Most UNet batch rows in one call, 1 to 256. An image counts 2 rows with classifier-free guidance
    (guidance_scale > 1), 1 without. Requests that do not fit go in a further call in the same turn; a single
    request larger than this still runs, alone."""
    max_wait_s: float = 0.005
    """When a request arrives at an idle engine, how long (0 to 10 s) the engine waits for others before its
    first turn, so requests sent together start together. Later arrivals join running batches at the next step
    and never wait for this."""
    decode_batch_pixels: int = 512 * 512
    """Most output pixels the VAE decoder runs in one call, 0 to 2^26: images of the same size that finish in the
    same turn are decoded together up to this (one at a time when a single image is larger). The default keeps the
    decoder's peak memory at one 512x512 image's worth; 0 decodes every image alone."""
    max_queue: int = 64
    """Most requests in the engine at once (running or waiting for a turn), 1 to 100000. Beyond it Generate
    fails at once with RESOURCE_EXHAUSTED, reason SERVER_BUSY, instead of queueing without bound."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= 256:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be between 1 and 256")
        if not 0.0 <= self.max_wait_s <= 10.0:
            raise ValueError(f"max_wait_s={self.max_wait_s} must be between 0 and 10 seconds")
        if not 0 <= self.decode_batch_pixels <= 1 << 26:
            raise ValueError(f"decode_batch_pixels={self.decode_batch_pixels} must be between 0 and {1 << 26}")
        if not 1 <= self.max_queue <= 100_000:
            raise ValueError(f"max_queue={self.max_queue} must be between 1 and 100000")


@dataclass(frozen=True)
class Progress:
    stage: str
    step: int
    total_steps: int
    elapsed: float
    preview: bytes = b""
    """A small PNG approximating the current latents (requests that asked for previews), else empty."""


@dataclass(frozen=True)
class Artifact:
    index: int
    png: bytes
    seed: int
    timings: dict[str, float]


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Progress | Artifact | Failed


@dataclass(frozen=True)
class Outcome:
    """What became of a finished request (kept in a bounded history for logs and tests)."""

    request_id: str
    status: str
    """finished | cancelled | failed."""
    steps_done: int
    total_steps: int


@dataclass(frozen=True)
class BatchRecord:
    """One UNet call of the engine (kept in a bounded history for tests and logs)."""

    request_ids: tuple[str, ...]
    rows: int


@dataclass(frozen=True)
class StageMark:
    """When one of a request's stages ran (Unix ns, like OpenTelemetry's clock), and with how many others: the
    engine keeps these only while `Engine.on_finish` is set (tracing builds the request's stage spans from them)."""

    stage: str
    """queue | text_encode | prepare | denoise | vae_decode | png_encode."""
    start_ns: int
    end_ns: int
    rows: int = 0
    """Batch rows of the shared model call (0 for per-request work)."""
    requests: int = 1
    """Requests in the shared model call."""
    index: int = 0
    """denoise: the step number (1-based); vae_decode and png_encode: the image index."""


@dataclass
class Job:
    gen: Generation
    pipeline: Pipeline
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    decoded: int = 0
    submitted: float = field(default_factory=time.monotonic)
    """When the engine admitted it (its queue time runs to its first model call)."""
    marks: list[StageMark] | None = None
    """Its stages' times, kept while the engine has an `on_finish` listener (else None)."""
    context: contextvars.Context | None = None
    """The submitter's context variables (the RPC's trace context), kept with `marks`."""
    submitted_ns: int = 0
    """`submitted` on the Unix clock, kept with `marks`."""

    @property
    def request_id(self) -> str:
        return self.gen.params.request_id

    @property
    def rows(self) -> int:
        """UNet batch rows this request takes in its next step (2 per image while guided)."""
        return self.gen.params.num_images * (2 if self.gen.guided_now else 1)

    def batch_key(self) -> tuple[int, tuple[int, ...], tuple[tuple[str, float], ...]]:
        """Requests with equal keys can share a UNet call: the same loaded model, latent shape and LoRA adapters
        (the adapters' deltas apply to every row of a call)."""
        assert self.gen.latents is not None
        return id(self.gen.model), self.gen.latents.shape[1:], self.gen.params.loras

    def decode_key(self) -> tuple[object, ...]:
        """Requests with equal keys can share a VAE-decoder call: the same loaded model, latent shape and decoder
        (full and tiny are different graphs); LoRA adapters do not touch the VAE."""
        assert self.gen.latents is not None
        return id(self.gen.model), self.gen.latents.shape[1:], self.gen.params.decoder

    def encode_key(self) -> tuple[int, tuple[tuple[str, float], ...]]:
        """Requests with equal keys can share a text-encoder call: the same loaded model and LoRA adapters."""
        return id(self.gen.model), self.gen.params.loras

    def cancel(self) -> None:
        self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        while (event := await self.queue.get()) is not None:
            yield event


class Engine:
    def __init__(self, config: EngineConfig | None = None, history: int = 1000):
        self.config = config or EngineConfig()
        self._jobs: list[Job] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-model")
        self._task: asyncio.Task[None] | None = None
        self.on_unet_batch: Callable[[str, int], None] | None = None
        """Told (model name, rows) for every UNet call (the metrics' batch-size histogram)."""
        self.on_queued: Callable[[str, float], None] | None = None
        """Told (model name, seconds) when a request gets its first model call (the queue-time histogram)."""
        self.on_finish: Callable[[Job, str], None] | None = None
        """Told (job, finished | cancelled | failed) when a request leaves the engine; while set, jobs keep their
        stage marks and their submitter's context (tracing turns them into spans)."""
        self.history: deque[Outcome] = deque(maxlen=history)
        self.batches: deque[BatchRecord] = deque(maxlen=history)
        self.decodes: deque[tuple[str, ...]] = deque(maxlen=history)
        """Request ids of each VAE-decoder call."""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="kiln-engine")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=True)

    @property
    def active(self) -> int:
        return len(self._jobs)

    @property
    def queued(self) -> int:
        """Requests admitted that have had no model call yet."""
        return sum(1 for j in self._jobs if j.gen.embeddings is None)

    @property
    def running(self) -> int:
        return self.active - self.queued

    def check_capacity(self) -> None:
        """Raises RESOURCE_EXHAUSTED (SERVER_BUSY) when the engine holds `max_queue` requests already."""
        if len(self._jobs) >= self.config.max_queue:
            raise ResourceExhausted(
                f"the server is busy: {len(self._jobs)} requests are running or waiting (max_queue="
                f"{self.config.max_queue}); retry shortly or on another replica",
                "SERVER_BUSY", "engine queue", retry_after_s=1.0, max_queue=str(self.config.max_queue))

    def submit(self, gen: Generation) -> Job:
        self.check_capacity()
        job = Job(gen, Pipeline(gen.model))
        if self.on_finish is not None:
            job.marks, job.context, job.submitted_ns = [], contextvars.copy_context(), time.time_ns()
        self._jobs.append(job)
        self._idle.clear()
        self._wake.set()
        return job

    async def drain(self, timeout: float) -> bool:
        """Wait until every submitted request has finished; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            # only an idle engine waits for company: requests that arrive while turns run join the next turn
            if self.config.max_wait_s > 0 and self._rows_waiting() < self.config.max_batch_size:
                await self._gather_arrivals()
            while self._jobs:
                await self._turn()
            self._wake.clear()
            self._idle.set()

    async def _gather_arrivals(self) -> None:
        """From idle: wait up to max_wait_s for more requests, or until a full batch's worth has arrived."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.max_wait_s
        while self._rows_waiting() < self.config.max_batch_size and (left := deadline - loop.time()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                break
        self._wake.set()

    def _rows_waiting(self) -> int:
        return sum(j.rows for j in self._jobs)

    async def _turn(self) -> None:
        for job in [j for j in self._jobs if j.cancelled]:
            self._finish(job, "cancelled")
        arrived = [j for j in self._jobs if j.gen.embeddings is None and not j.cancelled]
        for group in self._grouped(arrived, Job.encode_key):
            await self._together(group, self._encode)
        denoising = [j for j in self._jobs if j.gen.embeddings is not None and not j.gen.denoised]
        for batch in self._batches(denoising):
            batch = [j for j in batch if not j.cancelled and j in self._jobs]
            if batch:
                await self._together(batch, self._denoise)
        for group in self._decode_groups([j for j in self._jobs if j.gen.denoised and not j.cancelled]):
            await self._together(group, self._decode)

    def _grouped(self, jobs: list[Job], key) -> list[list[Job]]:  # type: ignore[no-untyped-def]
        """Jobs with equal `key(job)`, in arrival order; each job alone when batching is off."""
        if not self.config.batching:
            return [[j] for j in jobs]
        groups: dict[object, list[Job]] = {}
        for job in jobs:
            groups.setdefault(key(job), []).append(job)
        return list(groups.values())

    def _batches(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs grouped by batch key in arrival order, each group cut into calls of at most max_batch_size rows."""
        out: list[list[Job]] = []
        for group in self._grouped(jobs, Job.batch_key):
            current: list[Job] = []
            rows = 0
            for job in group:
                if current and rows + job.rows > self.config.max_batch_size:
                    out.append(current)
                    current, rows = [], 0
                current.append(job)
                rows += job.rows
            out.append(current)
        return out

    def _decode_groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs whose next image can be decoded in one call: same model, size and decoder, within
        decode_batch_pixels."""
        out: list[list[Job]] = []
        for group in self._grouped(jobs, Job.decode_key):
            p = group[0].gen.params
            per_call = max(1, self.config.decode_batch_pixels // (p.width * p.height))
            out += [group[i : i + per_call] for i in range(0, len(group), per_call)]
        return out

    async def _together(self, jobs: list[Job], fn) -> None:  # type: ignore[no-untyped-def]
        """`fn(jobs)` -> one (event, done) per job, on the model thread. A unit of work's shared call changes no
        job's state, so when `fn` raises, each job runs again alone and only the one that breaks fails; a failure
        after the shared call is a Failed event for that job alone (see `_each`)."""
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._pool, fn, jobs)
        except Exception as e:
            if len(jobs) == 1:
                self._fail(jobs[0], e)
                return
            log.warning("a call over %d requests failed (%s); running them one by one", len(jobs), e)
            for job in jobs:
                await self._together([job], fn)
            return
        for job, (event, done) in zip(jobs, results, strict=True):
            if isinstance(event, Failed):
                self._fail(job, event.error)
                continue
            job.queue.put_nowait(event)
            if done:
                self._finish(job, "finished")

    # units of work, on the model thread: each is one call shared by its jobs (it may raise: no job has changed
    # yet), then each job's own update from its share of the result (`_each`: a failure is that job's alone) ----
    def _encode(self, jobs: list[Job]) -> list[tuple[Event, bool]]:
        """One text-encoder call for the jobs (same model), then each one's sampler and starting latents
        (img2img and inpainting: its own VAE-encoder call)."""
        if self.on_queued:
            now = time.monotonic()
            for job in jobs:
                self.on_queued(job.gen.model.name, now - job.submitted)
        t0 = time.time_ns()
        embeddings = encode_text_batch(jobs[0].gen.model, [j.gen for j in jobs])
        t1, rows = time.time_ns(), sum(len(j.gen.tokens) for j in jobs)  # text-encoder rows: prompts

        def prepare(job: Job, embedding: tuple[np.ndarray, np.ndarray | None]) -> tuple[Event, bool]:
            _mark(job, "queue", job.submitted_ns, t0)
            _mark(job, "text_encode", t0, t1, rows, len(jobs))
            job.gen.embeddings, job.gen.pooled = embedding
            p0 = time.time_ns()
            job.pipeline.prepare(job.gen)
            _mark(job, "prepare", p0, time.time_ns())
            return Progress("text_encode", 0, job.gen.total_steps, job.gen.elapsed), False

        return _each(jobs, embeddings, prepare)

    def _denoise(self, batch: list[Job]) -> list[tuple[Event, bool]]:
        """The UNet call, then each job's sampler step (and preview)."""
        t0 = time.time_ns()
        outputs = unet_batch(batch[0].gen.model, [j.gen for j in batch])
        t1 = time.time_ns()
        self.batches.append(BatchRecord(tuple(j.request_id for j in batch), sum(j.rows for j in batch)))
        if self.on_unet_batch:
            self.on_unet_batch(batch[0].gen.model.name, self.batches[-1].rows)

        def step(job: Job, out: np.ndarray) -> tuple[Event, bool]:
            gen = job.gen
            job.pipeline.apply_unet_output(gen, out)
            _mark(job, "denoise", t0, t1, self.batches[-1].rows, len(batch), gen.steps_done)
            return Progress("denoise", gen.steps_done, gen.total_steps, gen.elapsed, job.pipeline.preview(gen)), False

        return _each(batch, outputs, step)

    def _decode(self, jobs: list[Job]) -> list[tuple[Event, bool]]:
        """The next image of each job (same model and size) in one VAE-decoder call, then each one's finished
        image (inpainting: pasted over the init image) and PNG."""
        t0 = time.time_ns()
        images = decode_batch(jobs[0].gen.model, [(j.gen, j.decoded) for j in jobs])
        t1 = time.time_ns()
        self.decodes.append(tuple(j.request_id for j in jobs))

        def finish(job: Job, image: np.ndarray) -> tuple[Event, bool]:
            gen, k = job.gen, job.decoded
            _mark(job, "vae_decode", t0, t1, len(jobs), len(jobs), k)
            p0 = time.time_ns()
            png = job.pipeline.encode_png(gen, k, job.pipeline.finish_image(gen, image))
            _mark(job, "png_encode", p0, time.time_ns(), index=k)
            job.decoded += 1
            return Artifact(k, png, gen.params.image_seed(k), dict(gen.timings)), job.decoded == gen.params.num_images

        return _each(jobs, images, finish)

    # bookkeeping ---------------------------------------------------------------------------------------------------
    def _fail(self, job: Job, error: BaseException) -> None:
        job.queue.put_nowait(Failed(error))
        self._finish(job, "failed")

    def _finish(self, job: Job, status: str) -> None:
        if job not in self._jobs:
            return
        self._jobs.remove(job)
        job.queue.put_nowait(None)
        outcome = Outcome(job.request_id, status, job.gen.steps_done, job.gen.total_steps)
        self.history.append(outcome)
        log.info("request %s %s after %d/%d steps (%.2fs)", outcome.request_id, status,
                 outcome.steps_done, outcome.total_steps, job.gen.elapsed)
        if self.on_finish is not None:
            self.on_finish(job, status)


def _mark(job: Job, stage: str, start_ns: int, end_ns: int, rows: int = 0, requests: int = 1, index: int = 0) -> None:
    if job.marks is not None:
        job.marks.append(StageMark(stage, start_ns, end_ns, rows, requests, index))


def _each(jobs: list[Job], shares: list, update) -> list[tuple[Event, bool]]:  # type: ignore[no-untyped-def]
    """`update(job, share)` -> (event, done) for each job and its share of a shared call's result; when it raises,
    a Failed event for that job, and the others still get theirs."""
    if len(shares) != len(jobs):  # before any update: a job must not change in a call that is then rerun
        raise RuntimeError(f"a shared call returned {len(shares)} results for {len(jobs)} requests")
    out: list[tuple[Event, bool]] = []
    for job, share in zip(jobs, shares, strict=True):
        try:
            out.append(update(job, share))
        except Exception as e:
            out.append((Failed(e), False))
    return out


__all__ = ["Artifact", "BatchRecord", "Engine", "EngineConfig", "Event", "Failed", "Job", "Outcome", "Progress", "StageMark"]
