"""Model sessions behind one small interface (named inputs -> named outputs).

The pipeline and engine only see `ModelSession`, so another inference engine can serve the
same ONNX bundle by implementing it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np


class ModelSession(Protocol):
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


_shared_arena_lock = threading.Lock()
_shared_arena = False


def _use_shared_cpu_arena(options) -> None:  # type: ignore[no-untyped-def]
    """Make the session allocate CPU memory from one arena shared by every session in the process.

    By default each session grows its own arena to its own peak and keeps it, so a process holds the sum of the
    text encoder's, UNet's and VAE's peaks although they never run at the same moment within a request; one
    shared arena holds about the largest of them (`python -m bench precision`: peak RSS). Turning the arena
    off instead costs speed (every large tensor is fresh memory to fault in)."""
    import onnxruntime as ort

    global _shared_arena
    with _shared_arena_lock:
        if not _shared_arena:
            ort.create_and_register_allocator(
                ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
                ort.OrtArenaCfg(0, -1, -1, -1),  # ONNX Runtime's defaults: no limit, its usual growth
            )
            _shared_arena = True
    options.add_session_config_entry("session.use_env_allocators", "1")


class OrtSession:
    """An ONNX Runtime InferenceSession on the given execution providers (CPU memory from a shared arena)."""

    def __init__(self, name: str, path: Path, providers: list[str] | None = None, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # No busy-waiting between ops: the intra-op threads otherwise spin on the cores the gRPC and event-loop
        # threads need between model calls. On the tiny model at 8 clients that lifted the batching server's
        # requests/s by about 15% (`python -m bench throughput --arch tiny --clients 8`, A/B, medians of 3);
        # on SD-sized ops the wake-up cost is noise.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        _use_shared_cpu_arena(options)
        self.name = name
        self._session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self.input_names = tuple(i.name for i in self._session.get_inputs())
        self.output_names = tuple(o.name for o in self._session.get_outputs())

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._session.run(list(self.output_names), dict(inputs))
        return dict(zip(self.output_names, outputs, strict=False))
