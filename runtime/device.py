"""Where the graphs run: `kiln serve --device cpu|cuda[:N]` and `--providers` -> ONNX Runtime execution providers.

The CPU build of onnxruntime offers only the CPU provider; `onnxruntime-gpu` (the Makefile installs it on NVIDIA
boxes) adds CUDA and TensorRT. A device that the installed onnxruntime cannot drive is an error at start, never a
silent fall-back to the CPU.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
"""`--providers` names and the ONNX Runtime execution providers they stand for."""
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})
DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d{1,3}))?$")

ProviderSpec = list[str | tuple[str, dict[str, Any]]]
"""What `onnxruntime.InferenceSession(providers=...)` takes: names, or (name, options) pairs."""


@dataclass(frozen=True)
class DeviceConfig:
    """The device every session of the server runs on (`--device`, `--providers`, `--trt-cache`)."""

    device: str = "cpu"
    """`cpu`, `cuda` (GPU 0) or `cuda:N` (the N-th NVIDIA GPU, as CUDA numbers them; needs onnxruntime-gpu)."""
    providers: tuple[str, ...] = ()
    """Execution providers in order of preference, from `cpu`, `cuda`, `tensorrt` (e.g. tensorrt,cuda,cpu: ONNX
    Runtime gives each node to the first that runs it). Empty: `cuda,cpu` on a cuda device, `cpu` on the CPU."""
    trt_cache_dir: Path | None = None
    """TensorRT: folder for its engine and timing caches, so only the first start per graph and shape builds
    engines (minutes for a UNet). Required with `tensorrt`."""

    def __post_init__(self) -> None:
        m = DEVICE_RE.match(self.device)
        if not m or (m.group(1) == "cpu" and m.group(2) is not None):
            raise ValueError(f"device={self.device!r} must be cpu, cuda or cuda:N (N a GPU index, 0-999)")
        unknown = [p for p in self.providers if p not in PROVIDERS]
        if unknown:
            raise ValueError(f"providers={','.join(self.providers)}: {', '.join(map(repr, unknown))} is not one of "
                             f"{', '.join(PROVIDERS)}")
        if len(set(self.providers)) != len(self.providers):
            raise ValueError(f"providers={','.join(self.providers)} names a provider twice")
        gpu = [p for p in self.providers if PROVIDERS[p] in GPU_PROVIDERS]
        if self.device == "cpu" and gpu:
            raise ValueError(f"providers={','.join(self.providers)} asks for {', '.join(gpu)} but device=cpu; give "
                             "--device cuda[:N]")
        if self.device != "cpu" and self.providers and not gpu:
            raise ValueError(f"device={self.device} but providers={','.join(self.providers)} has no GPU provider "
                             "(cuda or tensorrt)")
        if "tensorrt" in self.providers and self.trt_cache_dir is None:
            raise ValueError("providers include tensorrt: give --trt-cache DIR (TensorRT otherwise rebuilds every "
                             "engine at every start)")

    @property
    def gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def device_id(self) -> int:
        m = DEVICE_RE.match(self.device)
        assert m is not None
        return int(m.group(2) or 0)

    def names(self) -> list[str]:
        """The ONNX Runtime provider names, in order."""
        chosen = self.providers or (("cuda", "cpu") if self.gpu else ("cpu",))
        return [PROVIDERS[p] for p in chosen]

    def resolve(self, available: Sequence[str]) -> ProviderSpec:
        """Providers with their options for `onnxruntime.InferenceSession`; `available` is what the installed
        onnxruntime offers (`onnxruntime.get_available_providers()`). Raises ValueError naming what is missing."""
        names = self.names()
        missing = [n for n in names if n not in available]
        if missing:
            hint = (" (the CPU build of onnxruntime is installed: install onnxruntime-gpu in its place, see README: "
                    "GPU serving)" if any(n in GPU_PROVIDERS for n in missing) else "")
            raise ValueError(f"device={self.device} needs {', '.join(missing)}, but this onnxruntime offers only "
                             f"{', '.join(available)}{hint}")
        out: ProviderSpec = []
        for name in names:
            if name == "CUDAExecutionProvider":
                out.append((name, {"device_id": self.device_id}))
            elif name == "TensorrtExecutionProvider":
                assert self.trt_cache_dir is not None
                cache = str(self.trt_cache_dir)
                out.append((name, {"device_id": self.device_id, "trt_engine_cache_enable": True,
                                   "trt_engine_cache_path": cache, "trt_timing_cache_enable": True,
                                   "trt_timing_cache_path": cache}))
            else:
                out.append(name)
        return out


def provider_names(spec: ProviderSpec | None) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in (spec or ["CPUExecutionProvider"])]


def binding_device(spec: ProviderSpec | None) -> tuple[str, int] | None:
    """("cuda", N) when the first provider is a GPU one (inputs and outputs are then bound on that GPU), else None."""
    first = (spec or ["CPUExecutionProvider"])[0]
    name, options = (first, {}) if isinstance(first, str) else first
    if name in GPU_PROVIDERS:
        return "cuda", int(options.get("device_id", 0))
    return None


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())
