"""Progress display for long compile stages: a live elapsed-time line per stage (stderr), and what each stage
took: seconds and peak RSS."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from compiler import memory


class Progress:
    """Prints `[i/n] stage ... 12s` and keeps the clock ticking while a stage runs (on a TTY); when it ends,
    `done in 12.3s, peak RSS 1.25 GiB`.

    The peak is the process's highest resident set during the stage (the kernel's high-water mark, reset as the
    stage starts). Between stages, garbage is collected and freed heap pages go back to the OS
    (`memory.release`), so a stage's peak counts what it and the stages before it still hold, not what they
    already let go of.
    """

    def __init__(self, total: int, enabled: bool = True, stream=None):  # type: ignore[no-untyped-def]
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.timings: dict[str, float] = {}
        self.peaks: dict[str, int | None] = {}
        """Peak RSS in bytes per stage; None where the platform cannot say (no Linux /proc)."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.done += 1
        label = f"[{self.done}/{self.total}] {name}"
        memory.release()
        measured = memory.reset_peak()
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
            peak = memory.peak_rss() if measured else None
            self.timings[name] = elapsed
            self.peaks[name] = peak
            if self.enabled:
                rss = f", peak RSS {peak / 2**30:.2f} GiB" if peak is not None else ""
                self.stream.write(f"\r{label} done in {elapsed:.1f}s{rss}\n")
                self.stream.flush()

    def stats(self) -> dict[str, Any]:
        """What the manifest records (`compile_stats`): each stage's seconds and peak RSS in order, and the
        largest peak."""
        stages = [{"stage": n, "seconds": round(self.timings[n], 3), "peak_rss_bytes": self.peaks.get(n)}
                  for n in self.timings]
        peaks = [p for p in self.peaks.values() if p is not None]
        return {"stages": stages, "peak_rss_bytes": max(peaks) if peaks else None}
