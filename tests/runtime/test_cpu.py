"""runtime/cpu.py: the int8 probe, its verdict against what a full-range int8 graph really does on this CPU,
and what the runtime does with full-range and 7-bit int8 bundles on saturating and exact CPUs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_store import BundleRef, ManifestError
from quantize.fidelity import rel_error
from runtime import cpu
from runtime.model import LoadedModel, load_bundle
from runtime.sessions import OrtSession


def build_probe() -> bytes:
    """runtime.cpu.PROBE_ONNX from its constants, in the QDQ form quantize/int8.py writes (ORT fuses it into
    QLinearMatMul and QLinearConv): activations uint8 (scale 1/255, zero point 0), weights int8 per output channel
    (code w, scale 1/|w|), outputs uint8 (scale 1, zero point 128)."""
    codes = np.array(cpu.PROBE_WEIGHTS, np.int64)
    n = len(codes)
    w_mm = np.broadcast_to(codes, (cpu.PROBE_K, n)).astype(np.int8)
    w_conv = np.broadcast_to(codes.reshape(n, 1, 1, 1), (n, cpu.PROBE_CHANNELS, 3, 3)).astype(np.int8)
    scales = (1.0 / np.abs(codes)).astype(np.float32)
    # each weight has its own scale and zero point, as the quantizer writes them (ONNX Runtime 1.32's
    # session.x64quantprecision fails to load a graph whose int8 weights share a zero-point initializer)
    inits = [numpy_helper.from_array(a, name) for name, a in {
        "sx": np.array(1 / 255, np.float32), "zx": np.array(0, np.uint8),
        "sy": np.array(1, np.float32), "zy": np.array(128, np.uint8),
        "w_mm": w_mm, "sw_mm": scales, "zw_mm": np.zeros(n, np.int8),
        "w_conv": w_conv, "sw_conv": scales, "zw_conv": np.zeros(n, np.int8)}.items()]
    nodes = []
    for op, x, w, axis in (("MatMul", "x_mm", "w_mm", 1), ("Conv", "x_conv", "w_conv", 0)):
        y = "y" + x[1:]
        nodes += [helper.make_node("QuantizeLinear", [x, "sx", "zx"], [x + "_q"]),
                  helper.make_node("DequantizeLinear", [x + "_q", "sx", "zx"], [x + "_dq"]),
                  helper.make_node("DequantizeLinear", [w, "s" + w, "z" + w], [w + "_dq"], axis=axis),
                  helper.make_node(op, [x + "_dq", w + "_dq"], [y + "_f"]),
                  helper.make_node("QuantizeLinear", [y + "_f", "sy", "zy"], [y + "_q"]),
                  helper.make_node("DequantizeLinear", [y + "_q", "sy", "zy"], [y])]
    graph = helper.make_graph(
        nodes, "kiln_int8_probe",
        [helper.make_tensor_value_info("x_mm", TensorProto.FLOAT, [cpu.PROBE_ROWS, cpu.PROBE_K]),
         helper.make_tensor_value_info("x_conv", TensorProto.FLOAT, [1, cpu.PROBE_CHANNELS, 3, 3])],
        [helper.make_tensor_value_info("y_mm", TensorProto.FLOAT, [cpu.PROBE_ROWS, n]),
         helper.make_tensor_value_info("y_conv", TensorProto.FLOAT, [1, n, 1, 1])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_probe_is_the_graph_onnx_builds_from_its_constants() -> None:
    assert build_probe() == cpu.PROBE_ONNX, "regenerate runtime/cpu.py's PROBE_ONNX from build_probe()"


def test_probe_on_this_cpu() -> None:
    errors = cpu.probe_errors(cpu.run_probe())
    full = [i for i, w in enumerate(cpu.PROBE_WEIGHTS) if abs(w) > 64]
    for name, errs in errors.items():
        assert all(e == 0 for i, e in enumerate(errs) if i not in full), (name, errs)  # 7-bit codes: exact anywhere
    saturated = [errs[i] for errs in errors.values() for i in full]
    verdict = cpu.int8_verdict()
    assert verdict.probed == (max(saturated) > 0.5) and verdict.engine == "onnxruntime"
    if verdict.probed:  # half of each product's pairs clamp at 32,767: about half the exact value
        assert errors["y_mm"][0] == cpu.PROBE_K // 2 and errors["y_conv"][0] == cpu.PROBE_CHANNELS * 9 // 2
    # the kernels the runtime switches full-range components to are exact here, whatever this CPU is
    exact = cpu.probe_errors(cpu.run_probe(exact_kernels=True))
    assert all(e == 0 for errs in exact.values() for e in errs), exact


def test_probe_agrees_with_the_documented_cause() -> None:
    """On x86, ONNX Runtime's U8S8 kernels are exact with VNNI (AVX-512 or AVX) or AMX and saturate without."""
    flags = cpu.cpu_flags()
    if not flags["avx2"]:
        pytest.skip("not an x86 CPU with AVX2: the cause is about x86 int8 kernels")
    exact_isa = flags["avx512_vnni"] or flags["avx_vnni"] or flags["amx_int8"]
    assert cpu.int8_verdict().probed == (not exact_isa), (cpu.describe_flags(), cpu.int8_verdict().detail)


def test_the_verdict_can_be_set_for_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    probed = cpu.int8_verdict().probed
    for value, saturates in (("1", True), ("0", False)):
        monkeypatch.setenv(cpu.SATURATION_ENV, value)
        verdict = cpu.int8_verdict()
        assert verdict.saturates == saturates and verdict.probed == probed
        assert f"{cpu.SATURATION_ENV}={value}" in verdict.detail
    monkeypatch.setenv(cpu.SATURATION_ENV, "yes")
    with pytest.raises(ValueError, match=r"KILN_INT8_SATURATES='yes' must be 1, 0 or unset"):
        cpu.int8_verdict()


def test_cpu_flags_name_the_model_and_every_flag() -> None:
    flags = cpu.cpu_flags()
    assert set(flags) == set(cpu.FLAGS) and cpu.cpu_model()
    text = cpu.describe_flags()
    assert all(f in text for f in cpu.FLAGS)


# Serving: tiny bundles whose UNet is int8 with full-range and with 7-bit weights, through the runtime's loader.

FAST = {"calibration_prompts": 1, "fidelity_prompts": 1, "weight_min_elements": 0, "min_psnr": 15.0}


@pytest.fixture(scope="module")
def int8_bundles(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, BundleRef]:
    from compiler.compile import compile_model
    from compiler.config import CompileConfig
    from quantize.config import QuantizeConfig

    store = tmp_path_factory.mktemp("int8-bits")
    out = {}
    for bits in (7, 8):
        config = CompileConfig(name=f"tiny-w{bits}", precision="unet=int8", default_steps=4,
                               quantize=QuantizeConfig(**FAST, int8_weight_bits=bits))  # type: ignore[arg-type]
        result = compile_model(tiny_source, store, config, progress=False)
        out[bits] = BundleRef(result.path, result.manifest)
    return out


def _unet_feed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
            "timestep": np.array([10.0, 700.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}


def _exact_entry(model: LoadedModel, component: str) -> str:
    session = model.sessions[component]
    assert isinstance(session, OrtSession)
    try:
        return session._session.get_session_options().get_session_config_entry(next(iter(cpu.EXACT_KERNELS)))
    except RuntimeError:  # "does not have configuration with key"
        return ""


def test_manifests_record_the_weight_range(int8_bundles: dict[int, BundleRef]) -> None:
    for bits, ref in int8_bundles.items():
        m = ref.manifest
        unet = m.components["unet"].quantization
        assert unet["weight_bits"] == bits and unet["saturation_safe"] == (bits == 7)
        assert cpu.full_range_int8(unet) == (bits == 8)
        assert not any(cpu.full_range_int8(c.quantization) for n, c in m.components.items() if n != "unet")
    # a report from before Kiln recorded the range counts as full range; an nf4/int4 report is read by its convs
    legacy = {k: v for k, v in int8_bundles[7].manifest.components["unet"].quantization.items()
              if k not in ("weight_bits", "weight_range", "saturation_safe")}
    assert cpu.full_range_int8(legacy) and cpu.full_range_int8({"matmul": {}, "conv": legacy})
    assert not cpu.full_range_int8({"fallback": "int8 failed the fidelity gate", "tried": legacy})


def test_full_range_bundle_on_a_saturating_cpu_runs_exact_kernels(
        int8_bundles: dict[int, BundleRef], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(cpu.SATURATION_ENV, "1")  # this CPU's own verdict: test_served_as_this_cpu_needs
    ref = int8_bundles[8]
    with caplog.at_level(logging.WARNING, logger="runtime.cpu"):
        model = load_bundle(ref)
    warning = next(r.getMessage() for r in caplog.records if r.name == "runtime.cpu")
    assert f"bundle tiny-w8 {ref.manifest.version}: the int8 weights of unet span the full range (8-bit)" in warning
    assert "exact U8U8 kernels" in warning and "--int8-weight-bits 7" in warning
    assert _exact_entry(model, "unet") == "1" and _exact_entry(model, "text_encoder") == ""
    # the served UNet computes what ONNX Runtime's exact kernels compute ...
    feed = _unet_feed()
    out = model.sessions["unet"].output_names[0]
    served = model.sessions["unet"].run(feed)[out]
    options = ort.SessionOptions()
    for key, value in cpu.EXACT_KERNELS.items():
        options.add_session_config_entry(key, value)
    exact = ort.InferenceSession(str(ref.path / "unet.onnx"), options, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(served, exact.run([out], feed)[0])
    # ... which is far from the default kernels' output exactly where those saturate (0.44 on an AVX2-only AMD
    # EPYC), and within requantization roundings of it where they are exact
    default = ort.InferenceSession(str(ref.path / "unet.onnx"), providers=["CPUExecutionProvider"])
    apart = rel_error(served, default.run([out], feed)[0])
    assert (apart > 0.05) == cpu.int8_verdict().probed and (apart > 0.05 or apart < 0.01), apart


def test_full_range_bundle_is_refused_by_openvino_on_a_saturating_cpu(
        int8_bundles: dict[int, BundleRef], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openvino")
    monkeypatch.setenv(cpu.SATURATION_ENV, "1")
    refusal = (r"bundle tiny-w8 .*: the int8 weights of unet span the full range \(8-bit\), and their uint8 x int8 "
               r"products saturate on this CPU .* openvino has no exact kernels for them: recompile it with 7-bit int8 "
               r"weights \(`kiln compile --int8-weight-bits 7`, the default\), or serve it with --engine onnxruntime")
    with pytest.raises(ManifestError, match=refusal):
        load_bundle(int8_bundles[8], engine="openvino")
    load_bundle(int8_bundles[7], engine="openvino")  # 7-bit weights: nothing to refuse


def test_openvino_probe_agrees_with_onnx_runtime_here() -> None:
    """The refusal rests on OpenVINO's own int8 kernels, probed the same way."""
    pytest.importorskip("openvino")
    errors = cpu.probe_errors(cpu.run_probe("openvino"))
    full = [i for i, w in enumerate(cpu.PROBE_WEIGHTS) if abs(w) > 64]
    assert all(e == 0 for errs in errors.values() for i, e in enumerate(errs) if i not in full), errors
    assert cpu.int8_verdict("openvino").probed == cpu.int8_verdict().probed, cpu.int8_verdict("openvino").detail


@pytest.mark.parametrize(("bits", "verdict"), [(8, "0"), (7, "1"), (7, "0")])
def test_nothing_changes_where_nothing_saturates(int8_bundles: dict[int, BundleRef], bits: int, verdict: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(cpu.SATURATION_ENV, verdict)
    with caplog.at_level(logging.WARNING, logger="runtime.cpu"):
        model = load_bundle(int8_bundles[bits])
    assert not [r for r in caplog.records if r.name == "runtime.cpu"]
    assert _exact_entry(model, "unet") == ""


def test_served_as_this_cpu_needs(int8_bundles: dict[int, BundleRef], monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(cpu.SATURATION_ENV, raising=False)
    saturates = cpu.int8_verdict().probed
    with caplog.at_level(logging.WARNING, logger="runtime.cpu"):
        full, safe = load_bundle(int8_bundles[8]), load_bundle(int8_bundles[7])
    assert bool([r for r in caplog.records if r.name == "runtime.cpu"]) == saturates
    assert _exact_entry(full, "unet") == ("1" if saturates else "") and _exact_entry(safe, "unet") == ""
