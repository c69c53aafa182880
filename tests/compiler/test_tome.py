"""Token merging: the patched UNet against tomesd, the exported graph against PyTorch, and its fused attention."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compiler.export import COMPONENTS, export_component, wrap
from compiler.passes import fusions, tome
from compiler.source import load_source

# latent sizes: a square one, one whose height and width are odd (leftover rows and columns of the 2x2 grid),
# and the 5x7 the compile's parity check uses
SIZES = [(16, 16), (17, 23), (5, 7)]


def inputs(h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, h, w, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 32, generator=g))


@pytest.fixture(scope="module")
def source(tiny_source: Path):  # type: ignore[no-untyped-def]
    return load_source(tiny_source)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory: pytest.TempPathFactory) -> dict[float, onnx.ModelProto]:  # type: ignore[no-untyped-def]
    """The tiny UNet exported without and with ToMe 0.5, before any fusion."""
    out = {}
    for ratio in (0.0, 0.5):
        path = tmp_path_factory.mktemp("tome") / "unet.onnx"
        with tome.patched(source.module("unet"), ratio):
            export_component(COMPONENTS["unet"], source, path, opset=17)
        out[ratio] = onnx.load(str(path))
    return out


@pytest.fixture(scope="module")
def optimized(exported) -> dict[float, onnx.ModelProto]:  # type: ignore[no-untyped-def]
    """`exported` after ONNX Runtime's fusions (compiler/passes/fusions.py) only."""
    return {ratio: fusions.apply(copy.deepcopy(model), "unet") for ratio, model in exported.items()}


@pytest.fixture(scope="module")
def fused(optimized) -> tuple[onnx.ModelProto, int]:  # type: ignore[no-untyped-def]
    """The ToMe graph as a compile would ship it: ORT's fusions, then tome.fuse_attention."""
    return tome.fuse_attention(copy.deepcopy(optimized[0.5]))


def run_onnx(model: onnx.ModelProto, args: tuple[torch.Tensor, ...]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = COMPONENTS["unet"].inputs
    return session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})[0]


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("size", SIZES[:2])
def test_matches_tomesd(source, ratio: float, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    import tomesd  # a dev dependency: this test is the proof of same semantics, so never skipped
    unet = source.module("unet")
    theirs_unet = copy.deepcopy(unet)
    args = inputs(*size)
    seen: list[int] = []
    probe = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].shape[1]))
    try:
        with torch.no_grad():
            plain = unet(*args).sample
            with tome.patched(unet, ratio) as blocks:
                ours = unet(*args).sample
            restored = unet(*args).sample
            tomesd.apply_patch(theirs_unet, ratio=ratio, use_rand=False)
            theirs = theirs_unet(*args).sample
    finally:
        probe.remove()
    n = size[0] * size[1]
    assert blocks == 3  # down_blocks[0] and up_blocks[-1] (2 blocks): the latent-resolution ones
    assert seen == [n, n - int(n * ratio), n]  # tokens the self-attention saw: plain, merged, restored
    # same algorithm; only the order of float sums differs (scatter-add then divide vs scatter_reduce mean)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5, rtol=0)
    assert (ours - plain).abs().max() > 1e-3  # merging changed something
    assert torch.equal(restored, plain)  # and leaving the context undid it


@pytest.mark.parametrize("size", SIZES)
def test_onnx_matches_patched_pytorch(source, exported, fused, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    args = inputs(*size, seed=1)
    with torch.no_grad(), tome.patched(source.module("unet"), 0.5):
        want = wrap(COMPONENTS["unet"], source.module("unet"))(*args).numpy()
    for model in (exported[0.5], fused[0]):
        np.testing.assert_allclose(run_onnx(model, args), want, atol=1e-4, rtol=0)


def test_adds_merge_ops_and_attention_stays_fused(exported, optimized, fused) -> None:  # type: ignore[no-untyped-def]
    plain, merged = fusions.op_counts(exported[0.0]), fusions.op_counts(exported[0.5])
    # per patched block: two NonZero split destinations from sources; TopK(1) finds each source's best
    # destination and a full TopK orders them; three index scatters build the token -> slot map; row
    # ScatterND(add) sums counts and tokens (the merge); the unmerge is a row Gather
    for op, per_block in {"NonZero": 2, "TopK": 2, "ScatterElements": 3, "ScatterND": 2}.items():
        assert merged.get(op, 0) - plain.get(op, 0) == 3 * per_block, op
    assert "GatherElements" not in merged and "ArgMax" not in merged  # the slower per-element forms
    assert "If" not in merged  # every size computed in the graph, no shape-dependent branches
    assert [a.s for n in exported[0.5].graph.node if n.op_type == "ScatterND" for a in n.attribute] == [b"add"] * 6
    assert merged["Softmax"] == plain["Softmax"] == 8

    # ORT's UNet fusion misses the three merged self-attentions (merge and unmerge sit between its LayerNorm
    # and residual-Add anchors); fuse_attention completes it: the same attention ops as without ToMe
    ort_only, reference = fusions.op_counts(optimized[0.5]), fusions.op_counts(optimized[0.0])
    model, n = fused
    after = fusions.op_counts(model)
    assert n == 3 and ort_only["Attention"] + n == reference["Attention"] == 4
    assert after["Attention"] == 4 and after["MultiHeadAttention"] == reference["MultiHeadAttention"] == 4
    assert "Softmax" not in after and "Softmax" not in reference
    assert after["ScatterND"] == merged["ScatterND"]  # the merge itself is left as it was
    onnx.checker.check_model(model)


def test_fuse_attention_leaves_fused_graphs_alone(optimized) -> None:  # type: ignore[no-untyped-def]
    model = copy.deepcopy(optimized[0.0])
    before = model.SerializeToString()
    _, n = tome.fuse_attention(model)
    assert n == 0 and model.SerializeToString() == before


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ratio": 1.0}, "ratio=1.0 must be at least 0 and less than 1"),
    ({"ratio": -0.1}, "ratio=-0.1 must be at least 0"),
    ({"ratio": 0.5, "max_downsample": 3}, "max_downsample=3 must be one of (1, 2, 4, 8)"),
    ({"ratio": 0.5, "sx": 0}, "sx=0 must be an integer between 1 and 8"),
])
def test_rejects_out_of_range_arguments(source, kwargs: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=re.escape(message)), tome.patched(source.module("unet"), **kwargs):
        pass


def test_ratio_zero_patches_nothing_and_nesting_is_refused(source) -> None:  # type: ignore[no-untyped-def]
    unet = source.module("unet")
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())  # noqa: E731
    with tome.patched(unet, 0.0) as blocks:
        assert blocks == 0 and hooks() == 0
    with tome.patched(unet, 0.5) as blocks:
        assert blocks == 3 and hooks() == 3 + 3 * 3  # a size hook per transformer, three per block
        with pytest.raises(RuntimeError, match="already applied"), tome.patched(unet, 0.3):
            pass
    assert hooks() == 0
