"""The compile's resident memory: the peak RSS of each stage (Linux `/proc`), and handing what a stage freed
back to the operating system so the next stage starts from what is still live."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

_STATUS = Path("/proc/self/status")
_libc: ctypes.CDLL | None = None


def _status_bytes(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss() -> int | None:
    """This process's resident set now, in bytes (None where /proc is missing)."""
    return _status_bytes("VmRSS")


def reset_peak() -> bool:
    """Start a new peak: the kernel's high-water mark (VmHWM) becomes the current RSS. False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """The highest RSS since the last `reset_peak` (or since the process started), in bytes."""
    return _status_bytes("VmHWM")


def release() -> None:
    """Collect garbage (PyTorch modules and ONNX graphs hold reference cycles) and return the C heap's free pages
    to the OS: glibc keeps freed blocks under its mmap threshold, which grows up to 32 MiB after large frees, so
    the weights a stage let go of would otherwise still count in every later stage's RSS."""
    global _libc
    gc.collect()
    if _libc is None:
        name = ctypes.util.find_library("c")
        if not name:
            return
        _libc = ctypes.CDLL(name)
    trim = getattr(_libc, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)
