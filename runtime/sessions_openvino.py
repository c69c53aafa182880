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
    """An OpenVINO compiled model on the CPU over a bundle component's .onnx file (dynamic shapes kept)."""

    def __init__(self, name: str, path: Path, config: OpenVinoConfig | None = None):
        config = config or OpenVinoConfig()
        core = require_openvino()
        blobs = _blobs(config.cache_dir)
        try:
            # from the path, not a read ov.Model: CACHE_DIR then keys the blob on the file instead of hashing weights
            self._compiled = core.compile_model(str(path), "CPU", config.properties())
        except RuntimeError as e:
            raise UnreadableGraph(
                f"component {name} ({path.name}): OpenVINO cannot read it: {_unconverted_ops(str(e))}; serve this "
                "bundle with engine 'onnxruntime', or compile it with a precision OpenVINO reads (fp32, int8, int4)"
            ) from None
        self.name = name
        self.config = config
        self.graph_cache = "off" if not config.cache_dir else "written" if _blobs(config.cache_dir) - blobs else "hit"
        """With a `cache_dir`: `written` (compiled, and OpenVINO wrote its blob) or `hit` (read a blob); else `off`."""
        self.input_names = tuple(p.get_any_name() for p in self._compiled.inputs)
        self.output_names = tuple(p.get_any_name() for p in self._compiled.outputs)
        self._outputs = list(self._compiled.outputs)
        self._local = threading.local()

    @property
    def inference_precision(self) -> str:
        """The floating-point precision OpenVINO chose (`f32` or `bf16`)."""
        return self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def _request(self) -> Any:
        # an infer request must not run on two threads at once: each calling thread gets its own
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self._compiled.create_infer_request()
        return req

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # inputs are only read during this synchronous call, so OpenVINO may use them in place; outputs are copied
        # out because the request reuses its buffers on the next call
        result = self._request().infer(dict(inputs), share_inputs=True, share_outputs=False)
        return {n: result[p] for n, p in zip(self.output_names, self._outputs, strict=True)}
