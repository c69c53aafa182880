"""Weight-only int8 storage for the MatMul/Gemm nodes that int8's KEEP_FP32 rule keeps out of int8 arithmetic.

The rule keeps the time embedding and the per-resnet `time_emb_proj` projections in fp32 because their input
(the time embedding) is the one activation an int8 grid would coarsen everywhere at once. Their weights are
another matter: per-output-channel symmetric int8 weights keep them within half a step of 1/127 of each row's
largest weight, and in the SD v1 UNet the 22 projections alone are 98 MiB of fp32, a tenth of the int8 file.

This pass stores each such weight as int8 plus one fp32 scale per output channel, read through a
`DequantizeLinear` feeding the unchanged fp32 Gemm/MatMul: the activation and the arithmetic stay fp32. ONNX
Runtime does not constant-fold `DequantizeLinear` by default (it keeps DQ nodes for its QDQ fusions), so the
served session also holds the int8 weights, not an fp32 copy; dequantizing costs one pass over the weight per
call, which for these M = batch products is about what the product itself costs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

MIN_ELEMENTS = 4096
"""Smallest weight stored as int8: a smaller one saves under 12 KiB."""


def quantize_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, float32 scale per slice along `axis`): symmetric, zero point 0, an all-zero slice gets
    scale 1 (every code 0)."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2 or axis not in (0, 1):
        raise ValueError(f"weight of shape {w.shape} with axis={axis}: expected a 2-D weight and axis 0 or 1")
    if not np.isfinite(w).all():
        raise ValueError("weight holds NaN or infinite values; an int8 scale cannot represent them")
    peak = np.abs(w).max(axis=1 - axis)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    shape = (-1, 1) if axis == 0 else (1, -1)
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def apply(model: onnx.ModelProto, node_names: Iterable[str], min_elements: int = MIN_ELEMENTS) -> dict[str, Any]:
    """Store, in place, the constant fp32 B of each named MatMul/Gemm as int8 behind a DequantizeLinear.

    Returns a report: the nodes converted, the ones skipped with the reason, and the weight bytes before and
    after. The model's default-domain opset must be 13 or more (per-axis DequantizeLinear).
    """
    graph = model.graph
    names = set(node_names)
    inits = {t.name: t for t in graph.initializer}
    reads = Counter(i for n in graph.node for i in n.input if i)
    graph_inputs = {i.name for i in graph.input}
    report: dict[str, Any] = {"method": "weight-only int8, per-channel symmetric", "converted": [], "skipped": {},
                              "weight_bytes_before": 0, "weight_bytes_after": 0}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if names and opset < 13:
        raise ValueError(f"opset {opset}: per-axis DequantizeLinear needs opset 13 or more")
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name in names:
            reason = _ineligible(node, inits, reads, graph_inputs, min_elements)
            if reason:
                report["skipped"][node.name] = reason
            else:
                tensor = inits[node.input[1]]
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                axis = 0 if node.op_type == "Gemm" and attrs.get("transB", 0) else 1  # the output-channel axis
                q, scale = quantize_weight(numpy_helper.to_array(tensor), axis)
                base = tensor.name
                graph.initializer.remove(tensor)
                graph.initializer.extend([
                    numpy_helper.from_array(q, f"{base}_int8"),
                    numpy_helper.from_array(scale, f"{base}_int8_scale"),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_int8_zero_point"),
                ])
                new_nodes.append(helper.make_node(
                    "DequantizeLinear", [f"{base}_int8", f"{base}_int8_scale", f"{base}_int8_zero_point"], [base],
                    name=f"{node.name}_weight_dq", axis=axis))
                report["converted"].append(node.name)
                report["weight_bytes_before"] += q.size * 4
                report["weight_bytes_after"] += q.size + scale.size * 5
        new_nodes.append(node)
    if report["converted"]:
        graph.ClearField("node")
        graph.node.extend(new_nodes)
    missing = names - {n.name for n in graph.node}
    for name in sorted(missing):
        report["skipped"][name] = "no node of that name"
    return report


def _ineligible(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], reads: Counter[str],
                graph_inputs: set[str], min_elements: int) -> str | None:
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return f"{node.op_type} is not a MatMul or Gemm"
    b = node.input[1]
    if b not in inits or b in graph_inputs:
        return "B is not a constant initializer"
    if reads[b] != 1:
        return f"B is read by {reads[b]} nodes"
    tensor = inits[b]
    if tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) != 2:
        return "B is not a 2-D float32 weight"
    if tensor.dims[0] * tensor.dims[1] < min_elements:
        return f"B has {tensor.dims[0] * tensor.dims[1]} elements, below min_elements={min_elements}"
    return None
