"""The graph walk both 4-bit passes share: eligibility, weights stored outside the model, real SD graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from quantize import int4, nf4
from tests.quantize import graphs

PASSES = {"nf4": (nf4.apply, "MatMulBnb4"), "int4": (int4.apply, "MatMulNBits")}
OTHER_BLOCK_SIZES = {"nf4": (16, 128, 256), "int4": (16, 64, 128, 256)}
"""Block sizes besides each method's default that ONNX Runtime's CPU kernel runs."""


@pytest.mark.parametrize(("method", "block_size"),
                         [(m, b) for m, sizes in OTHER_BLOCK_SIZES.items() for b in sizes])
def test_other_block_sizes_run_in_ort(method: str, block_size: int) -> None:
    apply, _ = PASSES[method]
    w = graphs.weights()
    feed = graphs.inputs()
    want = graphs.run(graphs.build(w), feed)
    model, report = apply(graphs.build(w), block_size=block_size, min_elements=graphs.MIN_ELEMENTS)
    assert report["block_size"] == block_size
    for g, r in zip(graphs.run(model, feed), want, strict=True):
        assert 0 < graphs.relative_error(g, r) < 0.2


@pytest.mark.parametrize("method", sorted(PASSES))
def test_external_weights_are_read_one_by_one(method: str, tmp_path: Path) -> None:
    apply, _ = PASSES[method]
    w = graphs.weights()
    onnx.save_model(graphs.build(w), tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    lazy = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert all(uses_external_data(t) for t in lazy.graph.initializer)
    with pytest.raises(ValueError, match="initializer 'w1' is stored in an external file; pass base_dir="):
        apply(onnx.load(str(tmp_path / "m.onnx"), load_external_data=False), min_elements=graphs.MIN_ELEMENTS)

    model, report = apply(lazy, min_elements=graphs.MIN_ELEMENTS, base_dir=tmp_path)
    assert not any(uses_external_data(t) for t in model.graph.initializer)  # self-contained: save it anywhere
    in_memory, _ = apply(graphs.build(w), min_elements=graphs.MIN_ELEMENTS)
    assert set(report["converted"]) == graphs.CONVERTED_NODES
    feed = graphs.inputs()
    for got, want in zip(graphs.run(model, feed), graphs.run(in_memory, feed), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("method", sorted(PASSES))
def test_default_min_elements(method: str) -> None:
    apply, _ = PASSES[method]
    _, report = apply(graphs.build(graphs.weights()))
    assert set(report["converted"]) == {"mm1", "mm2a", "mm2b", "gemm_t"}
    assert report["skipped"]["mm3"] == "K*N=80*47=3760 is below min_elements=4096"
    assert report["skipped"]["gemm_n"] == "K*N=64*32=2048 is below min_elements=4096"
    with pytest.raises(ValueError, match="min_elements=-1 must be 0 or more"):
        apply(graphs.build(graphs.weights()), min_elements=-1)


def _two_matmuls(b: onnx.TensorProto, extra: list[onnx.NodeProto] | None = None,
                 graph_inputs: list[onnx.ValueInfoProto] | None = None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])
    nodes = [helper.make_node("MatMul", ["x", b.name], ["y"], name="mm"), *(extra or [])]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for n in nodes for o in n.output]
    graph = helper.make_graph(nodes, "g", [x, *(graph_inputs or [])], outputs, [b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("method", sorted(PASSES))
def test_weight_read_elsewhere_keeps_its_fp32_copy(method: str) -> None:
    apply, op_type = PASSES[method]
    b = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "b")
    model, report = apply(_two_matmuls(b, [helper.make_node("ReduceSum", ["b"], ["b_sum"], name="sum")]))
    assert report["converted"] == ["mm"] and report["kept_fp32"] == ["b"]
    assert "b" in {t.name for t in model.graph.initializer}
    assert graphs.op_counts(model)[op_type] == 1


@pytest.mark.parametrize("method", sorted(PASSES))
def test_weights_left_alone_name_the_reason(method: str) -> None:
    apply, _ = PASSES[method]
    rng = np.random.default_rng(0)
    b16 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float16), "b")
    _, report = apply(_two_matmuls(b16))
    assert report["skipped"] == {"mm": "B is float16; only float32 weights are converted"}

    b = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "b")
    overridable = helper.make_tensor_value_info("b", TensorProto.FLOAT, [64, 64])
    _, report = apply(_two_matmuls(b, graph_inputs=[overridable]))
    assert report["skipped"] == {"mm": "B is also a graph input, so a caller may override it"}

    gemms = [helper.make_node("Gemm", ["x", "b"], ["ta"], name="trans_a", transA=1),
             helper.make_node("Gemm", ["x", "b"], ["al"], name="alpha", alpha=0.5)]
    _, report = apply(_two_matmuls(b, gemms))
    assert report["converted"] == ["mm"]
    assert report["skipped"] == {"trans_a": "Gemm transA=1 is not converted",
                                 "alpha": "Gemm alpha=0.5, beta=1.0; only alpha=1, beta=1 are converted"}

    b3 = numpy_helper.from_array(rng.standard_normal((1, 64, 64)).astype(np.float32), "b")
    _, report = apply(_two_matmuls(b3))
    assert report["skipped"] == {"mm": "B has shape [1, 64, 64]; only 2-D weights are converted"}


@pytest.mark.parametrize("method", sorted(PASSES))
def test_tiny_sd_components(method: str, tiny_bundle: Path) -> None:
    """The compiled tiny UNet and text encoder: fused Attention keeps its packed QKV weight, every MatMul and
    Gemm with a constant weight is converted, and the outputs stay close to fp32."""
    apply, op_type = PASSES[method]
    rng = np.random.default_rng(0)
    # random 32-wide weights: 4-bit error is large per layer, and the text encoder's final LayerNorm
    # rescales it (nf4 ~0.19, int4 ~0.22 there, ~0.04 on the UNet); parity per value is proven on graphs.py
    tolerance = {"unet": 0.1, "text_encoder": 0.35}
    feeds = {
        "unet": {"sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
                 "timestep": np.array([500.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal((1, 77, 32)).astype(np.float32)},
        "text_encoder": {"input_ids": rng.integers(0, 1000, (1, 77)).astype(np.int64)},
    }
    for component, feed in feeds.items():
        path = tiny_bundle / f"{component}.onnx"
        fp32 = onnx.load(str(path))
        eligible = graphs.constant_matmuls(fp32)
        model, report = apply(onnx.load(str(path)), min_elements=0)
        assert sorted(report["converted"]) == sorted(eligible)
        assert graphs.constant_matmuls(model) == []
        assert graphs.op_counts(model)[op_type] == len(eligible)
        assert report["kept_fp32"] == []
        (got,), (want,) = graphs.run(model, feed), graphs.run(fp32, feed)
        assert 0 < graphs.relative_error(got, want) < tolerance[component], component
