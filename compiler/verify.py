"""Parity check: an exported component in ONNX Runtime (CPU) against the PyTorch module, same inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compiler.export import ComponentSpec, example_inputs, wrap


class ParityError(RuntimeError):
    """An exported component differs from PyTorch by more than its threshold."""


def check_parity(spec: ComponentSpec, source: Any, onnx_path: Path, threshold: float) -> dict[str, float]:
    """Run both on fixed inputs; returns max/mean abs difference; raises ParityError past `threshold`."""
    import onnxruntime as ort
    import torch

    args = example_inputs(spec, source)
    with torch.inference_mode():
        ref = wrap(spec, source.module(spec.source_module))(*args).float().numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([spec.outputs[0]], {n: a.numpy() for n, a in zip(spec.inputs, args, strict=False)})[0]
    if got.shape != ref.shape:
        raise ParityError(f"{spec.name}: ONNX output shape {got.shape} != PyTorch {ref.shape}")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    result = {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_reference": float(np.abs(ref).max()),
        "threshold": threshold,
    }
    if not np.isfinite(diff).all() or result["max_abs_diff"] > threshold:
        raise ParityError(
            f"{spec.name}: ONNX Runtime differs from PyTorch by max_abs_diff={result['max_abs_diff']:.3g} "
            f"(mean {result['mean_abs_diff']:.3g}); the allowed maximum is {threshold:g}. "
            "Raise it with --parity-threshold COMPONENT=VALUE if this is expected."
        )
    return result
