"""Model sessions behind one small interface (named inputs -> named outputs).

The pipeline and engine only see `ModelSession`, so another inference engine can serve the
same ONNX bundle by implementing it.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.adapters import DOWN, UP
from runtime.device import ProviderSpec, binding_device, provider_names
from runtime.graph_cache import GraphCache, GraphKey, write_options

log = logging.getLogger(__name__)


class ModelSession(Protocol):
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


RESIDENT_INPUTS = ("encoder_hidden_states",)
"""Inputs that may stay on the GPU between calls while the caller passes the same array object: the pipeline
sets a request's text embeddings once and never writes into them (LoRA inputs, `lora_down.*` / `lora_up.*`,
are resident too)."""

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
    """An ONNX Runtime InferenceSession on the given execution providers (CPU memory from a shared arena).

    On a GPU provider every call goes through IO binding: outputs are allocated on the GPU by ONNX Runtime and
    copied back once, and an input passed again as the very same array (a request's text embeddings, which every
    denoising step of an unbatched request feeds unchanged) stays on the GPU instead of being uploaded each step.
    The samplers are numpy, so the latents and the noise prediction (64 KiB per 512x512 image) cross once per step.
    """

    def __init__(self, name: str, path: Path, providers: ProviderSpec | None = None, threads: int = 0,
                 io_binding: bool | None = None, resident: Sequence[str] = RESIDENT_INPUTS,
                 config: Mapping[str, str] | None = None, graphs: tuple[GraphCache, GraphKey] | None = None):
        """`config`: further session config entries (runtime/cpu.py's exact int8 kernels). `graphs`: where this
        graph's optimized form is cached and its key (runtime/graph_cache.py); CPU sessions only."""
        import onnxruntime as ort

        self.name = name
        self.graph_cache = "off"
        """`hit` (opened the cached optimized graph), `written` (optimized it and cached the result) or `off`."""
        if graphs is not None and set(provider_names(providers)) != {"CPUExecutionProvider"}:
            graphs = None
        session = None
        if graphs is not None and (cached := graphs[0].lookup(graphs[1])) is not None:
            options = self._options(threads, config, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            try:
                session = ort.InferenceSession(str(cached), options, providers=["CPUExecutionProvider"])
                self.graph_cache = "hit"
            except Exception as e:  # a damaged entry: optimize again and replace it
                log.warning("%s: the cached optimized graph %s failed to open (%s); optimizing %s again", name,
                            cached.parent, e, path)
                graphs[0].discard(graphs[1])
        if session is None:
            options = self._options(threads, config, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
            if graphs is not None:
                staging: Path | None = None
                try:
                    staging = graphs[0].staging()
                    write_options(options, staging)
                    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                    written = graphs[0].publish(staging, graphs[1])
                    self.graph_cache = "written" if written is not None else "off"
                except Exception as e:  # e.g. a read-only or full cache disk: serve without it (a bad graph fails below)
                    log.warning("%s: could not cache its optimized graph in %s (%s); serving it without the cache",
                                name, graphs[0].root, e)
                    if staging is not None:
                        shutil.rmtree(staging, ignore_errors=True)
                    if session is None:
                        options = self._options(threads, config, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
            if session is None:
                session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        self._session = session
        wanted = provider_names(providers)[0]
        if wanted not in self._session.get_providers():
            # ONNX Runtime falls back to the CPU with only a log line when e.g. the CUDA or cuDNN libraries are missing
            raise RuntimeError(f"{name}: ONNX Runtime could not start {wanted} (it fell back to "
                               f"{', '.join(self._session.get_providers())}); check the CUDA, cuDNN and TensorRT "
                               "libraries onnxruntime-gpu needs (README: GPU serving)")
        self.input_names = tuple(i.name for i in self._session.get_inputs())
        self.input_shapes = {i.name: list(i.shape) for i in self._session.get_inputs()}
        """Declared input shapes (ints, or names of dynamic axes)."""
        self.output_names = tuple(o.name for o in self._session.get_outputs())
        device = binding_device(providers)
        if io_binding and device is None:
            device = ("cpu", 0)  # the same path on the CPU provider (tests run it there)
        self._device = device if io_binding is not False else None
        # a LoRA selection's inputs are cached arrays (runtime/adapters.py): resident like the embeddings
        self._resident_names = frozenset(resident) | {n for n in self.input_names if n.startswith((DOWN, UP))}
        self._resident: dict[str, tuple[np.ndarray, object]] = {}
        self.uploads = 0
        """Inputs copied to the device through IO binding (a resident input is not counted again)."""

    @staticmethod
    def _options(threads: int, config: Mapping[str, str] | None, level):  # type: ignore[no-untyped-def]
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # No busy-waiting between ops: the intra-op threads otherwise spin on the cores the gRPC and event-loop
        # threads need between model calls. On the tiny model at 8 clients that lifted the batching server's
        # requests/s by about 15% (`python -m bench throughput --arch tiny --clients 8`, A/B, medians of 3);
        # on SD-sized ops the wake-up cost is noise.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        _use_shared_cpu_arena(options)
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        return options

    @property
    def providers(self) -> list[str]:
        """The providers the session actually got (ONNX Runtime drops those it cannot create)."""
        return list(self._session.get_providers())

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._device is None:
            outputs = self._session.run(list(self.output_names), dict(inputs))
            return dict(zip(self.output_names, outputs, strict=False))
        return self._run_bound(inputs)

    def _run_bound(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        assert self._device is not None
        kind, index = self._device
        binding = self._session.io_binding()
        for name, value in inputs.items():
            held = self._resident.get(name)
            if held is None or held[0] is not value:
                on_device = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), kind, index)
                held = (value, on_device)  # holding `value` keeps its id from being reused by another array
                if name in self._resident_names:
                    self._resident[name] = held
                self.uploads += 1
            binding.bind_ortvalue_input(name, held[1])
        for name in self.output_names:
            binding.bind_output(name, kind, index)
        self._session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))
