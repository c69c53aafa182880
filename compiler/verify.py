"""Parity check: an exported component in ONNX Runtime (CPU) against the PyTorch module, same inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compiler.export import ComponentSpec, example_inputs, wrap


class ParityError(RuntimeError):
    """An exported component differs from PyTorch by more than its threshold."""


@dataclass
class Reference:
    """The fixed inputs of a component's parity check and PyTorch's output for them."""

    inputs: dict[str, np.ndarray]
    outputs: list[np.ndarray]
    """One per spec output, in its order."""


def reference(spec: ComponentSpec, source: Any) -> Reference:
    """Run the PyTorch module on the component's fixed inputs. The compile takes this right after the export,
    while the module is loaded anyway, so the module can be let go before the ONNX graph is optimized and
    loaded into ONNX Runtime."""
    import torch

    args = example_inputs(spec, source)
    with torch.inference_mode():
        out = wrap(spec, source.module(spec.source_module))(*args)
    outs = [o.float().numpy() for o in (out if isinstance(out, tuple) else (out,))]
    return Reference({n: a.numpy() for n, a in zip(spec.inputs, args, strict=False)}, outs)


def check_parity(spec: ComponentSpec, source: Any, onnx_path: Path, threshold: float,
                 ref: Reference | None = None) -> dict[str, float]:
    """Run both on fixed inputs (PyTorch's side from `ref` when given); returns max/mean abs difference; raises
    ParityError past `threshold`."""
    import onnxruntime as ort

    ref = ref if ref is not None else reference(spec, source)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    gots = session.run(list(spec.outputs), ref.inputs)
    del session
    diffs = []
    for name, got, want in zip(spec.outputs, gots, ref.outputs, strict=True):
        if got.shape != want.shape:
            raise ParityError(f"{spec.name}: ONNX output {name} shape {got.shape} != PyTorch {want.shape}")
        diffs.append(np.abs(got.astype(np.float64) - want.astype(np.float64)).ravel())
    diff = np.concatenate(diffs)
    result = {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_reference": float(max(np.abs(w).max() for w in ref.outputs)),
        "threshold": threshold,
    }
    if not np.isfinite(diff).all() or result["max_abs_diff"] > threshold:
        raise ParityError(
            f"{spec.name}: ONNX Runtime differs from PyTorch by max_abs_diff={result['max_abs_diff']:.3g} "
            f"(mean {result['mean_abs_diff']:.3g}); the allowed maximum is {threshold:g}. "
            "Raise it with --parity-threshold COMPONENT=VALUE if this is expected."
        )
    return result
