"""Unpack fused self-attention so its projection weights are plain MatMuls again (for quantized bundles).

ONNX Runtime's UNet fusion turns self-attention into `Attention(x, Wqkv, bias)`, which hides the Q/K/V
projection weights inside one op that no quantizer handles (QDQ, MatMulBnb4 and MatMulNBits all rewrite
MatMul). This pass rewrites each such node into three MatMuls (`x @ Wq`, `x @ Wk`, `x @ Wv`) feeding a
`MultiHeadAttention` with the same bias and heads, so the attention core stays fused while its weights
become quantizable. Numerically it is the same computation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def apply(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite in place; returns the model and the number of Attention nodes unpacked.

    Nodes with a mask, past state, `qkv_hidden_sizes`, `unidirectional` or a non-initializer weight are
    left alone (the UNet and VAE have none of those).
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    unpacked = 0
    nodes: list[onnx.NodeProto] = []
    drop: set[str] = set()
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = node.input[1] if node.op_type == "Attention" and len(node.input) > 1 else ""
        simple = (node.domain == "com.microsoft" and len([i for i in node.input if i]) <= 3
                  and set(attrs) <= {"num_heads", "scale"} and weight in inits)
        if node.op_type != "Attention" or not simple:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[weight])
        d = w.shape[1] // 3
        if w.ndim != 2 or w.shape[1] != 3 * d:
            nodes.append(node)
            continue
        outs = []
        for part, cols in zip("qkv", (slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)), strict=True):
            name = f"{node.name}_{part}"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[:, cols]), f"{name}_weight"))
            nodes.append(helper.make_node("MatMul", [node.input[0], f"{name}_weight"], [f"{name}_out"], name=name))
            outs.append(f"{name}_out")
        bias = node.input[2] if len(node.input) > 2 else ""
        mha = helper.make_node("MultiHeadAttention", [*outs, bias], list(node.output), name=f"{node.name}_mha",
                               domain="com.microsoft", **attrs)
        nodes.append(mha)
        drop.add(weight)
        unpacked += 1
    if unpacked:
        still_used = {i for n in nodes for i in n.input}
        keep = [i for i in graph.initializer if i.name not in drop or i.name in still_used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        del graph.node[:]
        graph.node.extend(nodes)
    return model, unpacked
