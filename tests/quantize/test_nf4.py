"""NF4: bytes equal to bitsandbytes, and MatMulBnb4 in ONNX Runtime reads them as bitsandbytes does.

Only the comparisons with bitsandbytes need torch and bitsandbytes (the `compiler` extra); each of those skips
alone, naming what goes unchecked, so the packing's own checks and the ONNX Runtime run still count without them.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import onnx
import pytest

from quantize import nf4
from quantize.nf4 import NF4_CODE, dequantize_nf4, quantize_nf4
from tests.quantize import graphs

FMAX = np.finfo(np.float32).max


def bitsandbytes() -> tuple[ModuleType, ModuleType]:
    """(torch, bitsandbytes.functional), or a skip of the calling test that says what it leaves unchecked."""
    why = "is not installed (pip install -e '.[compiler]'): NF4 bytes are not compared with bitsandbytes'"
    torch = pytest.importorskip("torch", reason=f"torch {why}")
    bnb = pytest.importorskip("bitsandbytes.functional", reason=f"bitsandbytes {why}")
    return torch, bnb


def _extremes() -> np.ndarray:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    w[0] *= np.float32(1e-40)                      # subnormal: absmax below bnb's 1e-38 floor
    w[1] *= np.float32(1e30)
    w[2] = np.where(w[2] > 0, FMAX, -FMAX)         # 1/absmax is subnormal
    w[3] = np.float32(1e-45) * np.sign(w[3])       # smallest subnormal
    w[4] = 0.0
    w[4, 3], w[4, 4] = FMAX, -np.float32(1e-45)    # one huge value among zeros
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    w[5] = midpoints[rng.integers(0, 15, 64)]      # exactly between two codes (absmax 1: scaled == value)
    w[5, 0] = 1.0
    w[6] = -w[5]
    w[7] = np.nextafter(w[5], np.float32(2))       # one ulp above the midpoint
    return w


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    zero_tail = rng.standard_normal(134).astype(np.float32)
    zero_tail[64:] = 0  # a full block of zeros, then a short all-zero last block
    return {
        "normal": rng.standard_normal((96, 128)).astype(np.float32),
        "k_not_multiple": rng.standard_normal((3, 70)).astype(np.float32),
        "odd_count": rng.standard_normal((7, 45)).astype(np.float32),
        "zero_block": np.concatenate([np.zeros((1, 64)), rng.standard_normal((1, 64))]).astype(np.float32),
        "zero_tail": zero_tail.reshape(2, 67),
        "extremes": _extremes(),
        "float16": rng.standard_normal((16, 64)).astype(np.float16),
    }


WEIGHTS = _weights()


@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_packing_equals_bitsandbytes(name: str, block_size: int) -> None:
    torch, bnb = bitsandbytes()
    w = WEIGHTS[name]
    q, state = bnb.quantize_4bit(torch.from_numpy(w.copy()), blocksize=block_size, quant_type="nf4")
    packed, absmax = quantize_nf4(w, block_size)
    assert q.shape == (packed.size, 1) and q.dtype == torch.uint8
    np.testing.assert_array_equal(packed, q.numpy().reshape(-1))
    np.testing.assert_array_equal(absmax, state.absmax.numpy())
    # bitsandbytes' native CPU dequantize indexes absmax per row, which disagrees with its own flattened
    # blocks when K % block_size != 0; dequantizing a flat 1-row view uses the flattened blocks throughout.
    flat, flat_state = bnb.quantize_4bit(torch.from_numpy(w.copy()).reshape(-1), blocksize=block_size,
                                         quant_type="nf4")
    ours = dequantize_nf4(packed, absmax, w.shape, block_size).astype(w.dtype)  # bnb returns the input dtype
    np.testing.assert_array_equal(ours, bnb.dequantize_4bit(flat, flat_state).numpy().reshape(w.shape))
    if w.shape[1] % block_size == 0:
        np.testing.assert_array_equal(ours, bnb.dequantize_4bit(q, state).numpy())


def test_packing_in_many_steps_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    torch, bnb = bitsandbytes()
    w = WEIGHTS["normal"]
    monkeypatch.setattr(nf4, "_CHUNK", 100)  # one block per step
    q, state = bnb.quantize_4bit(torch.from_numpy(w.copy()), blocksize=64, quant_type="nf4")
    packed, absmax = quantize_nf4(w, 64)
    np.testing.assert_array_equal(packed, q.numpy().reshape(-1))
    np.testing.assert_array_equal(absmax, state.absmax.numpy())


def test_round_trip_error_is_bounded() -> None:
    w = WEIGHTS["normal"]
    back = dequantize_nf4(*quantize_nf4(w), w.shape)
    absmax = np.repeat(np.abs(w.reshape(-1, 64)).max(axis=1), 64).reshape(w.shape)
    # rounding to the nearest code errs by at most half the widest gap between codes
    assert (np.abs(back - w) <= absmax * np.diff(NF4_CODE).max() / 2 + 1e-6).all()
    assert 0 < np.abs(back - w).mean() < 0.1


def test_bad_input_names_value_and_range() -> None:
    with pytest.raises(ValueError, match=r"block_size=100 must be one of 16, 32, 64, 128, 256"):
        quantize_nf4(WEIGHTS["normal"], 100)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_nf4(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="dtype int32"):
        quantize_nf4(np.ones((2, 2), np.int32))
    packed, absmax = quantize_nf4(WEIGHTS["normal"])
    with pytest.raises(ValueError, match="packed has 6144 bytes; shape \\(96, 64\\) needs 3072"):
        dequantize_nf4(packed, absmax, (96, 64))


def test_pass_on_small_graph_converts_and_runs_in_ort() -> None:
    w = graphs.weights()
    feed = graphs.inputs()
    want = graphs.run(graphs.build(w), feed)
    model, report = nf4.apply(graphs.build(w), min_elements=graphs.MIN_ELEMENTS)

    assert set(report["converted"]) == graphs.CONVERTED_NODES
    assert report["skipped"].keys() == graphs.SKIPPED_NODES.keys()
    for node, fragment in graphs.SKIPPED_NODES.items():
        assert fragment in report["skipped"][node]
    counts = graphs.op_counts(model)
    assert counts["MatMulBnb4"] == 6 and counts["Gemm"] == 0 and counts["Add"] == 3  # Gemm's C -> Add
    assert graphs.constant_matmuls(model) == ["mm_small"]
    names = {t.name for t in model.graph.initializer}
    assert not names & graphs.CONVERTED_WEIGHTS
    assert {"w1_nf4", "w1_nf4_absmax", "w2_nf4", "w2_nf4_absmax"} <= names
    assert "w2_nf4_1" not in names  # packed once for its two MatMuls
    assert not [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims
                and tuple(t.dims) in {graphs.SHAPES[n] for n in graphs.CONVERTED_WEIGHTS}]
    assert report["kept_fp32"] == []
    assert report["weight_bytes_before"] == 4 * sum(np.prod(graphs.SHAPES[n]) for n in graphs.CONVERTED_WEIGHTS)
    assert report["weight_bytes_before"] / report["weight_bytes_after"] > 6.5  # 32 bits -> 4.5
    assert ("com.microsoft", 1) in {(o.domain, o.version) for o in model.opset_import}

    got = graphs.run(model, feed)
    for g, r in zip(got, want, strict=True):
        assert 0 < graphs.relative_error(g, r) < 0.15


def test_ort_reads_the_bytes_as_bitsandbytes_wrote_them() -> None:
    """The same graph in plain fp32 with bitsandbytes' dequantized weights: equal up to summation order, so
    ORT's kernel reads our bytes, nibble order and blocks exactly as bitsandbytes wrote them."""
    torch, bnb = bitsandbytes()
    w = graphs.weights()
    feed = graphs.inputs()
    model, _ = nf4.apply(graphs.build(w), min_elements=graphs.MIN_ELEMENTS)
    got = graphs.run(model, feed)
    dequantized = dict(w)
    for name in graphs.CONVERTED_WEIGHTS:
        as_nk = w[name] if name == "gemm_t" else w[name].T
        q, state = bnb.quantize_4bit(torch.from_numpy(np.ascontiguousarray(as_nk)).reshape(-1), blocksize=64,
                                     quant_type="nf4")
        back = bnb.dequantize_4bit(q, state).numpy().reshape(as_nk.shape)
        dequantized[name] = back if name == "gemm_t" else np.ascontiguousarray(back.T)
    reference = graphs.run(graphs.build(dequantized), feed)
    for g, r in zip(got, reference, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_apply_rejects_block_size_ort_cannot_run() -> None:
    with pytest.raises(ValueError, match="block_size=512 must be one of"):
        nf4.apply(graphs.build(graphs.weights()), block_size=512)
