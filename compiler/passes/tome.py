"""Token merging (ToMe for SD) in the UNet's highest-resolution self-attention, traceable to ONNX.

Same semantics as tomesd's `bipartite_soft_matching_random2d(..., no_rand=True)` with its defaults
(merge_attn only, mean merge): the top-left token of every full sy×sx cell is a destination, every other
token a source; the r = int(N * ratio) sources most similar (cosine, on the block's input) to some
destination are averaged into it before self-attention and copied back from it after.

Unlike tomesd, merge and unmerge are one index map per block (`slot`: token -> merged position), so
merging is one row ScatterND(add) plus a count division and unmerging one row Gather, and every size is
computed from the traced input shape: the exported graph serves every height and width. ONNX Runtime's
UNet fusion cannot see the merged self-attention; `fuse_attention` fuses it after `fusions.apply`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler.passes.graph import producers_and_consumers

if TYPE_CHECKING:  # torch is imported where it is used: CompileConfig checks its arguments without it
    import torch

MAX_DOWNSAMPLES = (1, 2, 4, 8)


def check_args(ratio: float, max_downsample: int = 1, sx: int = 2, sy: int = 2) -> None:
    """Raise ValueError naming the first argument outside its range."""
    if not 0 <= ratio < 1:
        raise ValueError(f"tome ratio={ratio!r} must be at least 0 and less than 1 (0 turns token merging off)")
    if max_downsample not in MAX_DOWNSAMPLES:
        raise ValueError(f"tome max_downsample={max_downsample!r} must be one of {MAX_DOWNSAMPLES}")
    for name, stride in (("sx", sx), ("sy", sy)):
        if not isinstance(stride, int) or not 1 <= stride <= 8:
            raise ValueError(f"tome {name}={stride!r} must be an integer between 1 and 8")


def merge_plan(metric: torch.Tensor, h: Any, w: Any, ratio: float, sx: int = 2, sy: int = 2
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token goes: `slot` [B, N] (int64, its position in the merged sequence) and `counts`
    [B, M, 1] (tokens per merged position). `metric` is [B, N, C] with N = h * w tokens in raster order;
    `h` and `w` are ints, or 0-d tensors while tracing.

    The merged sequence is tomesd's `cat([unmerged sources, destinations])`, sources in descending
    order of similarity, destinations in raster order.
    """
    import torch

    batch, n = metric.shape[0], metric.shape[1]
    device = metric.device
    n_t = n if isinstance(n, torch.Tensor) else torch.tensor(n, device=device)
    # destinations: the top-left token of each full sy×sx cell (tomesd's leftover rows/columns are sources)
    hsy, wsx = h // sy, w // sx
    rows = torch.arange(h, device=device).unsqueeze(1)
    cols = torch.arange(w, device=device).unsqueeze(0)
    is_dst = (rows % sy == 0) & (rows < hsy * sy) & (cols % sx == 0) & (cols < wsx * sx)
    # raster order within each group, as tomesd's stable argsort of its -1/0 buffer gives
    is_dst = is_dst.reshape(-1)
    dst_idx, src_idx = is_dst.nonzero()[:, 0], (~is_dst).nonzero()[:, 0]
    # sizes taken from the index tensors themselves, so the graph's shape inference sees equal dims
    num_dst, n_src = dst_idx.shape[0], src_idx.shape[0]

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric.index_select(1, src_idx) @ metric.index_select(1, dst_idx).transpose(-1, -2)
        # best destination of each source; TopK(1) is one pass where max() exports as ReduceMax + ArgMax
        node_max, node_idx = (t[..., 0] for t in scores.topk(1, dim=-1))
    # int(N * ratio) as Python computes it, in float64, capped at the number of sources
    n_src_t = n_src if isinstance(n_src, torch.Tensor) else torch.tensor(n_src, device=device)
    r = torch.minimum((n_t.to(torch.float64) * ratio).floor().to(torch.int64), n_src_t)
    order = node_max.argsort(dim=-1, descending=True)
    rank = torch.zeros_like(order).scatter(1, order, torch.arange(n_src, device=device).expand(batch, -1))
    n_unm = n_src_t - r
    src_slot = torch.where(rank < r, node_idx + n_unm, rank - r)
    dst_slot = (torch.arange(num_dst, device=device) + n_unm).expand(batch, -1)
    slot = torch.zeros_like(metric[..., 0], dtype=torch.int64)
    slot = slot.scatter(1, dst_idx.expand(batch, -1), dst_slot).scatter(1, src_idx.expand(batch, -1), src_slot)
    counts = _scatter_add_rows(metric.new_zeros((batch, n_unm + num_dst, 1)), _rows(slot),
                               torch.ones_like(metric[..., :1]))
    return slot, counts


def merge(x: torch.Tensor, slot: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[B, N, C] -> [B, M, C]: each merged position is the mean of the tokens mapped to it."""
    batch, _, channels = x.shape
    return _scatter_add_rows(x.new_zeros((batch, counts.shape[1], channels)), _rows(slot), x) / counts


def unmerge(y: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """[B, M, C] -> [B, N, C]: every token takes the value of its merged position (one row Gather)."""
    import torch

    batch, merged, channels = y.shape
    flat = (slot + torch.arange(batch, device=slot.device).unsqueeze(1) * merged).reshape(-1)
    return y.reshape(-1, channels).index_select(0, flat).reshape(batch, -1, channels)


def _rows(slot: torch.Tensor) -> torch.Tensor:
    """[B, N] slots -> [B, N, 2] (batch, slot) row indices."""
    import torch

    batch_ids = torch.arange(slot.shape[0], device=slot.device).unsqueeze(1).expand_as(slot)
    return torch.stack([batch_ids, slot], dim=-1)


def _scatter_add_rows(data: torch.Tensor, rows: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    """data[rows[b, n]] += updates[b, n] for every (b, n), duplicates summed: ONNX ScatterND(reduction=add).

    torch exports scatter_add as ScatterElements over every element (about 50x slower in ONNX Runtime
    for SD's [2, 9216, 320]) and index_put(accumulate) as a ScatterND that drops duplicates, hence the
    explicit symbolic.
    """
    return _scatter_add_rows_function().apply(data, rows, updates)


@functools.cache
def _scatter_add_rows_function() -> Any:
    import torch

    class ScatterAddRows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, data, rows, updates):  # type: ignore[no-untyped-def]
            return data.index_put((rows[..., 0], rows[..., 1]), updates, accumulate=True)

        @staticmethod
        def symbolic(g, data, rows, updates):  # type: ignore[no-untyped-def]
            return g.op("ScatterND", data, rows, updates, reduction_s="add")

    return ScatterAddRows


def _transformers_by_downsample(unet: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """Every Transformer2DModel of a UNet2DConditionModel with its downsampling factor (1 = latent size)."""
    import torch

    for part in ("down_blocks", "up_blocks"):
        if not isinstance(getattr(unet, part, None), torch.nn.ModuleList):
            raise TypeError(f"token merging patches a diffusers UNet2DConditionModel; {type(unet).__name__} "
                            f"has no {part}")
    found: list[tuple[int, torch.nn.Module]] = []
    factor = 1
    for block in unet.down_blocks:
        found += [(factor, t) for t in getattr(block, "attentions", None) or []]
        if getattr(block, "downsamplers", None):
            factor *= 2
    mid = getattr(unet, "mid_block", None)
    found += [(factor, t) for t in getattr(mid, "attentions", None) or []]
    for block in unet.up_blocks:
        found += [(factor, t) for t in getattr(block, "attentions", None) or []]
        if getattr(block, "upsamplers", None):
            factor //= 2
    return found


def first_attention_downsample(unet: torch.nn.Module) -> int:
    """The downsampling factor of the UNet's highest-resolution level that has attention: 1 for SD 1.x/2.x,
    2 for SDXL (its first level has none), where ToMe for SD merges (`patched`'s `max_downsample`)."""
    factors = [factor for factor, _ in _transformers_by_downsample(unet)]
    if not factors:
        raise ValueError("token merging needs self-attention; this UNet has no transformer blocks")
    return min(factors)


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_first_arg(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


@contextmanager
def patched(unet: torch.nn.Module, ratio: float, max_downsample: int = 1, sx: int = 2, sy: int = 2
            ) -> Iterator[int]:
    """Merge tokens in the self-attention of every BasicTransformerBlock at most `max_downsample` times
    below the latent resolution (tomesd's `max_downsample`), in place, until the block exits; yields the
    number of blocks patched (0 when `ratio` is 0: the UNet is left untouched).

    Forward hooks, not class swaps: the blocks' own forward (and whatever attention processor is set)
    still runs, so other patches to the attention compose with this one.
    """
    check_args(ratio, max_downsample, sx, sy)
    if getattr(unet, "_kiln_tome", False):
        raise RuntimeError("token merging is already applied to this UNet; leave the outer `patched` first")
    handles: list[Any] = []
    blocks = 0
    try:
        if ratio > 0:
            unet._kiln_tome = True
            for factor, transformer in _transformers_by_downsample(unet):
                if factor > max_downsample:
                    continue
                handles += _patch_transformer(transformer, ratio, sx, sy)
                blocks += sum(1 for b in transformer.transformer_blocks if not b.only_cross_attention)
        yield blocks
    finally:
        for handle in handles:
            handle.remove()
        if getattr(unet, "_kiln_tome", False):
            del unet._kiln_tome


def _patch_transformer(transformer: torch.nn.Module, ratio: float, sx: int, sy: int) -> list[Any]:
    size: dict[str, Any] = {}

    def remember_size(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = _first_arg(args, kwargs)  # [B, C, H, W]: the token grid this transformer's blocks see
        size["h"], size["w"] = x.shape[2], x.shape[3]

    handles = [transformer.register_forward_pre_hook(remember_size, with_kwargs=True)]
    for block in transformer.transformer_blocks:
        if block.only_cross_attention:
            continue
        plan: dict[str, torch.Tensor] = {}

        def make_plan(module: torch.nn.Module, args: tuple, kwargs: dict, plan: dict = plan) -> None:
            # tomesd measures similarity on the block's input, before norm1
            plan["slot"], plan["counts"] = merge_plan(_first_arg(args, kwargs), size["h"], size["w"], ratio,
                                                      sx, sy)

        def merge_input(module: torch.nn.Module, args: tuple, kwargs: dict, plan: dict = plan
                        ) -> tuple[tuple, dict]:
            return _with_first_arg(args, kwargs, merge(_first_arg(args, kwargs), plan["slot"], plan["counts"]))

        def unmerge_output(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor,
                           plan: dict = plan) -> torch.Tensor:
            out = unmerge(output, plan["slot"])
            plan.clear()
            return out

        handles += [
            block.register_forward_pre_hook(make_plan, with_kwargs=True),
            block.attn1.register_forward_pre_hook(merge_input, with_kwargs=True),
            block.attn1.register_forward_hook(unmerge_output, with_kwargs=True),
        ]
    return handles


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fuse the merged self-attention into `Attention` nodes, as ONNX Runtime's UNet fusion does for the rest.

    That fusion (compiler/passes/fusions.py) anchors on LayerNorm -> Q/K/V MatMuls and on the residual Add
    after the output projection; token merging sits between both, so those blocks keep their unfused
    MatMul/Softmax attention. This matches the PyTorch 2 scaled-dot-product pattern from any input: three
    MatMuls sharing their input with initializer weights, Reshape/Transpose into heads, Q and K each scaled
    by the default sqrt(1/sqrt(head_size)), Softmax, MatMul with V, Transpose/Reshape back. Each becomes
    `Attention(x, [Wq|Wk|Wv], 0)` (unpack_attention can split it again for quantized bundles); run it after
    `fusions.apply`. Returns the model, rewritten in place, and the number of attentions fused.
    """
    graph = model.graph
    producer, consumers = producers_and_consumers(graph.node)
    inits = {i.name: i for i in graph.initializer}
    replace: dict[int, onnx.NodeProto] = {}  # id(Reshape that ends an attention) -> its Attention node
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        found = _match_attention(softmax, producer, consumers, inits)
        if found is None:
            continue
        x, (wq, wk, wv), heads, end = found
        name = f"{end.name or end.output[0]}_tome_attention"
        weight = np.concatenate([wq, wk, wv], axis=1)
        graph.initializer.extend([numpy_helper.from_array(weight, f"{name}_qkv_weight"),
                                  numpy_helper.from_array(np.zeros(weight.shape[1], weight.dtype), f"{name}_qkv_bias")])
        replace[id(end)] = helper.make_node("Attention", [x, f"{name}_qkv_weight", f"{name}_qkv_bias"],
                                            list(end.output), name=name, domain="com.microsoft", num_heads=heads)
    if replace:
        nodes = [replace.get(id(n), n) for n in graph.node]
        del graph.node[:]
        graph.node.extend(_live(nodes, {o.name for o in graph.output}))
        used = {i for n in graph.node for i in n.input}
        # delete in place: rebuilding the list would copy every weight (GBs for SD v1)
        for index in reversed([k for k, i in enumerate(graph.initializer) if i.name not in used]):
            del graph.initializer[index]
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, len(replace)


def _match_attention(softmax: onnx.NodeProto, producer: dict, consumers: dict, inits: dict
                     ) -> tuple[str, tuple[np.ndarray, ...], int, onnx.NodeProto] | None:
    """(shared input, (Wq, Wk, Wv), heads, final Reshape) of the SDPA pattern around `softmax`, or None."""
    def parent(node: onnx.NodeProto | None, i: int, op: str) -> onnx.NodeProto | None:
        if node is None or len(node.input) <= i:
            return None
        p = producer.get(node.input[i])
        return p if p is not None and p.op_type == op else None

    def only_child(node: onnx.NodeProto, op: str) -> onnx.NodeProto | None:
        kids = consumers.get(node.output[0], [])
        return kids[0] if len(kids) == 1 and kids[0].op_type == op else None

    def perm(node: onnx.NodeProto | None) -> list[int]:
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), []) if node else []

    if next((a.i for a in softmax.attribute if a.name == "axis"), -1) not in (-1, 3):
        return None
    pv = only_child(softmax, "MatMul")
    out_t = only_child(pv, "Transpose") if pv is not None and pv.input[0] == softmax.output[0] else None
    end = only_child(out_t, "Reshape") if perm(out_t) == [0, 2, 1, 3] else None
    qk = parent(softmax, 0, "MatMul")
    if end is None or qk is None:
        return None
    mul_q, mul_k = parent(qk, 0, "Mul"), parent(qk, 1, "Mul")
    if mul_q is None or mul_k is None:
        return None
    t_q = next((p for p in (parent(mul_q, i, "Transpose") for i in range(2)) if p is not None), None)
    t_k = next((p for p in (parent(mul_k, i, "Transpose") for i in range(2)) if p is not None), None)
    t_v = parent(pv, 1, "Transpose")
    if perm(t_q) != [0, 2, 1, 3] or perm(t_k) != [0, 2, 3, 1] or perm(t_v) != [0, 2, 1, 3]:
        return None
    # SDPA's default scale, split as sqrt(1 / sqrt(head_size)) on Q and on K, head_size read from Q's shape:
    # the same product as Attention's default 1/sqrt(head_size)
    sqrt_q = next((p for p in (parent(mul_q, i, "Sqrt") for i in range(2)) if p is not None), None)
    sqrt_k = next((p for p in (parent(mul_k, i, "Sqrt") for i in range(2)) if p is not None), None)
    div = parent(sqrt_q, 0, "Div")
    if div is None or sqrt_k is None or sqrt_k.input[0] != div.output[0] or _value(div.input[0], producer, inits) != 1:
        return None
    head_size = parent(parent(parent(parent(div, 1, "Sqrt"), 0, "Cast"), 0, "Slice"), 0, "Shape")
    if head_size is None or head_size.input[0] != t_q.output[0]:
        return None
    reshapes = [parent(t, 0, "Reshape") for t in (t_q, t_k, t_v)]
    matmuls = [parent(r, 0, "MatMul") for r in reshapes]
    if any(m is None for m in matmuls):
        return None
    x = matmuls[0].input[0]
    if any(m.input[0] != x or m.input[1] not in inits for m in matmuls):
        return None
    weights = tuple(numpy_helper.to_array(inits[m.input[1]]) for m in matmuls)
    if any(w.ndim != 2 or w.shape != weights[0].shape for w in weights):
        return None
    # diffusers views Q as [batch, -1, heads, head_dim]: heads is the third entry of the Reshape's shape
    shape = parent(reshapes[0], 1, "Concat")
    heads = _value(shape.input[2], producer, inits) if shape is not None and len(shape.input) == 4 else None
    if heads is None or heads <= 0 or heads != int(heads) or weights[0].shape[1] % int(heads):
        return None
    return x, weights, int(heads), end


def _value(name: str, producer: dict, inits: dict) -> float | None:
    """The value of a one-element constant (initializer or Constant node), else None."""
    node = producer.get(name)
    if name in inits:
        value = numpy_helper.to_array(inits[name])
    elif node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
        value = numpy_helper.to_array(node.attribute[0].t)
    else:
        return None
    return value.reshape(-1)[0].item() if value.size == 1 else None


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` (in order) that some graph output depends on, reading through If/Loop bodies."""
    producer = {o: n for n in nodes for o in n.output}
    needed, stack, live = set(), list(outputs), set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        for name in [*node.input, *_subgraph_inputs(node)]:
            if name and name not in needed:
                needed.add(name)
                stack.append(name)
    return [n for n in nodes if id(n) in live]


def _subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    """Every name read inside `node`'s subgraphs (outer-scope values among them)."""
    names: list[str] = []
    for attr in node.attribute:
        for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in graph.node:
                names += [*inner.input, *_subgraph_inputs(inner)]
    return names
