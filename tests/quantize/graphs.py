"""A small ONNX graph with every case the weight-only passes meet in SD exports, and helpers to run it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

MIN_ELEMENTS = 1024
"""What the tests pass as min_elements: converts every weight below but `small`."""

# name -> shape as stored. MatMul B is [K, N]; `gemm_t` is Gemm transB=1, so stored [N, K].
SHAPES = {
    "w1": (96, 128),      # K=96: NF4 blocks of 64 span rows
    "b1": (128,),
    "w2": (128, 80),      # read by two MatMuls
    "w3": (80, 47),       # K=80 not a multiple of 32/64 (int4 pads the last block); K*N odd (NF4 pads a nibble)
    "gemm_t": (64, 96),   # time-embedding style Gemm: transB=1 with bias
    "gemm_c": (64,),
    "gemm_n": (64, 32),   # Gemm transB=0, no C
    "small": (32, 8),     # 256 elements: below MIN_ELEMENTS
}
CONVERTED_WEIGHTS = {"w1", "w2", "w3", "gemm_t", "gemm_n"}
CONVERTED_NODES = {"mm1", "mm2a", "mm2b", "mm3", "gemm_t", "gemm_n"}
SKIPPED_NODES = {"scores": "computed at run time", "mm_small": "below min_elements"}


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * 0.2).astype(np.float32) for name, shape in SHAPES.items()}


def build(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x [2, 5, 96] -> MatMul/Add/Relu/MatMul chain -> h3 and attention-like scores; e [3, 96] -> two Gemms."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        helper.make_node("Add", ["h1", "b1"], ["h1b"], name="add1"),
        helper.make_node("Relu", ["h1b"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["h1b", "w2"], ["h2a"], name="mm2a"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2b"], name="mm2b"),
        helper.make_node("Add", ["h2a", "h2b"], ["h2"], name="add2"),
        helper.make_node("MatMul", ["h2", "w3"], ["h3"], name="mm3"),
        helper.make_node("Transpose", ["h3"], ["h3t"], name="t3", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["h3", "h3t"], ["scores"], name="scores"),
        helper.make_node("Gemm", ["e", "gemm_t", "gemm_c"], ["g1"], name="gemm_t", transB=1),
        helper.make_node("Gemm", ["g1", "gemm_n"], ["g2"], name="gemm_n"),
        helper.make_node("MatMul", ["g2", "small"], ["g3"], name="mm_small"),
    ]
    graph = helper.make_graph(
        nodes, "weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 96]),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, [3, 96])],
        [helper.make_tensor_value_info("h3", TensorProto.FLOAT, [2, 5, 47]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 5, 5]),
         helper.make_tensor_value_info("g3", TensorProto.FLOAT, [3, 8])],
        [numpy_helper.from_array(a, name) for name, a in w.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def inputs(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((2, 5, 96)).astype(np.float32),
            "e": rng.standard_normal((3, 96)).astype(np.float32)}


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def constant_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes whose B is still an fp32 initializer."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))
