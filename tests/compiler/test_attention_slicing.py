"""Attention slicing: plain self-attention cut along its queries, fused self-attention moved onto the tiled
MultiHeadAttention kernel; same outputs on real ONNX Runtime sessions, at every image size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.export import COMPONENTS, export_component
from compiler.passes import attention_slicing, fusions, unpack_attention
from compiler.source import load_source

# tiny UNet: 4 transformer blocks, each one self-attention and one cross-attention
SELF_ATTENTIONS, CROSS_ATTENTIONS = 4, 4
SIZES = [(16, 24), (12, 12)]  # latent height x width: non-square, and square


@pytest.fixture(scope="module")
def plain_unet(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny UNet exported without fusions (what `--no-fusions` bundles)."""
    out = tmp_path_factory.mktemp("plain") / "unet.onnx"
    return export_component(COMPONENTS["unet"], load_source(tiny_source), out, 17)


def feed(h: int, w: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(h * 100 + w)
    return {"sample": rng.standard_normal((2, 4, h, w), dtype=np.float32),
            "timestep": np.array([10.0, 700.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}


_sessions: dict[tuple[int, int], tuple[onnx.ModelProto, ort.InferenceSession]] = {}


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    key = (id(model), len(model.graph.output))  # the model is kept in the entry, so its id stays its own
    if key not in _sessions:
        _sessions[key] = model, ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return _sessions[key][1].run(outputs, inputs)


@pytest.mark.parametrize("slices", [3, "auto"])
def test_plain_self_attention_is_sliced_and_keeps_outputs(plain_unet: Path, slices: int | str) -> None:
    before = onnx.load(str(plain_unet))
    sliced, n = attention_slicing.apply(onnx.load(str(plain_unet)), slices)
    count = attention_slicing.AUTO_MAX_SLICES if slices == "auto" else slices
    a, b = fusions.op_counts(before), fusions.op_counts(sliced)
    assert n == SELF_ATTENTIONS and a["Softmax"] == SELF_ATTENTIONS + CROSS_ATTENTIONS
    assert b["Softmax"] == SELF_ATTENTIONS * count + CROSS_ATTENTIONS  # cross-attention stays whole
    assert b["MatMul"] == a["MatMul"] + SELF_ATTENTIONS * 2 * (count - 1)
    assert b["Concat"] == a["Concat"] + SELF_ATTENTIONS
    for h, w in SIZES:
        want, got = run(before, feed(h, w))[0], run(sliced, feed(h, w))[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    again = sliced.SerializeToString()
    assert attention_slicing.apply(sliced, slices)[1] == 0 and sliced.SerializeToString() == again


def _first_slices(model: onnx.ModelProto, count: int) -> list[str]:
    """Expose the query slices of the first sliced attention as graph outputs; returns their names."""
    names = [n.output[0] for n in model.graph.node if n.op_type == "Slice" and attention_slicing.SLICE_TAG in n.name
             and n.name.rsplit("/", 1)[1].startswith("q")][:count]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    return names


def test_explicit_count_cuts_the_queries_evenly_at_every_size(plain_unet: Path) -> None:
    sliced, _ = attention_slicing.apply(onnx.load(str(plain_unet)), 3)
    names = _first_slices(sliced, 3)
    for h, w in SIZES:  # the first block attends over h*w tokens
        outs = run(sliced, feed(h, w), names)
        step = -(-h * w // 3)
        assert [o.shape[-2] for o in outs] == [step, step, h * w - 2 * step]


def test_auto_sizes_slices_from_the_score_budget(plain_unet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # budget: 64 query rows of the tiny model's first block at 16x24 latents (2 images x 2 heads x 384 keys)
    monkeypatch.setattr(attention_slicing, "AUTO_SLICE_BYTES", 64 * 2 * 2 * 384 * 4)
    sliced, _ = attention_slicing.apply(onnx.load(str(plain_unet)), "auto")
    names = _first_slices(sliced, attention_slicing.AUTO_MAX_SLICES)
    outs = run(sliced, feed(16, 24), names)
    assert [o.shape[-2] for o in outs] == [64] * 6 + [0] * (attention_slicing.AUTO_MAX_SLICES - 6)
    outs = run(sliced, feed(4, 4), names)  # 16 tokens: within the budget, one slice
    assert [o.shape[-2] for o in outs] == [16] + [0] * (attention_slicing.AUTO_MAX_SLICES - 1)
    plain = onnx.load(str(plain_unet))
    for h, w in [*SIZES, (4, 4)]:
        np.testing.assert_allclose(run(sliced, feed(h, w))[0], run(plain, feed(h, w))[0], atol=1e-4, rtol=0)


def test_fused_self_attention_moves_to_the_tiled_kernel(tiny_bundle: Path) -> None:
    fused = onnx.load(str(tiny_bundle / "unet.onnx"))
    a = fusions.op_counts(fused)
    assert a["Attention"] == SELF_ATTENTIONS and a["MultiHeadAttention"] == CROSS_ATTENTIONS
    sliced, n = attention_slicing.apply(onnx.load(str(tiny_bundle / "unet.onnx")), 4)
    b = fusions.op_counts(sliced)
    assert n == SELF_ATTENTIONS and "Attention" not in b and "Softmax" not in b
    assert b["MultiHeadAttention"] == SELF_ATTENTIONS + CROSS_ATTENTIONS
    # the slice count plays no part for the tiled kernel
    same, _ = attention_slicing.apply(onnx.load(str(tiny_bundle / "unet.onnx")), "auto")
    assert same.SerializeToString() == sliced.SerializeToString()
    for h, w in SIZES:
        np.testing.assert_allclose(run(sliced, feed(h, w))[0], run(fused, feed(h, w))[0], atol=1e-4, rtol=0)


def test_composes_with_the_int8_quantizer(plain_unet: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    from quantize import int8

    feeds = [feed(16, 24), feed(12, 12)]
    for name, path in (("plain", plain_unet), ("fused", tiny_bundle / "unet.onnx")):
        sliced, _ = attention_slicing.apply(onnx.load(str(path)), 2)
        assert unpack_attention.apply(sliced)[1] == 0  # nothing left for the quantize stage's unpacking
        src, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}-int8.onnx"
        onnx.save_model(sliced, str(src))
        int8.quantize_static(src, out, feeds)
        quantized = onnx.load(str(out))
        counts = fusions.op_counts(quantized)
        assert counts.get("QuantizeLinear", 0) > 0
        assert counts.get("Softmax", 0) == fusions.op_counts(sliced).get("Softmax", 0)  # the slices survive
        want = run(sliced, feeds[0])[0]
        got = run(quantized, feeds[0])[0]
        assert np.abs(got - want).mean() < 0.1 * np.abs(want).mean()


def test_composes_with_token_merging(tiny_source: Path, tmp_path: Path) -> None:
    from compiler.passes import tome

    source = load_source(tiny_source)
    path = tmp_path / "unet.onnx"
    with tome.patched(source.module("unet"), 0.5) as blocks:
        export_component(COMPONENTS["unet"], source, path, 17)
    assert blocks == 3  # the highest-resolution blocks; the mid block's self-attention stays unmerged
    plain = onnx.load(str(path))
    sliced, n = attention_slicing.apply(onnx.load(str(path)), 3)  # merged self-attention is sliced too
    assert n == SELF_ATTENTIONS
    # as a compile ships it: ORT's fusions, ToMe's own fusion of the merged attention, then slicing
    fused, merged = tome.fuse_attention(fusions.apply(onnx.load(str(path)), "unet"))
    assert merged == blocks and fusions.op_counts(fused)["Attention"] == SELF_ATTENTIONS
    tiled, n = attention_slicing.apply(fused, 3)
    assert n == SELF_ATTENTIONS and "Attention" not in fusions.op_counts(tiled)
    for h, w in SIZES:
        want = run(plain, feed(h, w))[0]
        np.testing.assert_allclose(run(sliced, feed(h, w))[0], want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(run(tiled, feed(h, w))[0], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("value", ["0", 1, 65, "-2", "many", "", 2.5, True, None])
def test_rejects_bad_slice_counts(value: object) -> None:
    with pytest.raises(ValueError, match=r"attention_slicing=.* must be 'auto' or an integer from 2 to 64"):
        attention_slicing.parse(value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"from 2 to 64"):
        attention_slicing.apply(onnx.ModelProto(), value)  # type: ignore[arg-type]


def test_accepts_auto_and_counts() -> None:
    assert attention_slicing.parse(" Auto ") == "auto"
    assert attention_slicing.parse("8") == 8
    assert attention_slicing.parse(64) == 64


def test_models_without_attention_are_unchanged() -> None:
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(g)
    before = model.SerializeToString()
    assert attention_slicing.apply(model, 4)[1] == 0 and model.SerializeToString() == before
