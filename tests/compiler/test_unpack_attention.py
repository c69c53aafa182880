"""The unpack-attention pass: fused self-attention back to Q/K/V MatMuls + MultiHeadAttention, same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from compiler.passes import fusions, unpack_attention


def test_unpacks_every_self_attention_and_keeps_outputs(tiny_bundle: Path) -> None:
    fused = onnx.load(str(tiny_bundle / "unet.onnx"))
    before = fusions.op_counts(fused)
    assert before["Attention"] == 4 and before["MultiHeadAttention"] == 4
    unpacked, n = unpack_attention.apply(onnx.load(str(tiny_bundle / "unet.onnx")))
    after = fusions.op_counts(unpacked)
    assert n == 4 and "Attention" not in after
    assert after["MultiHeadAttention"] == 8 and after["MatMul"] == before["MatMul"] + 3 * 4
    # the packed Q/K/V weights are gone, replaced by three [D, D] weights each
    names = {i.name for i in unpacked.graph.initializer}
    assert not any(name.endswith("qkv_weight") for name in names)
    assert sum(name.endswith(("_q_weight", "_k_weight", "_v_weight")) for name in names) == 12

    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((2, 4, 16, 24), dtype=np.float32),
            "timestep": np.array([10.0, 700.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    want = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(unpacked.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_models_without_attention_are_unchanged(tiny_bundle: Path) -> None:
    model = onnx.load(str(tiny_bundle / "vae_decoder.onnx"))
    before = model.SerializeToString()
    _, n = unpack_attention.apply(model)
    assert n == 0 and model.SerializeToString() == before
