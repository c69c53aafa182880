"""`kiln compile --precision int8|nf4|int4|fp16` on the tiny model: what lands in the graphs and the manifest,
the fidelity gate (including a deliberately broken quantization), and serving the result."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import quantize
from compiler.compile import compile_model
from compiler.config import CompileConfig
from model_store import Manifest, Store
from quantize import int8
from quantize.config import QuantizeConfig
from quantize.fidelity import FidelityError
from tests.conftest import start_server

# random tiny weights drift further under int8 than trained ones (about 22 dB at 4 steps vs fp32); the
# real-model defaults (25 dB) are exercised by `python -m bench precision`
FAST = {"calibration_prompts": 1, "fidelity_prompts": 1, "weight_min_elements": 0, "min_psnr": 15.0}


def _compile(source: Path, store: Path, name: str, precision: str, **quantize: object) -> Path:
    config = CompileConfig(name=name, precision=precision, default_steps=4,
                           quantize=QuantizeConfig(**{**FAST, **quantize}))  # type: ignore[arg-type]
    return compile_model(source, store, config, progress=False).path


def _seeded(store: Path, fp32_store: Path) -> Path:
    """`store`, holding a copy of the session's fp32 bundle of the same source: a compile there reuses its exported
    graphs (compiler/reuse.py, tested in tests/compiler/test_reuse.py) instead of exporting them again, as a user's
    second precision does; what these tests check starts at the quantize stage."""
    shutil.copytree(fp32_store, store)
    return store


def _ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _optimized_ops(path: Path, tmp: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime's CPU provider actually runs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp / f"opt-{path.name}")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _ops(tmp / f"opt-{path.name}")


@pytest.fixture(scope="module")
def int8_store(tiny_source: Path, tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = _seeded(tmp_path_factory.mktemp("int8") / "store", tiny_store)
    _compile(tiny_source, store, "tiny-int8", "int8")
    return store


def test_int8_graphs_and_manifest(int8_store: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = Store(int8_store).latest("tiny-int8").path
    m = Manifest.read(bundle)
    assert m.precision["text_encoder"] == "int8" and m.precision["unet"] == "int8"
    # the quantizer's code is part of what made the bundle (caches such as the benchmark's key on it)
    assert m.tool_versions["kiln_quantize"] == quantize.code_hash()
    assert "kiln_quantize" not in Manifest.read(tiny_bundle).tool_versions
    unet = m.components["unet"]
    assert "unpack_attention" in unet.passes
    assert unet.op_counts.get("Attention", 0) == 0 and unet.op_counts["MultiHeadAttention"] == 8
    assert unet.op_counts["QuantizeLinear"] > 0 and unet.op_counts["DequantizeLinear"] > 0
    kept = unet.quantization["kept_fp32"]
    assert {"/m/conv_in/Conv", "/m/conv_out/Conv", "/m/time_embedding/linear_1/Gemm"} <= set(kept)
    assert "first conv" in kept["/m/conv_in/Conv"]
    # the kept Gemms (time embedding, per-resnet time projections) compute in fp32 from int8-stored weights
    stored = unet.quantization["kept_weights"]
    kept_gemms = {n for n in kept if n.endswith("/Gemm")}
    assert len(kept_gemms) >= 3 and set(stored["converted"]) == kept_gemms and not stored["skipped"]
    graph = onnx.load(str(bundle / unet.file)).graph
    made_by = {o: n for n in graph.node for o in n.output}
    int8_inits = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    for node in (n for n in graph.node if n.name in kept_gemms):
        dq = made_by[node.input[1]]
        assert dq.op_type == "DequantizeLinear" and dq.input[0] in int8_inits
        assert made_by[node.input[0]].op_type != "DequantizeLinear"  # its activation stays fp32
    assert unet.quantization["activations"] == "uint8 asymmetric"
    # int8 products multiply 7-bit weights by default: the same integers on CPUs with and without VNNI (issue 21);
    # only the kept nodes' weights, multiplied in fp32 after a DequantizeLinear, use the full int8 range
    for name in ("unet", "text_encoder"):
        q = m.components[name].quantization
        assert q["weight_bits"] == 7 and q["saturation_safe"] and q["weight_range"] == [-64, 64]
    kept_inits = {made_by[n.input[1]].input[0] for n in graph.node if n.name in kept_gemms}
    products = [numpy_helper.to_array(t) for t in graph.initializer if t.name in int8_inits - kept_inits]
    assert products and max(int(np.abs(w).max()) for w in products) == 64
    assert m.components["text_encoder"].op_counts["DynamicQuantizeLinear"] > 0
    # the token embedding table (no MatMul reads it) is stored as int8 rows
    embeddings = m.components["text_encoder"].quantization["embeddings"]
    assert embeddings["converted"] == ["/m/embeddings/token_embedding/Gather"]
    assert embeddings["weight_bytes_after"] < 0.3 * embeddings["weight_bytes_before"]
    # the CPU provider runs int8 kernels, and the int8 UNet is far smaller than the fp32 one
    optimized = _optimized_ops(bundle / unet.file, tmp_path)
    assert optimized.get("QLinearConv", 0) > 0 and optimized.get("Conv", 0) <= 2
    assert (bundle / unet.file).stat().st_size < 0.45 * (tiny_bundle / "unet.onnx").stat().st_size
    # fidelity recorded per component and for the bundle
    f = m.fidelity
    assert f["passed"] and not f["low_fidelity"] and f["steps"] == 4 and len(f["prompts"]) == 1
    assert f["size"] == m.defaults["width"] == 64  # the gate runs at the bundle's default size unless told
    assert f["psnr"] >= f["min_psnr"] and 0 < f["ssim"] <= 1
    assert 0 < unet.fidelity["rel_error"] <= f["max_rel_error"]
    for c in m.components.values():
        assert c.precision == "fp32" or c.fidelity["passed"]


def test_fidelity_size_sets_the_gates_image_size(tiny_source: Path, tiny_store: Path, tmp_path: Path) -> None:
    """`fidelity_size` (SDXL's 1024 default would make the gate run for an hour on 2 cores): the gate's fp32
    reference and quantized images are made at that size, and the manifest says which."""
    import quantize.stage as stage
    from quantize.calibration import run_pipeline

    sizes: list[tuple[int, int]] = []

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        run = run_pipeline(*args, **kwargs)
        sizes.extend(im.shape[:2] for im in run.images)
        return run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage, "run_pipeline", recording)
        bundle = _compile(tiny_source, _seeded(tmp_path / "store", tiny_store), "tiny-int8-96", "int8",
                          fidelity_size=96, calibration_size=64)
    m = Manifest.read(bundle)
    assert m.fidelity["size"] == 96 and m.defaults["width"] == 64
    # calibration at 64, then the reference, the text encoder's, the UNet's and the bundle's images at 96
    assert sizes[0] == (64, 64) and set(sizes[1:]) == {(96, 96)} and len(sizes) >= 4


def test_int8_bundle_serves_over_grpc(int8_store: Path, tmp_path: Path) -> None:
    from proto.kiln.v1 import kiln_pb2 as pb
    from runtime.client import generate, list_models

    server = start_server(int8_store, tmp_path / "serve.log")
    try:
        info = next(i for i in list_models(server.target).models if i.name == "tiny-int8")
        assert info.precision["unet"] == "int8" and info.precision["text_encoder"] == "int8"
        assert info.HasField("fidelity") and info.fidelity.psnr_db > FAST["min_psnr"] and not info.fidelity.low_fidelity
        result = generate(server.target, pb.GenerateRequest(model="tiny-int8", prompt="a red circle", seed=3),
                          tmp_path / "out", timeout=60, progress=False)
        assert result.paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(("precision", "op"), [("nf4", "MatMulBnb4"), ("int4", "MatMulNBits")])
def test_4bit_bundles(precision: str, op: str, tiny_source: Path, tiny_store: Path, tmp_path: Path) -> None:
    bundle = _compile(tiny_source, _seeded(tmp_path / "store", tiny_store), f"tiny-{precision}", precision)
    m = Manifest.read(bundle)
    for name in ("text_encoder", "unet"):
        c = m.components[name]
        assert c.precision == precision and c.op_counts[op] == len(c.quantization["matmul"]["converted"]) > 0
        model = onnx.load(str(bundle / c.file))
        consts = {i.name for i in model.graph.initializer}
        # no MatMul with a constant weight is left in fp32
        assert not [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in consts]
    # the UNet's convolutions are int8 in a 4-bit bundle, and the manifest says so
    assert m.components["unet"].quantization["conv"]["method"] == "static QDQ"
    assert m.components["unet"].quantization["conv"]["saturation_safe"]
    assert m.components["unet"].op_counts["DequantizeLinear"] > 0
    assert m.fidelity["passed"]
    _generates(bundle, tmp_path)


def test_fp16_bundle_runs_on_cpu(tiny_source: Path, tiny_store: Path, tmp_path: Path) -> None:
    bundle = _compile(tiny_source, _seeded(tmp_path / "store", tiny_store), "tiny-fp16", "fp16")
    m = Manifest.read(bundle)
    assert set(m.precision.values()) == {"fp16"} and not any(c.gpu_only for c in m.components.values())
    unet = onnx.load(str(bundle / "unet.onnx"))
    kinds = {i.data_type for i in unet.graph.initializer if i.dims and np.prod(i.dims) > 16}
    assert onnx.TensorProto.FLOAT16 in kinds
    assert {i.type.tensor_type.elem_type for i in unet.graph.input} == {onnx.TensorProto.FLOAT}  # io stays fp32
    assert "InstanceNormalization" not in m.components["unet"].quantization["op_block_list"]
    assert m.fidelity["psnr"] > 30
    _generates(bundle, tmp_path)


def _generates(bundle: Path, tmp_path: Path) -> None:
    """The bundle serves over gRPC: `kiln serve` on its store lists it with its precision and generates a PNG."""
    from PIL import Image

    from proto.kiln.v1 import kiln_pb2 as pb
    from runtime.client import generate, list_models

    m = Manifest.read(bundle)
    server = start_server(bundle.parent.parent, tmp_path / "serve.log")
    try:
        info = next(i for i in list_models(server.target).models if i.name == m.name)
        assert dict(info.precision) == m.precision
        result = generate(server.target, pb.GenerateRequest(model=m.name, prompt="a blue square", seed=1),
                          tmp_path / "out", timeout=60, progress=False)
        image = np.asarray(Image.open(result.paths[0]).convert("RGB"))
        assert image.shape == (64, 64, 3) and image.std() > 0
    finally:
        assert server.stop() == 0


def _absurd_scales(path: Path) -> None:
    """Multiply every weight scale of a QDQ graph by 40: a quantizer bug the gate must catch."""
    model = onnx.load(str(path))
    weight_scales = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"
                     and any(i.name == n.input[0] and i.data_type == onnx.TensorProto.INT8 for i in model.graph.initializer)}
    for i, t in enumerate(model.graph.initializer):
        if t.name in weight_scales:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 40, t.name))
    onnx.save(model, str(path))


def test_gate_fails_a_broken_quantization(tiny_source: Path, tiny_store: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    original = int8.quantize_static

    def broken(model_path: Path, out_path: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        info = original(model_path, out_path, *args, **kwargs)
        if out_path.name == "unet.onnx":
            _absurd_scales(out_path)
        return info

    monkeypatch.setattr(int8, "quantize_static", broken)
    store = _seeded(tmp_path / "store", tiny_store)
    with pytest.raises(FidelityError, match=r"unet \(int8\): relative error [0-9.e+]+ is above max_rel_error=0.25") as e:
        _compile(tiny_source, store, "broken", "unet=int8")
    assert "--allow-low-fidelity" in str(e.value)
    assert not list(store.glob("broken/*")), "nothing may be published when the gate fails"

    # published on request, and then marked low-fidelity for clients
    from model_store import BundleRef
    from runtime.model import load_bundle
    from runtime.server.servicer import model_info

    bundle = _compile(tiny_source, store, "broken", "unet=int8", allow_low_fidelity=True)
    m = Manifest.read(bundle)
    assert m.low_fidelity and m.fidelity["failures"][0].startswith("unet (int8): relative error")
    info = model_info(load_bundle(BundleRef(bundle, m)))
    assert info.fidelity.low_fidelity and info.fidelity.failures[0].startswith("unet (int8)")


def test_vae_falls_back_to_fp32_when_int8_fails_the_gate(tiny_source: Path, tiny_store: Path, tmp_path: Path) -> None:
    # a PSNR floor no int8 component can reach: the VAE (plan entry `int8?`) falls back, the rest is reported
    bundle = _compile(tiny_source, _seeded(tmp_path / "store", tiny_store), "strict", "int8", min_psnr=98,
                      allow_low_fidelity=True)
    m = Manifest.read(bundle)
    for name in ("vae_decoder", "vae_encoder"):
        c = m.components[name]
        assert c.precision == "fp32" and "int8 failed the fidelity gate" in c.quantization["fallback"]
        assert c.op_counts.get("QuantizeLinear", 0) == 0
    assert m.precision["unet"] == "int8" and m.low_fidelity


def test_gpu_only_bundle_is_refused_on_cpu_with_a_clear_error(tiny_bundle: Path) -> None:
    from model_store import ManifestError
    from runtime.model import open_bundle_dir

    m = Manifest.read(tiny_bundle)
    m.components["unet"].gpu_only = True
    m.components["unet"].precision = "fp16"
    with pytest.raises(ManifestError, match=r"unet \(fp16\) cannot run on the CPU; serve it with `kiln serve "
                                            r"--device cuda` \(onnxruntime-gpu\)"):
        open_bundle_dir(tiny_bundle, m)


@pytest.mark.parametrize("precision", ["int8", "nf4", "fp16"])
def test_sdxl_bundles(precision: str, tiny_sdxl_source: Path, tiny_sdxl_store: Path, tmp_path: Path) -> None:
    """SDXL through the quantize stage: the second text encoder follows the first's plan (and is gated like it),
    the UNet's added-conditioning inputs are calibrated and fed, SDXL's VAE stays fp32 in an fp16 plan (it
    overflows fp16; diffusers' SDXL pipelines upcast it), and `kiln serve` generates with the result."""
    # 4-bit blocks of the tiny random text encoders drift ~0.27 relative (above the 0.25 default)
    bundle = _compile(tiny_sdxl_source, _seeded(tmp_path / "store", tiny_sdxl_store), f"sdxl-{precision}",
                      precision, max_rel_error=0.5)
    m = Manifest.read(bundle)
    want = {"int8": {"text_encoder": "int8", "text_encoder_2": "int8", "unet": "int8"},
            "nf4": {"text_encoder": "nf4", "text_encoder_2": "nf4", "unet": "nf4"},
            "fp16": {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32",
                     "vae_encoder": "fp32"}}[precision]
    assert {c: m.precision[c] for c in want} == want
    assert "rel_error" in m.components["text_encoder_2"].fidelity
    if precision == "int8":
        assert m.components["text_encoder_2"].quantization["embeddings"]["converted"]
        assert m.components["unet"].op_counts["DequantizeLinear"] > 0
    assert m.fidelity["passed"]
    _generates(bundle, tmp_path)
