"""The engine: one step loop over the active requests, like vLLM's `step()`.

Each turn of the loop gives every active request one unit of work (text encode, one denoising
step, or one image decode) on a single model thread, so concurrent requests interleave step by
step and a cancelled request is dropped before its next unit. Events go to a per-request queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from runtime.pipeline import Generation, Pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    stage: str
    step: int
    total_steps: int
    elapsed: float


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


@dataclass
class Job:
    gen: Generation
    pipeline: Pipeline
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    decoded: int = 0

    @property
    def request_id(self) -> str:
        return self.gen.params.request_id

    def cancel(self) -> None:
        self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        while (event := await self.queue.get()) is not None:
            yield event


class Engine:
    def __init__(self, history: int = 1000):
        self._jobs: list[Job] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-model")
        self._task: asyncio.Task[None] | None = None
        self.history: deque[Outcome] = deque(maxlen=history)

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

    def submit(self, gen: Generation) -> Job:
        job = Job(gen, Pipeline(gen.model))
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
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            for job in list(self._jobs):
                if job.cancelled:
                    self._finish(job, "cancelled")
                    continue
                try:
                    event, done = await loop.run_in_executor(self._pool, self._advance, job)
                except Exception as e:  # one request's failure never stops the loop
                    job.queue.put_nowait(Failed(e))
                    self._finish(job, "failed")
                    continue
                job.queue.put_nowait(event)
                if done:
                    self._finish(job, "finished")
            if not self._jobs:
                self._wake.clear()
                self._idle.set()

    def _advance(self, job: Job) -> tuple[Event, bool]:
        """One unit of work for `job`, on the model thread. Returns its event and whether the job is done."""
        gen, pipe = job.gen, job.pipeline
        total = gen.params.steps
        if gen.embeddings is None:
            pipe.encode_text(gen)
            pipe.prepare(gen)
            return Progress("text_encode", 0, total, gen.elapsed), False
        if not gen.denoised:
            pipe.denoise_step(gen)
            return Progress("denoise", gen.step, total, gen.elapsed), False
        k = job.decoded
        png = pipe.encode_png(gen, k, pipe.decode(gen, k))
        job.decoded += 1
        return Artifact(k, png, gen.params.image_seed(k), dict(gen.timings)), job.decoded == gen.params.num_images

    def _finish(self, job: Job, status: str) -> None:
        self._jobs.remove(job)
        job.queue.put_nowait(None)
        outcome = Outcome(job.request_id, status, job.gen.step, job.gen.params.steps)
        self.history.append(outcome)
        log.info("request %s %s after %d/%d steps (%.2fs)", outcome.request_id, status,
                 outcome.steps_done, outcome.total_steps, job.gen.elapsed)
