"""OpenVINO sessions: the same ONNX bundle run by OpenVINO's CPU plugin (bf16 and int8 on AMX), behind `ModelSession`.

openvino is an optional extra (`pip install kiln[openvino]`); it is imported only when this engine is chosen.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PRECISIONS = ("default", "f32", "bf16")
PIP_EXTRA = "pip install 'kiln[openvino]' (or: pip install openvino)"


class OpenVinoMissing(RuntimeError):
    """engine 'openvino' was chosen but the openvino package is not installed."""


class UnreadableGraph(ValueError):
    """A bundle component's graph that OpenVINO cannot convert or compile (e.g. com.microsoft.MatMulBnb4 in nf4)."""


@dataclass(frozen=True)
class OpenVinoConfig:
    precision: str = "default"
    """Inference precision of floating-point layers: `default` leaves it to OpenVINO (bf16 on CPUs with AMX or
    AVX512-BF16, else f32), `f32` forces fp32 everywhere, `bf16` asks for bf16 (OpenVINO ignores it where the CPU
    lacks bf16). int8 QDQ layers run int8 whatever this says."""
    threads: int = 0
    """CPU threads per compiled model (`INFERENCE_NUM_THREADS`); 0 lets OpenVINO use one per physical core."""
    cache_dir: str = ""
    """Folder where OpenVINO keeps compiled models (`CACHE_DIR`) so the next start skips compilation; empty: none."""
    static_shapes: bool = False
    """Compile one static-shape model per input-shape signature (batch rows, latent size), the first time a call
    brings it, instead of one dynamic-shape model: faster calls, for a compile (or a `cache_dir` read) per new shape
    at the first request that brings it and a compiled model's memory per shape. SD v1's int8 UNet on a 2-core Xeon
    with AMX: 1.57 s per guided step against 1.81-1.95 s (bench/results/latency-static-sd-v1.md)."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be 0 (OpenVINO's choice) or more")

    def properties(self) -> dict[str, Any]:
        """The CPU plugin properties for `compile_model`: latency mode (one stream, all threads on one request)."""
        props: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if self.precision != "default":
            props["INFERENCE_PRECISION_HINT"] = self.precision
        if self.threads:
            props["INFERENCE_NUM_THREADS"] = self.threads
        if self.cache_dir:
            props["CACHE_DIR"] = self.cache_dir
        return props


_core_lock = threading.Lock()
_core: Any = None


def _blobs(cache_dir: str) -> set[str]:
    """The compiled-model files in an OpenVINO CACHE_DIR."""
    return {p.name for p in Path(cache_dir).glob("*.blob")} if cache_dir else set()


def require_openvino() -> Any:
    """One `openvino.Core` per process (it owns the plugins and their thread pools); OpenVinoMissing without it."""
    global _core
    with _core_lock:
        if _core is None:
            try:
                import openvino as ov
            except ImportError:
                raise OpenVinoMissing(f"engine 'openvino' needs the openvino package: {PIP_EXTRA}") from None
            _core = ov.Core()
        return _core


def _unconverted_ops(message: str) -> str:
    """The ops OpenVINO's ONNX frontend names as unconvertible, from its error text (else its last lines)."""
    found = re.findall(r"No conversion rule found for operations?: (.+)", message)
    if found:
        return "no conversion rule for ops " + ", ".join(o.strip() for line in found for o in line.split(","))
    return " ".join(line.strip() for line in message.strip().splitlines()[-3:])


class OpenVinoSession:
    """An OpenVINO compiled model on the CPU over a bundle component's .onnx file: one with dynamic shapes, or with
    `static_shapes` one per input-shape signature, compiled when a call first brings it."""

    def __init__(self, name: str, path: Path, config: OpenVinoConfig | None = None):
        config = config or OpenVinoConfig()
        self.name = name
        self.path = path
        self.config = config
        self._static: dict[tuple[tuple[str, tuple[int, ...]], ...], Any] = {}
        self._static_lock = threading.Lock()
        self._model: Any = None
        """static_shapes: the read (dynamic) ov.Model each static one is reshaped from."""
        blobs = _blobs(config.cache_dir)
        compiled = self._compile(None)
        self.graph_cache = "off" if not config.cache_dir else "pending" if config.static_shapes else \
            "written" if _blobs(config.cache_dir) - blobs else "hit"
        """With a `cache_dir`: `written` (compiled, and OpenVINO wrote its blob) or `hit` (read a blob); else `off`.
        With static_shapes, of the latest shape compiled (`pending` before the first)."""
        self.input_names = tuple(p.get_any_name() for p in compiled.inputs)
        self.output_names = tuple(p.get_any_name() for p in compiled.outputs)
        self._compiled = None if config.static_shapes else compiled
        self._local = threading.local()

    def _compile(self, shapes: dict[str, list[int]] | None) -> Any:
        """The dynamic-shape model (`shapes` None; with static_shapes, only read and checked: the first shape's
        compile follows), or one reshaped to `shapes`."""
        core = require_openvino()
        try:
            if not self.config.static_shapes:
                # from the path, not a read ov.Model: CACHE_DIR then keys the blob on the file, not on a weights hash
                return core.compile_model(str(self.path), "CPU", self.config.properties())
            if self._model is None:
                self._model = core.read_model(str(self.path))
            if shapes is None:
                return self._model
            model = self._model.clone()
            model.reshape(shapes)
            return core.compile_model(model, "CPU", self.config.properties())
        except RuntimeError as e:
            raise UnreadableGraph(
                f"component {self.name} ({self.path.name}): OpenVINO cannot read it: {_unconverted_ops(str(e))}; serve "
                "this bundle with engine 'onnxruntime', or compile it with a precision OpenVINO reads (fp32, int8, int4)"
            ) from None

    def _compiled_for(self, inputs: Mapping[str, np.ndarray]) -> Any:
        if self._compiled is not None:
            return self._compiled
        key = tuple(sorted((n, tuple(a.shape)) for n, a in inputs.items()))
        compiled = self._static.get(key)
        if compiled is None:
            with self._static_lock:  # one compile per shape, however many threads bring it at once
                compiled = self._static.get(key)
                if compiled is None:
                    blobs = _blobs(self.config.cache_dir)
                    compiled = self._static[key] = self._compile({n: list(shape) for n, shape in key})
                    if self.config.cache_dir:
                        self.graph_cache = "written" if _blobs(self.config.cache_dir) - blobs else "hit"
        return compiled

    @property
    def static_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """With static_shapes: the input shapes compiled so far."""
        return [dict(k) for k in self._static]

    @property
    def inference_precision(self) -> str:
        """The floating-point precision OpenVINO chose (`f32` or `bf16`); with static_shapes, of the first compiled
        shape ("" before any)."""
        compiled = self._compiled if self._compiled is not None else next(iter(self._static.values()), None)
        return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() if compiled is not None else ""

    def _request(self, compiled: Any) -> Any:
        # an infer request must not run on two threads at once: each calling thread gets its own, per compiled model
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        req = requests.get(id(compiled))
        if req is None:
            req = requests[id(compiled)] = compiled.create_infer_request()
        return req

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # inputs are only read during this synchronous call, so OpenVINO may use them in place; outputs are copied
        # out because the request reuses its buffers on the next call
        compiled = self._compiled_for(inputs)
        result = self._request(compiled).infer(dict(inputs), share_inputs=True, share_outputs=False)
        return {n: result[p] for n, p in zip(self.output_names, compiled.outputs, strict=True)}
