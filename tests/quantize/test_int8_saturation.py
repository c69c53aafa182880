"""int8 weights and saturating CPUs (issue 21): the graphs `quantize.int8` writes, run by ONNX Runtime on this CPU,
against an exact numpy emulation of their integer arithmetic.

Without VNNI, ONNX Runtime's U8S8 kernels add neighbouring uint8 x int8 products into a saturating int16. The
default 7-bit weights must give the exact integers on whichever CPU runs this; full-range (8-bit) weights must
deviate exactly where runtime/cpu.py's probe says this CPU saturates, and be exact again on the kernels the
runtime then uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantize import int8
from runtime import cpu

K, N = 64, 32  # MatMul x [2, K] @ w [K, N]
C, OUT = 16, 8  # Conv x [1, C, 5, 5] * w [OUT, C, 3, 3] + b [OUT]


def _float_model() -> onnx.ModelProto:
    """One MatMul and one 3x3 Conv whose weights all sit in the top half of their channel's range, so that with
    activations near the top of theirs, neighbouring products overflow int16 unless the codes stay within 64."""
    rng = np.random.default_rng(21)

    def w(shape: tuple[int, ...]) -> np.ndarray:
        return (np.sign(rng.standard_normal(shape)) * rng.uniform(0.6, 1.0, shape) * 0.05).astype(np.float32)

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_mm"], ["y_mm"], name="block/mm"),
         helper.make_node("Conv", ["xc", "w_conv", "b_conv"], ["y_conv"], name="block/conv")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K]),
         helper.make_tensor_value_info("xc", TensorProto.FLOAT, [1, C, 5, 5])],
        [helper.make_tensor_value_info("y_mm", TensorProto.FLOAT, [2, N]),
         helper.make_tensor_value_info("y_conv", TensorProto.FLOAT, [1, OUT, 3, 3])],
        [numpy_helper.from_array(w((K, N)), "w_mm"), numpy_helper.from_array(w((OUT, C, 3, 3)), "w_conv"),
         numpy_helper.from_array(w((OUT,)), "b_conv")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _calibration() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.uniform(0, 1, (2, K)).astype(np.float32),
             "xc": rng.uniform(0, 1, (1, C, 5, 5)).astype(np.float32)} for _ in range(2)]


def _inputs(quantized: onnx.ModelProto | None = None) -> dict[str, np.ndarray]:
    """Activations in the top tenth of the calibrated range. For a static graph they are put on its activation
    grid, so that quantizing them is exact and any difference comes from the products."""
    rng = np.random.default_rng(1)
    feeds = {"x": rng.uniform(0.9, 1, (2, K)).astype(np.float32),
             "xc": rng.uniform(0.9, 1, (1, C, 5, 5)).astype(np.float32)}
    if quantized is not None:
        inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
        for name, x in feeds.items():
            s, z = float(inits[f"{name}_scale"]), int(inits[f"{name}_zero_point"])
            feeds[name] = ((np.clip(np.rint(x / s) + z, 0, 255) - z) * s).astype(np.float32)
    return feeds


def _emulate(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph evaluated in float64 numpy: a product of dequantized codes, (a - za) * sa * w * sw, is exact there,
    so this is the integer arithmetic of an exact (non-saturating) kernel, up to the rounding of a requantized
    output to the nearest code."""
    env: dict[str, Any] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    env.update(feeds)

    def per_axis(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
        return v if v.ndim == 0 else v.reshape([-1 if i == axis else 1 for i in range(ndim)])

    for node in model.graph.node:
        a = [env[i] if i else None for i in node.input]
        attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if node.op_type == "QuantizeLinear":
            lo, hi = (0, 255) if a[2].dtype == np.uint8 else (-128, 127)
            out = [np.clip(np.rint(a[0].astype(np.float64) / a[1].astype(np.float32)) + a[2], lo, hi)]
        elif node.op_type == "DequantizeLinear":
            axis = attrs.get("axis", 1) % a[0].ndim
            zp = np.zeros((), np.int64) if len(a) < 3 else a[2].astype(np.int64)
            out = [(a[0].astype(np.int64) - per_axis(zp, axis, a[0].ndim))
                   * per_axis(a[1].astype(np.float64), axis, a[0].ndim)]
        elif node.op_type == "DynamicQuantizeLinear":
            x = a[0].astype(np.float32)
            scale = np.float32((max(0.0, x.max()) - min(0.0, x.min())) / np.float32(255))
            zp = np.clip(np.rint(-min(0.0, x.min()) / scale), 0, 255)
            out = [np.clip(np.rint(x / scale) + zp, 0, 255), scale, zp]
        elif node.op_type == "MatMulInteger":
            out = [(a[0].astype(np.int64) - a[2].astype(np.int64)) @ (a[1].astype(np.int64) - a[3].astype(np.int64))]
        elif node.op_type in ("MatMul", "Mul"):
            x, y = a[0].astype(np.float64), a[1].astype(np.float64)
            out = [x @ y if node.op_type == "MatMul" else x * y]
        elif node.op_type == "Cast":
            out = [a[0].astype(np.float64)]
        elif node.op_type == "Conv":  # stride 1, no padding, as _float_model's
            x, w = a[0].astype(np.float64), a[1].astype(np.float64)
            kh, kw = w.shape[2:]
            oh, ow = x.shape[2] - kh + 1, x.shape[3] - kw + 1
            cols = np.stack([x[:, :, i:i + kh, j:j + kw].reshape(x.shape[0], -1)
                             for i in range(oh) for j in range(ow)], -1)
            y = np.einsum("ok,nkp->nop", w.reshape(w.shape[0], -1), cols).reshape(x.shape[0], -1, oh, ow)
            out = [y + (a[2].astype(np.float64).reshape(1, -1, 1, 1) if len(a) > 2 else 0)]
        else:
            raise AssertionError(f"the emulator does not know {node.op_type}")
        env.update(zip(node.output, out, strict=False))
    return {o.name: env[o.name] for o in model.graph.output}


def _run(path: Path, feeds: dict[str, np.ndarray], config: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _steps_off(got: dict[str, np.ndarray], want: dict[str, np.ndarray], step: dict[str, float]) -> dict[str, float]:
    """Largest |ONNX Runtime - emulation| per output, in output steps (1 is a requantization's rounding)."""
    return {k: float(np.abs(got[k].astype(np.float64) - want[k]).max() / step[k]) for k in want}


def _weight_codes(model: onnx.ModelProto) -> np.ndarray:
    return np.concatenate([numpy_helper.to_array(t).ravel() for t in model.graph.initializer
                           if t.data_type == TensorProto.INT8 and t.name.startswith("w_")])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("saturation") / "float.onnx"
    onnx.save(_float_model(), str(path))
    return path


def _static(source: Path, bits: int) -> tuple[Path, onnx.ModelProto, dict[str, Any]]:
    out = source.with_name(f"static-{bits}.onnx")
    report = int8.quantize_static(source, out, _calibration(), weight_bits=bits)
    return out, onnx.load(str(out)), report


def _static_steps(model: onnx.ModelProto) -> dict[str, float]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {o: float(inits[f"{o}_scale"]) for o in ("y_mm", "y_conv")}


def test_seven_bit_static_int8_computes_the_exact_integers_on_this_cpu(source: Path) -> None:
    path, model, report = _static(source, 7)
    assert report["weight_bits"] == 7 and report["saturation_safe"] and report["weight_range"] == [-64, 64]
    codes = _weight_codes(model)
    assert np.abs(codes).max() == 64  # the whole 7-bit range is used, and nothing beyond it
    feeds = _inputs(model)
    off = _steps_off(_run(path, feeds), _emulate(model, feeds), _static_steps(model))
    assert max(off.values()) <= 1.0, off


def test_full_range_static_int8_deviates_exactly_where_the_probe_says(source: Path) -> None:
    path, model, report = _static(source, 8)
    assert report["weight_bits"] == 8 and not report["saturation_safe"] and report["weight_range"] == [-127, 127]
    assert np.abs(_weight_codes(model)).max() == 127
    feeds = _inputs(model)
    want, steps = _emulate(model, feeds), _static_steps(model)
    off = _steps_off(_run(path, feeds), want, steps)
    verdict = cpu.int8_verdict()
    # a saturating CPU is far off (tens of steps on both products), an exact one within a rounding
    assert (min(off.values()) > 4) == verdict.probed and (max(off.values()) <= 1) == (not verdict.probed), \
        (off, verdict.detail)
    # the kernels the runtime switches such a component to give the exact integers on every CPU
    exact = _steps_off(_run(path, feeds, cpu.EXACT_KERNELS), want, steps)
    assert max(exact.values()) <= 1.0, exact


@pytest.mark.parametrize("bits", [7, 8])
def test_dynamic_int8_against_the_exact_integers(source: Path, bits: int) -> None:
    """The text encoder's format: activations quantized per call over their full uint8 range."""
    out = source.with_name(f"dynamic-{bits}.onnx")
    report = int8.quantize_dynamic(source, out, weight_bits=bits)
    assert report["weight_bits"] == bits and report["saturation_safe"] == (bits == 7)
    model = onnx.load(str(out))
    assert np.abs(_weight_codes(model)).max() == (64 if bits == 7 else 127)
    feeds = _inputs()
    want = _emulate(model, feeds)
    # one activation code more or less (rounding) moves an output by at most one weight's worth
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    step = {"y_mm": float(np.max(feeds["x"]) / 255 * np.max(np.abs(w["w_mm_quantized"]) * w["w_mm_scale"]))}
    got = _run(out, feeds)
    off = _steps_off({"y_mm": got["y_mm"]}, {"y_mm": want["y_mm"]}, step)["y_mm"]
    saturates = bits == 8 and cpu.int8_verdict().probed
    assert (off > 100) if saturates else (off <= 2), (off, cpu.int8_verdict().detail)
    if bits == 8:
        exact = _run(out, feeds, cpu.EXACT_KERNELS)["y_mm"]
        assert _steps_off({"y_mm": exact}, {"y_mm": want["y_mm"]}, step)["y_mm"] <= 2


def test_weight_bits_is_checked(source: Path) -> None:
    with pytest.raises(ValueError, match=r"int8 weight_bits=6 is not one of: 7, 8"):
        int8.quantize_static(source, source.with_name("x.onnx"), _calibration(), weight_bits=6)
    with pytest.raises(ValueError, match=r"int8 weight_bits=16 is not one of: 7, 8"):
        int8.quantize_dynamic(source, source.with_name("x.onnx"), weight_bits=16)


def test_the_gate_measures_full_range_int8_on_the_exact_kernels(source: Path, tmp_path: Path) -> None:
    """What the gate records is what the runtime serves on either CPU kind (runtime/cpu.py)."""
    from quantize import stage
    from quantize.fidelity import FidelityError
    from tests.quantize import graphs

    key = next(iter(cpu.EXACT_KERNELS))
    for bits in (7, 8):
        path, _, report = _static(source, bits)
        options = stage._gate_session("unet", path, report)._session.get_session_options()
        if bits == 8:
            assert options.get_session_config_entry(key) == "1"
        else:
            with pytest.raises(RuntimeError, match="does not have configuration with key"):
                options.get_session_config_entry(key)
    # a weight read by two products: ONNX Runtime 1.32's exact kernels fail to load the graph ("Attempt to replace
    # the existing tensor"); the compile must stop rather than publish what a CPU without VNNI could not serve
    shared = tmp_path / "shared.onnx"
    onnx.save(graphs.build(graphs.weights()), str(shared))
    report = int8.quantize_static(shared, tmp_path / "shared-int8.onnx", [graphs.inputs()], weight_bits=8)
    try:
        stage._gate_session("unet", tmp_path / "shared-int8.onnx", report)
    except FidelityError as e:
        assert "unet (int8, 8-bit weights): ONNX Runtime's exact int8 kernels cannot load it" in str(e)
        assert "--int8-weight-bits 7 (the default)" in str(e)
    else:  # a later ONNX Runtime that loads it: the gate then measures it like any other full-range graph
        outputs = _run(tmp_path / "shared-int8.onnx", graphs.inputs(), cpu.EXACT_KERNELS)
        assert all(np.isfinite(v).all() for v in outputs.values())
