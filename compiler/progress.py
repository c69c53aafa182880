"""Progress display for long compile stages: a live elapsed-time line per stage (stderr)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Progress:
    """Prints `[i/n] stage ... 12s` and keeps the clock ticking while a stage runs (on a TTY)."""

    def __init__(self, total: int, enabled: bool = True, stream=None):  # type: ignore[no-untyped-def]
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.done += 1
        label = f"[{self.done}/{self.total}] {name}"
        start = time.perf_counter()
        stop = threading.Event()
        tty = self.enabled and self.stream.isatty()

        def tick() -> None:
            while not stop.wait(1.0):
                self.stream.write(f"\r{label} ... {time.perf_counter() - start:.0f}s")
                self.stream.flush()

        ticker = threading.Thread(target=tick, daemon=True) if tty else None
        if self.enabled:
            self.stream.write(f"{label} ...{'' if tty else chr(10)}")
            self.stream.flush()
        if ticker:
            ticker.start()
        try:
            yield
        finally:
            stop.set()
            if ticker:
                ticker.join()
            elapsed = time.perf_counter() - start
            self.timings[name] = elapsed
            if self.enabled:
                self.stream.write(f"\r{label} done in {elapsed:.1f}s\n")
                self.stream.flush()
