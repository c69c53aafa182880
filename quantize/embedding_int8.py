"""int8 storage for embedding tables: each constant 2-D table a `Gather` reads becomes int8 rows with one fp32
scale per row.

No MatMul quantizer touches a lookup table, yet CLIP's token embedding (49,408 x 768) is 145 MiB of fp32: more
than half of an int8 or 4-bit text encoder, held in memory by every server. Rows are what a lookup reads, so
the scale is per row (symmetric, zero point 0): a looked-up vector is within half a step of 1/127 of its own
largest entry. The graph gathers the int8 rows and their scales with the same indices and multiplies:

    Gather(table, ids)  ->  Cast(Gather(table_int8, ids), float) * Gather(table_scale[V, 1], ids)

Only the looked-up rows are ever converted to fp32 (77 per prompt), so the session holds the int8 table alone.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper, numpy_helper

from quantize.weight_int8 import quantize_weight

MIN_ELEMENTS = 1 << 20
"""Smallest table converted: CLIP's position table (77 x 768) saves 170 KiB, not worth touching."""


def apply(model: onnx.ModelProto, min_elements: int = MIN_ELEMENTS) -> dict[str, Any]:
    """Convert, in place, every eligible table of `model`'s main graph; returns what was converted and why the
    others were left alone."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    report: dict[str, Any] = {"method": "int8 rows, one fp32 scale per row", "converted": [], "skipped": {},
                              "weight_bytes_before": 0, "weight_bytes_after": 0}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.input[0] not in inits:
            nodes.append(node)
            continue
        reason = _ineligible(node, inits[node.input[0]], readers, graph_inputs, min_elements)
        label = node.name or node.output[0]
        if reason:
            report["skipped"][label] = reason
            nodes.append(node)
            continue
        table = inits[node.input[0]]
        q, scale = quantize_weight(numpy_helper.to_array(table), axis=0)
        base = table.name
        graph.initializer.remove(table)
        graph.initializer.extend([numpy_helper.from_array(q, f"{base}_int8"),
                                  numpy_helper.from_array(scale.reshape(-1, 1), f"{base}_int8_scale")])
        ids, out = node.input[1], node.output[0]
        nodes += [
            helper.make_node("Gather", [f"{base}_int8", ids], [f"{out}_int8"], name=f"{label}_int8", axis=0),
            helper.make_node("Gather", [f"{base}_int8_scale", ids], [f"{out}_scale"], name=f"{label}_scale", axis=0),
            helper.make_node("Cast", [f"{out}_int8"], [f"{out}_rows"], name=f"{label}_cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{out}_rows", f"{out}_scale"], [out], name=f"{label}_dequantize"),
        ]
        report["converted"].append(label)
        report["weight_bytes_before"] += q.size * 4
        report["weight_bytes_after"] += q.size + scale.size * 4
    if report["converted"]:
        graph.ClearField("node")
        graph.node.extend(nodes)
    return report


def _ineligible(node: onnx.NodeProto, table: onnx.TensorProto, readers: dict[str, int], graph_inputs: set[str],
                min_elements: int) -> str | None:
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
    if axis != 0:
        return f"Gather axis={axis}; only row lookups (axis 0) are converted"
    if table.name in graph_inputs:
        return "the table is also a graph input, so a caller may override it"
    if readers[table.name] != 1:
        return f"the table is read by {readers[table.name]} nodes"
    if table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2:
        return "the table is not a 2-D float32 tensor"
    if table.dims[0] * table.dims[1] < min_elements:
        return f"the table has {table.dims[0] * table.dims[1]} elements, below min_elements={min_elements}"
    return None
