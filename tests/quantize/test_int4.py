"""int4: bytes equal to ONNX Runtime's own 4-bit packer, and MatMulNBits runs them as expected."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quantize import int4
from quantize.int4 import dequantize_int4, quantize_int4
from tests.quantize import graphs

FMAX = np.finfo(np.float32).max


def _ort_pack(weight_nk: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """ORT's C++ packer, as its MatMulNBitsQuantizer calls it (symmetric: no zero points)."""
    try:
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits
    except ImportError:  # a private binding; the ORT-run tests below still hold the format
        pytest.skip("onnxruntime no longer exposes quantize_matmul_4bits")
    w = np.ascontiguousarray(weight_nk.T.astype(np.float32))  # it takes ONNX's [K, N]
    k, n = w.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((k_blocks * block_size, n), np.float32)
    padded[:k] = w
    packed = np.zeros((n, k_blocks, block_size // 2), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    zero_points = np.zeros((n, (k_blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, padded, scales, zero_points, block_size, n, k, True)
    return packed, scales


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ties = np.zeros((4, 32), np.float32)
    ties[:, 0] = -8  # scale 1: every value below is its own code
    ties[:, 1:] = rng.integers(-8, 8, (4, 31)) + 0.5
    ties[1] *= -1     # scale -1
    ties[2, 1:] = np.nextafter(ties[2, 1:], np.float32(0))
    extremes = rng.standard_normal((5, 64)).astype(np.float32)
    extremes[0] *= np.float32(1e-40)
    extremes[1] = np.where(extremes[1] > 0, FMAX, -FMAX)
    extremes[2] *= np.float32(1e30)
    extremes[3, :32] = 0
    extremes[4] = np.abs(extremes[4])  # one sign only: the largest still maps to -8
    extremes[0, 5:9] = 0               # 0 * the infinite reciprocal of a subnormal block
    return {
        "normal": rng.standard_normal((48, 128)).astype(np.float32),
        "k_not_multiple": rng.standard_normal((5, 70)).astype(np.float32),
        "zeros": np.zeros((3, 64), np.float32),
        "ties": ties,
        "extremes": extremes,
    }


WEIGHTS = _weights()


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_packing_equals_onnxruntime(name: str, block_size: int) -> None:
    w = WEIGHTS[name]
    packed, scales = quantize_int4(w, block_size)
    want_packed, want_scales = _ort_pack(w, block_size)
    np.testing.assert_array_equal(scales, want_scales)
    np.testing.assert_array_equal(packed, want_packed)


def test_packing_in_many_steps_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    w = WEIGHTS["k_not_multiple"]
    monkeypatch.setattr(int4, "_CHUNK", 100)  # one row per step
    packed, scales = quantize_int4(w, 32)
    want_packed, want_scales = _ort_pack(w, 32)
    np.testing.assert_array_equal(packed, want_packed)
    np.testing.assert_array_equal(scales, want_scales)


def test_dequantize_round_trip() -> None:
    w = WEIGHTS["k_not_multiple"]
    packed, scales = quantize_int4(w, 32)
    back = dequantize_int4(packed, scales, w.shape, 32)
    assert back.shape == w.shape
    step = np.repeat(np.abs(scales), 32, axis=1)[:, :70]
    # within half a step, except the opposite-sign extreme, which clips at +7 steps (a full step short)
    assert (np.abs(back - w) <= step + 1e-6).all()
    assert (np.abs(back - w) <= step / 2 + 1e-6).mean() > 0.95
    # scale 1: x.5 ties round up, since ORT rounds x + 8 half away from zero
    ties = WEIGHTS["ties"][:1]
    np.testing.assert_array_equal(dequantize_int4(*quantize_int4(ties, 32), ties.shape, 32),
                                  np.minimum(np.floor(ties + 0.5), 7))


def test_bad_input_names_value_and_range() -> None:
    with pytest.raises(ValueError, match="block_size=24 must be one of 16, 32, 64, 128, 256"):
        quantize_int4(WEIGHTS["normal"], 24)
    with pytest.raises(ValueError, match="accuracy_level=5 must be one of 0, 1, 2, 3, 4"):
        int4.apply(graphs.build(graphs.weights()), accuracy_level=5)
    with pytest.raises(ValueError, match="shape \\(2,\\); expected a non-empty 2-D"):
        quantize_int4(np.ones(2, np.float32))


@pytest.mark.parametrize("accuracy_level", [1, 4])
def test_pass_on_small_graph(accuracy_level: int) -> None:
    w = graphs.weights()
    feed = graphs.inputs()
    want = graphs.run(graphs.build(w), feed)
    model, report = int4.apply(graphs.build(w), accuracy_level=accuracy_level, min_elements=graphs.MIN_ELEMENTS)

    assert set(report["converted"]) == graphs.CONVERTED_NODES
    assert report["skipped"].keys() == graphs.SKIPPED_NODES.keys()
    counts = graphs.op_counts(model)
    assert counts["MatMulNBits"] == 6 and counts["Gemm"] == 0
    assert graphs.constant_matmuls(model) == ["mm_small"]
    names = {t.name for t in model.graph.initializer}
    assert not names & graphs.CONVERTED_WEIGHTS
    assert {"w1_int4", "w1_int4_scales", "w2_int4", "w2_int4_scales"} <= names
    assert report["weight_bytes_before"] / report["weight_bytes_after"] > 5.5  # 32 bits -> 5 (4 + scale/32)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "accuracy_level")) \
        == accuracy_level

    got = graphs.run(model, feed)
    for g, r in zip(got, want, strict=True):
        assert 0 < graphs.relative_error(g, r) < 0.15

    # fp32 graph with our dequantized weights: at accuracy_level 1 the kernel computes in fp32, so the two
    # agree up to summation order; at 4 it also rounds A to int8 per block, a further small error.
    dequantized = dict(w)
    for name in graphs.CONVERTED_WEIGHTS:
        as_nk = w[name] if name == "gemm_t" else np.ascontiguousarray(w[name].T)
        back = dequantize_int4(*quantize_int4(as_nk, 32), as_nk.shape, 32)
        dequantized[name] = back if name == "gemm_t" else np.ascontiguousarray(back.T)
    reference = graphs.run(graphs.build(dequantized), feed)
    for g, r in zip(got, reference, strict=True):
        if accuracy_level == 1:
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
        else:
            assert graphs.relative_error(g, r) < 0.02


def test_same_outputs_as_onnxruntime_quantizer() -> None:
    """ORT's MatMulNBitsQuantizer on the MatMuls (it leaves Gemm alone): same bytes, so the same outputs."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    w = graphs.weights()
    feed = graphs.inputs()
    theirs = MatMulNBitsQuantizer(graphs.build(w), block_size=32, is_symmetric=True, accuracy_level=4,
                                  nodes_to_exclude=["mm_small"])
    theirs.process()
    ours, _ = int4.apply(graphs.build(w), block_size=32, accuracy_level=4, min_elements=graphs.MIN_ELEMENTS)
    assert graphs.op_counts(theirs.model.model)["MatMulNBits"] == 4
    got, want = graphs.run(ours, feed), graphs.run(theirs.model.model, feed)
    np.testing.assert_array_equal(got[0], want[0])  # h3: only MatMuls on its path
    np.testing.assert_array_equal(got[1], want[1])
