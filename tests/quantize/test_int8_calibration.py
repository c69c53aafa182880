"""Static int8 calibration sees every feed: the activation range in the QDQ model covers all of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from quantize.int8 import quantize_static
from tests.quantize import graphs


def _input_scale(model: onnx.ModelProto, tensor: str) -> tuple[float, int]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == tensor:
            return float(inits[node.input[1]]), int(inits[node.input[2]])
    raise AssertionError(f"no QuantizeLinear reads {tensor}")


def test_range_covers_every_feed_not_only_the_last_chunk(tmp_path: Path) -> None:
    src = tmp_path / "g.onnx"
    onnx.save(graphs.build(graphs.weights()), str(src))
    rng = np.random.default_rng(0)
    e = rng.standard_normal((3, 96)).astype(np.float32)
    # x spans [-1, 1] in feed 0, [-6, 2] in feed 1 and [0, 0.5] in feed 2: the range must be [-6, 2]
    lows_highs = [(-1.0, 1.0), (-6.0, 2.0), (0.0, 0.5)]
    feeds = []
    for lo, hi in lows_highs:
        x = rng.uniform(lo, hi, (2, 5, 96)).astype(np.float32)
        x.flat[0], x.flat[1] = lo, hi
        feeds.append({"x": x, "e": e})
    out = tmp_path / "q.onnx"
    quantize_static(src, out, feeds, op_types=("MatMul",), activations="u8")
    scale, zero = _input_scale(onnx.load(str(out)), "x")
    np.testing.assert_allclose(scale, (2.0 - -6.0) / 255, rtol=1e-5)
    assert zero == round(6.0 / scale)


def test_calibration_runs_at_the_requested_size(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """`calibration_size` sets the size of the fp32 runs whose UNet inputs become the calibration feeds."""
    from quantize.calibration import run_pipeline

    small = run_pipeline(tiny_model, ["a red circle"], 2, size=96)
    assert {f["sample"].shape[2:] for f in small.feeds["unet"]} == {(12, 12)}
    assert small.images[0].shape == (96, 96, 3)
    default = run_pipeline(tiny_model, ["a red circle"], 2)
    assert {f["sample"].shape[2:] for f in default.feeds["unet"]} == {(8, 8)}
