"""The compile's resident memory: the peak RSS of each stage (Linux `/proc`), and handing what a stage freed
back to the operating system so the next stage starts from what is still live."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_libc: ctypes.CDLL | None = None
_shrinker: Any = None


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
    """Collect garbage (PyTorch modules and ONNX graphs hold reference cycles), hand the free regions of ONNX
    Runtime's shared CPU arena back, and return the C heap's free pages to the OS: glibc keeps freed blocks under
    its mmap threshold, which grows up to 32 MiB after large frees, so the weights a stage let go of would
    otherwise still count in every later stage's RSS."""
    global _libc
    gc.collect()
    _shrink_onnxruntime_arena()
    if _libc is None:
        name = ctypes.util.find_library("c")
        if not name:
            return
        _libc = ctypes.CDLL(name)
    trim = getattr(_libc, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def _shrink_onnxruntime_arena() -> None:
    """The runtime's sessions (which the quantize stage runs the fp32 pipeline with) share one CPU arena
    (runtime/sessions.py) that keeps every region it ever grew: 1.9 GiB after an SD v1 pipeline at 512x512, still
    held once every session is closed. A run with ONNX Runtime's arena shrinkage on, through a one-node session on
    that arena, frees the regions no live tensor uses."""
    global _shrinker
    sessions = sys.modules.get("runtime.sessions")
    if sessions is None or not getattr(sessions, "_shared_arena", False):
        return
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if _shrinker is None:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "shrink", [x], [y])
        options = ort.SessionOptions()
        sessions._use_shared_cpu_arena(options)
        _shrinker = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                         .SerializeToString(), options, providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    _shrinker.run(None, {"x": np.zeros(1, np.float32)}, run_options)
