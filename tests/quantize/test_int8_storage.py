"""int8 storage for what int8 arithmetic leaves fp32: the weights of kept Gemm/MatMul nodes (`quantize.weight_int8`) and
embedding tables (`quantize.embedding_int8`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from quantize import weight_int8
from tests.quantize import graphs


def _int8_bound(w: np.ndarray, axis: int) -> np.ndarray:
    """Half an int8 step of each output channel: the most a stored weight may move."""
    return np.abs(w).max(axis=1 - axis, keepdims=True) / 127 / 2


@pytest.mark.parametrize("axis", [0, 1])
def test_quantize_weight_is_within_half_a_step(axis: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 40)).astype(np.float32) * rng.uniform(0.01, 3, (48, 1)).astype(np.float32)
    w[5 if axis == 0 else slice(None), 5 if axis == 1 else slice(None)] = 0.0  # an all-zero channel
    q, scale = weight_int8.quantize_weight(w, axis)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (w.shape[axis],)
    shape = (-1, 1) if axis == 0 else (1, -1)
    back = q.astype(np.float32) * scale.reshape(shape)
    assert (np.abs(back - w) <= _int8_bound(w, axis) * 1.0001 + 1e-12).all()
    assert np.abs(q).max() == 127 and scale[5] == 1.0 and not q.take(5, axis=axis).any()


def test_quantize_weight_refuses_what_it_cannot_scale() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        weight_int8.quantize_weight(np.array([[1.0, np.inf]], np.float32), 0)
    with pytest.raises(ValueError, match=r"shape \(3,\) with axis=0"):
        weight_int8.quantize_weight(np.ones(3, np.float32), 0)


def test_named_products_store_int8_weights_and_keep_fp32_arithmetic(tmp_path: Path) -> None:
    w = graphs.weights()
    model = graphs.build(w)
    want = graphs.run(model, graphs.inputs())
    report = weight_int8.apply(model, ["gemm_t", "gemm_n", "mm3", "mm2a", "mm_small", "scores", "add1", "nope"],
                               min_elements=graphs.MIN_ELEMENTS)
    assert report["converted"] == ["mm3", "gemm_t", "gemm_n"]
    assert report["skipped"] == {
        "mm2a": "B is read by 2 nodes", "mm_small": "B has 256 elements, below min_elements=1024",
        "scores": "B is not a constant initializer", "add1": "Add is not a MatMul or Gemm",
        "nope": "no node of that name"}
    n_weights = sum(w[k].size for k in ("w3", "gemm_t", "gemm_n"))
    assert report["weight_bytes_before"] == 4 * n_weights and report["weight_bytes_after"] < 0.3 * 4 * n_weights
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not {"w3", "gemm_t", "gemm_n"} & set(inits)
    assert inits["gemm_t_int8"].dtype == np.int8 and inits["gemm_t_int8"].shape == w["gemm_t"].shape
    assert inits["gemm_t_int8_scale"].shape == (64,)  # Gemm transB=1: B is [N, K], one scale per row
    assert inits["gemm_n_int8_scale"].shape == (32,) and inits["w3_int8_scale"].shape == (47,)
    assert graphs.op_counts(model)["DequantizeLinear"] == 3
    onnx.checker.check_model(model)

    got = graphs.run(model, graphs.inputs())
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and graphs.relative_error(g, r) < 0.01
    assert graphs.relative_error(got[0], want[0]) > 0  # the weights really changed

    # the session ONNX Runtime builds holds no fp32 copy of those weights: it keeps DequantizeLinear -> Gemm, or
    # turns DequantizeLinear -> MatMul into an 8-bit MatMulNBits
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    fp32 = {t.name for t in opt.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2}
    assert fp32 == {"w1", "w2", "small"}
    ops = {n.output[0]: n for n in opt.graph.node}
    assert ops["g1"].op_type == "Gemm" and ops[ops["g1"].input[1]].op_type == "DequantizeLinear"
    assert all(ops[o].op_type in ("MatMul", "MatMulNBits") for o in ("h3", "g2"))


def test_old_opsets_are_refused() -> None:
    model = graphs.build(graphs.weights())
    model.opset_import[0].version = 12
    with pytest.raises(ValueError, match="opset 12"):
        weight_int8.apply(model, ["gemm_t"])


def _embedding_graph(table: np.ndarray, positions: np.ndarray) -> onnx.ModelProto:
    """ids [2, 7] -> token Gather + position Gather (a table below min_elements) -> sum."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Gather", ["table", "ids"], ["tok"], name="token"),
             helper.make_node("Gather", ["positions", "pos_ids"], ["pos"], name="position"),
             helper.make_node("Add", ["tok", "pos"], ["out"], name="add")]
    graph = helper.make_graph(
        nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 7])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 7, table.shape[1]])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(positions, "positions"),
         numpy_helper.from_array(np.arange(7, dtype=np.int64)[None], "pos_ids")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_embedding_rows_are_int8_and_lookups_match(tmp_path: Path) -> None:
    from quantize import embedding_int8

    rng = np.random.default_rng(0)
    table = (rng.standard_normal((3000, 48)) * rng.uniform(0.001, 0.1, (3000, 1))).astype(np.float32)
    positions = rng.standard_normal((7, 48)).astype(np.float32)
    model = _embedding_graph(table, positions)
    ids = np.array([[0, 1, 2999, 17, 17, 5, 42], [3, 2, 1, 0, 2998, 100, 7]], np.int64)
    want = graphs.run(model, {"ids": ids})[0]
    report = embedding_int8.apply(model, min_elements=1000)
    assert report["converted"] == ["token"] and report["skipped"] == {
        "position": "the table has 336 elements, below min_elements=1000"}
    assert report["weight_bytes_before"] == table.size * 4 and report["weight_bytes_after"] == table.size + 3000 * 4
    onnx.checker.check_model(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "table" not in inits and inits["table_int8"].dtype == np.int8 and inits["table_int8_scale"].shape == (3000, 1)
    got = graphs.run(model, {"ids": ids})[0]
    tok = got - positions[None]
    bound = np.abs(table[ids]).max(axis=-1, keepdims=True) / 127 / 2  # half a step of each row's own scale
    assert (np.abs(tok - table[ids]) <= bound * 1.001 + 1e-6).all() and not np.array_equal(got, want)
    # the session holds the int8 table, not an fp32 copy
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    held = {t.name: t.data_type for t in onnx.load(str(tmp_path / "opt.onnx")).graph.initializer}
    assert held["table_int8"] == onnx.TensorProto.INT8 and "table" not in held


def test_embedding_tables_left_alone_name_the_reason() -> None:
    from quantize import embedding_int8

    table = np.ones((3000, 48), np.float32)
    model = _embedding_graph(table, np.ones((7, 48), np.float32))
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("axis", 1))
    assert embedding_int8.apply(model, min_elements=0)["skipped"]["token"].startswith("Gather axis=1")
    model = _embedding_graph(table, np.ones((7, 48), np.float32))
    model.graph.node.append(onnx.helper.make_node("Identity", ["table"], ["t2"]))
    assert embedding_int8.apply(model, min_elements=0)["skipped"]["token"] == "the table is read by 2 nodes"
