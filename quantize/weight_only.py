"""The graph walk shared by the weight-only 4-bit methods (nf4, int4): which MatMul/Gemm weights qualify,
the swap of each for a `com.microsoft` contrib op reading the packed weight, and the report.

A method supplies one function that packs a float32 weight given as [N, K] (a torch Linear weight, i.e.
ONNX MatMul's B transposed) and names the op and its attributes; everything about the graph lives here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

MS_DOMAIN = "com.microsoft"
MIN_ELEMENTS = 4096
"""Default smallest K*N converted: a smaller weight saves under 14 KiB, not worth its rounding error."""


@dataclass
class Replacement:
    """What a method puts in place of one fp32 weight."""

    initializers: list[onnx.TensorProto]
    """New initializers, in the order the op reads them after A (e.g. packed B, then scales), each named by
    a suffix (`nf4`, `nf4_absmax`) that the pass appends to the fp32 weight's name."""
    attributes: dict[str, Any]
    """Attributes of the contrib op (K, N, block_size, ...)."""


Quantizer = Callable[[np.ndarray], Replacement]
"""Packs one weight given as a contiguous float32 [N, K] array."""
Check = Callable[[int, int], str | None]
"""(K, N) -> why the op cannot take this weight, or None."""


@dataclass
class Report:
    op_type: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    kept_fp32: list[str] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0

    def as_dict(self, **settings: Any) -> dict[str, Any]:
        return {
            "op_type": self.op_type, **settings,
            "converted": self.converted, "skipped": self.skipped, "kept_fp32": self.kept_fp32,
            "weight_bytes_before": self.weight_bytes_before, "weight_bytes_after": self.weight_bytes_after,
        }


def check_block_size(block_size: int, allowed: tuple[int, ...]) -> None:
    if block_size not in allowed:
        raise ValueError(f"block_size={block_size} must be one of {', '.join(map(str, allowed))}")


def check_weight(weight: np.ndarray, what: str) -> np.ndarray:
    """`weight` as float32, refusing what no 4-bit code can represent."""
    weight = np.asarray(weight)
    if weight.dtype not in (np.float16, np.float32):
        raise ValueError(f"{what} has dtype {weight.dtype}; expected float32 or float16")
    if weight.ndim != 2 or weight.size == 0:
        raise ValueError(f"{what} has shape {weight.shape}; expected a non-empty 2-D [N, K] array")
    weight = weight.astype(np.float32, copy=False)
    if not np.isfinite(weight).all():
        raise ValueError(f"{what} holds NaN or infinite values; 4-bit codes can only scale finite weights")
    return weight


def rewrite(
    model: onnx.ModelProto,
    op_type: str,
    quantize: Quantizer,
    check: Check,
    min_elements: int,
    base_dir: str | Path | None,
) -> Report:
    """Replace, in place, every eligible MatMul/Gemm of `model`'s main graph by `op_type` reading a packed weight.

    The model is never copied: beyond it, the pass holds one fp32 weight (and its transpose) plus the packed
    weights. Each fp32 initializer is deleted once nothing else reads it, but protobuf frees that memory only
    with the whole model; for the least memory, load the model with `load_external_data=False` and pass its
    folder as `base_dir`: weights are then read from disk one by one, and what stays fp32 is loaded at the
    end, so the returned model is self-contained and can be saved anywhere.
    """
    if min_elements < 0:
        raise ValueError(f"min_elements={min_elements} must be 0 or more")
    graph = model.graph
    report = Report(op_type)
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    reads = Counter(_names_read(graph))
    taken = set(inits) | {o for n in graph.node for o in n.output} | graph_inputs
    done: dict[tuple[str, bool], tuple[list[str], dict[str, Any]]] = {}  # (weight, transposed) -> its op inputs
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            new_nodes.append(node)
            continue
        label = node.name or node.output[0]
        reason, transposed = _ineligible(node, inits, graph_inputs, min_elements, check)
        if reason:
            report.skipped[label] = reason
            new_nodes.append(node)
            continue
        b_name = node.input[1]
        tensor = inits[b_name]
        k, n = (tensor.dims[1], tensor.dims[0]) if not transposed else (tensor.dims[0], tensor.dims[1])
        key = (b_name, transposed)
        if key not in done:
            weight_nk = _read(tensor, base_dir)
            if transposed:  # B is [K, N]; the packers take [N, K]
                weight_nk = np.ascontiguousarray(weight_nk.T)
            replacement = quantize(weight_nk)
            del weight_nk
            names = []
            for t in replacement.initializers:
                t.name = _unique(f"{b_name}_{t.name}", taken)
                names.append(t.name)
            graph.initializer.extend(replacement.initializers)
            done[key] = names, replacement.attributes
            report.weight_bytes_before += k * n * 4
            report.weight_bytes_after += sum(len(t.raw_data) for t in replacement.initializers)
        new_nodes.extend(_swap(node, op_type, *done[key], taken))
        report.converted.append(label)
        reads[b_name] -= 1
        if reads[b_name] == 0:
            _delete_initializer(graph, b_name)
            del inits[b_name]
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    report.kept_fp32 = sorted({b for b, _ in done} & set(inits))
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    if base_dir is not None:
        load_external_data_for_model(model, str(base_dir))
    return report


def _ineligible(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], graph_inputs: set[str],
                min_elements: int, check: Check) -> tuple[str | None, bool]:
    """(why `node` is left alone or None, whether its B is [K, N] and needs transposing to [N, K])."""
    b_name = node.input[1]
    transposed = True
    if node.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            return "Gemm transA=1 is not converted", transposed
        has_c = len(node.input) > 2 and node.input[2] != ""
        alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
        if alpha != 1.0 or (has_c and beta != 1.0):
            return f"Gemm alpha={alpha}, beta={beta}; only alpha=1, beta=1 are converted", transposed
        transposed = not attrs.get("transB", 0)
    if b_name not in inits:
        return "B is computed at run time, not an initializer", transposed
    if b_name in graph_inputs:
        return "B is also a graph input, so a caller may override it", transposed
    tensor = inits[b_name]
    if tensor.data_type != onnx.TensorProto.FLOAT:
        dtype = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        return f"B is {dtype}; only float32 weights are converted", transposed
    if len(tensor.dims) != 2:
        return f"B has shape {list(tensor.dims)}; only 2-D weights are converted", transposed
    k, n = (tensor.dims[0], tensor.dims[1]) if transposed else (tensor.dims[1], tensor.dims[0])
    if k * n < min_elements:
        return f"K*N={k}*{n}={k * n} is below min_elements={min_elements}", transposed
    return check(k, n), transposed


def _swap(node: onnx.NodeProto, op_type: str, packed: list[str], attributes: dict[str, Any],
          taken: set[str]) -> list[onnx.NodeProto]:
    name = f"{node.name}_{op_type}" if node.name else ""
    has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] != ""
    out = _unique(f"{node.output[0]}_nobias", taken) if has_bias else node.output[0]
    nodes = [onnx.helper.make_node(op_type, [node.input[0], *packed], [out], name=name, domain=MS_DOMAIN,
                                   **attributes)]
    if has_bias:  # neither contrib op takes Gemm's C (MatMulNBits' bias must be [N]); Add broadcasts like Gemm
        nodes.append(onnx.helper.make_node("Add", [out, node.input[2]], [node.output[0]],
                                           name=f"{node.name}_bias" if node.name else ""))
    return nodes


def _read(tensor: onnx.TensorProto, base_dir: str | Path | None) -> np.ndarray:
    if uses_external_data(tensor):
        if base_dir is None:
            raise ValueError(f"initializer {tensor.name!r} is stored in an external file; "
                             "pass base_dir=<the folder of the .onnx file>")
        return numpy_helper.to_array(tensor, base_dir=str(base_dir))
    return numpy_helper.to_array(tensor)


def _delete_initializer(graph: onnx.GraphProto, name: str) -> None:
    for i, t in enumerate(graph.initializer):
        if t.name == name:
            del graph.initializer[i]
            return


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def _names_read(graph: onnx.GraphProto) -> Iterator[str]:
    """Every name read by a node (subgraphs included: they may read outer-scope weights) or a graph output."""
    for node in graph.node:
        yield from (i for i in node.input if i)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _names_read(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _names_read(g)
    yield from (o.name for o in graph.output)
