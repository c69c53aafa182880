"""Static int8 from disk (`quantize.int8.qdq_from_disk`): ONNX Runtime's QDQ quantizer over a graph whose weights
stay in its data file gives the graph `onnxruntime.quantization.quantize_static` gives when it loads them all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from quantize.calibration import activation_ranges
from quantize.int8 import qdq_from_disk
from tests.quantize import graphs

OPTIONS = {"MatMulConstBOnly": True, "ActivationSymmetric": False, "WeightSymmetric": True,
           "DefaultTensorType": onnx.TensorProto.FLOAT}


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((2, 5, 96)).astype(np.float32) * (i + 1),
             "e": rng.standard_normal((3, 96)).astype(np.float32)} for i in range(3)]


def _tensors(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))  # with the data file, where there is one
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("external_out", [False, True])
def test_from_disk_equals_onnxruntimes_quantize_static(tmp_path: Path, external_out: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    src = tmp_path / "src" / "g.onnx"
    src.parent.mkdir()
    # every weight in g.onnx.data, as the compiler writes a UNet
    onnx.save_model(graphs.build(graphs.weights()), str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="g.onnx.data", size_threshold=0)
    ranges = activation_ranges(src, _feeds(), ("MatMul", "Gemm"))
    exclude = ["gemm_t"]  # a node kept in fp32: its weight is copied as it is

    want = tmp_path / "want" / "q.onnx"
    want.parent.mkdir()
    cache = tmp_path / "ranges.json"
    save_tensors_data(ranges, cache)
    quantize_static(str(src), str(want), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude, reduce_range=True, calibrate_method=CalibrationMethod.MinMax,
                    calibration_cache_path=str(cache), extra_options=OPTIONS)

    got = tmp_path / "got" / "q.onnx"
    got.parent.mkdir()
    qdq_from_disk(src, got, ranges, op_types=("MatMul", "Gemm"), activation_type=QuantType.QUInt8,
                  nodes_to_exclude=exclude, external_data=external_out, reduce_range=True, extra_options=OPTIONS)

    a, b = onnx.load(str(want), load_external_data=False), onnx.load(str(got), load_external_data=False)
    assert [(n.op_type, list(n.input), list(n.output)) for n in b.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node]
    assert sum(n.op_type == "DequantizeLinear" for n in b.graph.node) >= 5  # it did quantize
    wants, gots = _tensors(want), _tensors(got)
    assert set(gots) == set(wants)
    for name, value in wants.items():
        assert gots[name].dtype == value.dtype and np.array_equal(gots[name], value), name
    assert gots["gemm_t"].dtype == np.float32  # the excluded node's weight, copied from the source data file
    # the result reads nothing from the source's data file: its own, or inline
    stored = [t for t in b.graph.initializer if uses_external_data(t)]
    assert bool(stored) == external_out
    assert all(dict((e.key, e.value) for e in t.external_data)["location"] == "q.onnx.data" for t in stored)
