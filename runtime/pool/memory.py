"""Resident memory as the OS counts it, and `--memory-budget` values (bytes, units, or a share of the machine)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import re
from pathlib import Path

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|[kmgt]i?)?b?\s*$", re.IGNORECASE)


def rss() -> int:
    """This process's resident set size in bytes (Linux /proc; 0 where it cannot be read)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def machine_memory() -> int:
    """Memory this process may use: the cgroup's limit (a container's) when there is one, else the machine's."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            return int(text)
    return total


def parse_budget(text: str) -> int | None:
    """`--memory-budget`: "" (none), bytes (`8000000000`), with a unit (`8G`, `7.5GiB`, `512M`), or a share of the
    machine's (or the container's) memory (`60%`). Raises ValueError naming the value and the forms allowed."""
    if not text.strip():
        return None
    m = _BUDGET.match(text)
    if m is None:
        raise ValueError(f"memory budget {text!r} is not bytes (8000000000), a size with a unit (8G, 7.5GiB, 512M) "
                         "or a share of the machine's memory (60%)")
    value, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit == "%":
        if not 0 < value <= 100:
            raise ValueError(f"memory budget {text!r}: a share must be above 0% and at most 100%")
        return int(machine_memory() * value / 100)
    budget = int(value * _UNITS[unit])
    if budget < 1:
        raise ValueError(f"memory budget {text!r} must be at least 1 byte")
    return budget


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, looked up once (find_library runs ldconfig: not something to do on every eviction)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_freed() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim), so the resident size
    measured after an eviction reflects it."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):  # not glibc
            libc.malloc_trim(0)
