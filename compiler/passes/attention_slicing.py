"""Attention slicing: self-attention computed without holding its whole (queries x keys) score matrix.

What holds the scores depends on the graph (ONNX Runtime 1.31 CPU; numbers in bench/results/memory.md):

- `com.microsoft.MultiHeadAttention` runs MLAS's tiled flash-attention kernel (float, no mask, no past
  state, and ONNX Runtime must see the CPU's L2 cache size): its memory does not grow with S^2. Left alone.
- `com.microsoft.Attention`, the fusion's packed-QKV self-attention, has no tiled CPU kernel: it allocates
  batch x heads x S x S floats (5 GiB for SD v1 at 768x768 with CFG). Rewritten into Q/K/V MatMuls and a
  MultiHeadAttention (compiler/passes/unpack_attention.py), which is tiled; the slice count plays no part.
- plain ONNX attention (`--no-fusions`), MatMul -> Softmax -> MatMul, holds the scores and their softmax.
  Each self-attention is cut along its query axis into slices that ONNX Runtime runs one after another, so
  only one slice's scores are alive at a time. Cross-attention (keys from the 77 text tokens) is small and
  left whole. ONNX Runtime's memory pattern (SessionOptions.enable_mem_pattern, on by default) places about
  two slices side by side instead of reusing one slice's space, so the sliced peak is about twice what it
  is with the pattern off; still a fraction of the unsliced one.

Slices are sized in the graph from the runtime shapes, so every image size the bundle serves is sliced:
an explicit count N cuts the queries into N near-equal slices; `auto` makes each slice's score matrix at
most AUTO_SLICE_BYTES, using at most AUTO_MAX_SLICES slices (past that, slices grow): SD v1 at 512x512 runs
in 16 slices of 64 MiB, at 768x768 in 64 of 81 MiB, at 256x256 in one.

Run it after the fusions (and tome.fuse_attention), before the quantize stage: the Q/K/V MatMuls it leaves
are what the quantizers rewrite, and the score MatMuls (two activations) stay fp32 as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.passes import unpack_attention
from compiler.passes.graph import producers_and_consumers

AUTO = "auto"
MIN_SLICES, MAX_SLICES = 2, 64
"""Allowed explicit slice counts."""
AUTO_SLICE_BYTES = 64 * 2**20
"""`auto`: the largest score matrix (fp32) one slice may hold."""
AUTO_MAX_SLICES = 64
"""`auto`: slices made per attention; those a small image does not need are empty (six kernels on empty
tensors each, microseconds)."""

Slices = int | Literal["auto"]
SLICE_TAG = "/attention_slicing"
"""In the names of the nodes the pass adds."""


def parse(value: str | int) -> Slices:
    """`"auto"` or an integer (or its string) from MIN_SLICES to MAX_SLICES; anything else is a ValueError."""
    n: int | None = None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        n = int(text) if text.isdigit() else None
    elif isinstance(value, int) and not isinstance(value, bool):
        n = value
    if n is None or not MIN_SLICES <= n <= MAX_SLICES:
        raise ValueError(
            f"attention_slicing={value!r} must be 'auto' or an integer from {MIN_SLICES} to {MAX_SLICES}"
        )
    return n


@dataclass(frozen=True)
class _Chain:
    """One plain attention: scores = MatMul(queries, keys_t) [-> scalar Mul/Div/Add ...] -> Softmax -> MatMul."""

    nodes: list[onnx.NodeProto]
    queries: str
    keys_t: str


def apply(model: onnx.ModelProto, slices: str | int) -> tuple[onnx.ModelProto, int]:
    """Rewrite `model` in place; returns it and the number of attentions rewritten (fused self-attention
    unpacked onto the tiled kernel, plus plain self-attentions sliced)."""
    n = parse(slices)
    model, unpacked = unpack_attention.apply(model)
    chains = _self_attention_chains(model)
    if not chains:
        return model, unpacked
    graph = model.graph
    replaced = {id(node): chain for chain in chains for node in chain.nodes}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        chain = replaced.get(id(node))
        if chain is None:
            nodes.append(node)
        elif node is chain.nodes[-1]:  # every input of the chain exists by its last node
            new_nodes, inits = _sliced(chain, n, len(nodes))
            nodes.extend(new_nodes)
            graph.initializer.extend(inits)
    del graph.node[:]
    graph.node.extend(nodes)
    return model, unpacked + len(chains)


def _self_attention_chains(model: onnx.ModelProto) -> list[_Chain]:
    graph = model.graph
    producer, consumers = producers_and_consumers(graph.node)
    outputs = {o.name for o in graph.output}
    scalars = _scalar_constants(model)
    sources = _graph_input_ancestry(model)

    def only_consumer(tensor: str) -> onnx.NodeProto | None:
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in outputs else None

    chains = []
    for softmax in graph.node:
        if softmax.op_type != "Softmax" or softmax.domain not in ("", "ai.onnx"):
            continue
        axis = next((helper.get_attribute_value(a) for a in softmax.attribute if a.name == "axis"), -1)
        after = only_consumer(softmax.output[0])
        if axis != -1 or after is None or after.op_type != "MatMul" or after.input[0] != softmax.output[0]:
            continue
        between: list[onnx.NodeProto] = []
        node = producer.get(softmax.input[0])
        while node is not None and node.op_type in ("Mul", "Div", "Add") \
                and only_consumer(node.output[0]) is not None:
            data = [i for i in node.input if i not in scalars]
            if len(data) != 1 or (node.op_type == "Div" and node.input[0] != data[0]):
                node = None
                break
            between.insert(0, node)
            node = producer.get(data[0])
        if node is None or node.op_type != "MatMul" or only_consumer(node.output[0]) is None:
            continue
        queries, keys_t = node.input[0], node.input[1]
        if SLICE_TAG in (producer[queries].name if queries in producer else ""):
            continue  # already a slice: applying the pass twice changes nothing
        # self-attention: the keys come from every graph input the queries come from (the same tokens);
        # cross-attention's keys come from the text embedding alone
        if not sources.get(queries) or not sources[queries] <= sources.get(keys_t, frozenset()):
            continue
        chains.append(_Chain([node, *between, softmax, after], queries, keys_t))
    return chains


def _scalar_constants(model: onnx.ModelProto) -> set[str]:
    """Names of one-element constant tensors (initializers and Constant outputs)."""
    out = {i.name for i in model.graph.initializer if int(np.prod(i.dims)) == 1}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            value = helper.get_attribute_value(node.attribute[0])
            if isinstance(value, onnx.TensorProto) and int(np.prod(value.dims)) == 1:
                out.add(node.output[0])
    return out


def _graph_input_ancestry(model: onnx.ModelProto) -> dict[str, frozenset[str]]:
    """For every tensor, the graph inputs whose values it is computed from (graph nodes are in topological
    order). A shape is not a value: cross-attention reshapes its keys with sizes read off the image tokens."""
    inits = {i.name for i in model.graph.initializer}
    out = {i.name: frozenset([i.name]) for i in model.graph.input if i.name not in inits}
    empty: frozenset[str] = frozenset()
    for node in model.graph.node:
        if node.op_type in ("Shape", "Size"):
            deps = empty
        else:
            deps = empty.union(*(out.get(i, empty) for i in node.input if i))
        for o in node.output:
            out[o] = deps
    return out


def _sliced(chain: _Chain, slices: Slices, index: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The chain repeated over query slices, concatenated back into its output (same name)."""
    base = f"{chain.nodes[-1].name or chain.nodes[-1].output[0]}{SLICE_TAG}{index}"
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: int) -> str:
        inits.append(numpy_helper.from_array(np.array([value], np.int64), f"{base}/{name}"))
        return f"{base}/{name}"

    def op(op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op_type, inputs, [f"{base}/{name}_out"], name=f"{base}/{name}", **attrs))
        return f"{base}/{name}_out"

    count = AUTO_MAX_SLICES if slices == AUTO else int(slices)
    shape_q = op("Shape", [chain.queries], "shape_q")
    n_q = op("Slice", [shape_q, const("minus2", -2), const("minus1", -1)], "n_q")
    step = op("Div", [op("Add", [n_q, const("count_m1", count - 1)], "n_q_up"), const("count", count)], "even")
    if slices == AUTO:
        # rows whose scores fit the budget: budget / (batch dims x keys), at least the even step above
        shape_k = op("Shape", [chain.keys_t], "shape_k")
        n_k = op("Slice", [shape_k, const("minus1b", -1), const("end", 2**62)], "n_k")
        batch = op("ReduceProd", [op("Slice", [shape_q, const("zero", 0), const("minus2b", -2)], "batch_dims")],
                   "batch", keepdims=1)
        row_elems = op("Mul", [batch, n_k], "row_elems")
        fit = op("Div", [const("budget", AUTO_SLICE_BYTES // 4), row_elems], "fit")
        step = op("Max", [step, fit, const("one", 1)], "step")
    first, *rest = chain.nodes
    outs = []
    for i in range(count):
        start = op("Mul", [step, const(f"i{i}", i)], f"start{i}")
        end = op("Mul", [step, const(f"i{i + 1}", i + 1)], f"end{i}") if i + 1 < count else const("all", 2**62)
        q = op("Slice", [chain.queries, start, end, const("axis", -2)], f"q{i}")
        renamed = {chain.queries: q}
        for node in (first, *rest):
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.name = f"{base}/{node.op_type}{i}_{len(nodes)}"
            for j, name in enumerate(new.input):
                new.input[j] = renamed.get(name, name)
            for j, name in enumerate(new.output):
                renamed[name] = new.output[j] = f"{base}/{i}/{name}"
            nodes.append(new)
        outs.append(renamed[chain.nodes[-1].output[0]])
    nodes.append(helper.make_node("Concat", outs, [chain.nodes[-1].output[0]], name=f"{base}/concat", axis=-2))
    return nodes, _dedup(inits)


def _dedup(inits: list[onnx.TensorProto]) -> list[onnx.TensorProto]:
    seen: dict[str, onnx.TensorProto] = {}
    for i in inits:
        seen.setdefault(i.name, i)
    return list(seen.values())
