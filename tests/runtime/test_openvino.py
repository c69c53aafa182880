"""The OpenVINO engine: the same tiny bundle run by OpenVINO agrees with ONNX Runtime, per component and per image."""

from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from model_store import BundleRef, Manifest
from proto.kiln.v1 import kiln_pb2 as pb
from runtime import sessions_openvino
from runtime.model import load_bundle, load_store, open_bundle_dir
from runtime.pipeline import Pipeline
from runtime.sessions import OrtSession
from runtime.sessions_openvino import OpenVinoConfig, OpenVinoMissing, OpenVinoSession, UnreadableGraph
from runtime.validate import validate

F32_TOL = 1e-4
"""OpenVINO f32 vs ONNX Runtime, max |diff| relative to the output's largest magnitude (measured ~3e-6)."""


@pytest.fixture(scope="module")
def openvino():  # type: ignore[no-untyped-def]
    return pytest.importorskip("openvino")


def feeds(m: Manifest) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    hidden = m.model["text_hidden_size"]
    return {
        "text_encoder": {"input_ids": rng.integers(0, 1000, (2, 77)).astype(np.int64)},
        "unet": {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
                 "timestep": np.array([999.0, 500.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, hidden), dtype=np.float32)},
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32)},
        "vae_encoder": {"sample": rng.standard_normal((1, 3, 64, 64), dtype=np.float32)},
    }


def params(model, **fields):  # type: ignore[no-untyped-def]
    request = pb.GenerateRequest(model="tiny", prompt="a red circle", **fields)
    return validate(request, model.manifest.defaults, model.manifest.limits)


def test_f32_session_matches_onnxruntime_on_every_component(openvino, tiny_bundle: Path) -> None:  # type: ignore[no-untyped-def]
    m = Manifest.read(tiny_bundle)
    # the fused fp32 bundle: com.microsoft Attention/MultiHeadAttention/SkipLayerNormalization/QuickGelu/Gelu
    assert m.components["unet"].op_counts.get("MultiHeadAttention", 0) > 0
    inputs = feeds(m)
    for name, c in m.components.items():
        ref = OrtSession(name, tiny_bundle / c.file).run(inputs[name])
        ov = OpenVinoSession(name, tiny_bundle / c.file, OpenVinoConfig(precision="f32"))
        assert ov.inference_precision == "f32"
        assert ov.input_names == tuple(c.inputs) and ov.output_names == tuple(c.outputs)
        got = ov.run(inputs[name])
        for k, want in ref.items():
            assert got[k].dtype == want.dtype and got[k].shape == want.shape
            err = np.abs(got[k] - want).max() / np.abs(want).max()
            assert err < F32_TOL, f"{name}.{k}: relative max |diff| {err:.2e} >= {F32_TOL}"


def test_bf16_session_runs_bf16_and_stays_close(openvino, tiny_bundle: Path) -> None:  # type: ignore[no-untyped-def]
    m = Manifest.read(tiny_bundle)
    x = feeds(m)["unet"]
    ref = OrtSession("unet", tiny_bundle / "unet.onnx").run(x)["out_sample"]
    ov = OpenVinoSession("unet", tiny_bundle / "unet.onnx", OpenVinoConfig(precision="bf16"))
    if ov.inference_precision != "bf16":
        pytest.skip("this CPU has no bf16: OpenVINO runs f32")
    err = np.abs(ov.run(x)["out_sample"] - ref).max() / np.abs(ref).max()
    assert 1e-4 < err < 0.1  # really bf16 (not f32-exact), yet close


def test_pipeline_on_openvino_gives_onnxruntime_image(openvino, tiny_bundle: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    ov_model = load_bundle(BundleRef(tiny_bundle, Manifest.read(tiny_bundle)), engine="openvino",
                           openvino=OpenVinoConfig(precision="f32"))
    assert all(isinstance(s, OpenVinoSession) for s in ov_model.sessions.values())
    p = params(tiny_model, seed=3, steps=8, sampler="dpmpp_2m_karras", guidance_scale=5.0)
    want, _ = Pipeline(tiny_model).run(p)
    got, gen = Pipeline(ov_model).run(p)
    diff = np.abs(got[0].astype(int) - want[0].astype(int))
    assert want[0].std() > 5  # a real picture, not a flat one that any engine would match
    assert diff.max() <= 2, f"uint8 image differs by up to {diff.max()}"
    assert gen.timings["denoise"] > 0


def test_concurrent_runs_use_separate_requests(openvino, tiny_bundle: Path) -> None:  # type: ignore[no-untyped-def]
    s = OpenVinoSession("vae_decoder", tiny_bundle / "vae_decoder.onnx", OpenVinoConfig(precision="f32", threads=1))
    assert int(s._compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    rng = np.random.default_rng(1)
    zs = [rng.standard_normal((1, 4, 8, 8), dtype=np.float32) for _ in range(4)]
    want = [s.run({"latent_sample": z})["sample"] for z in zs]
    got: list[np.ndarray | None] = [None] * 4

    def work(i: int) -> None:
        for _ in range(3):
            got[i] = s.run({"latent_sample": zs[i]})["sample"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(g, w)


def _unreadable_unet(path: Path) -> None:
    """A graph holding com.microsoft.MatMulBnb4 (what nf4 bundles carry), which OpenVINO has no rule for."""
    import onnx
    from onnx import TensorProto, helper

    k, n, block = 32, 16, 32
    node = helper.make_node("MatMulBnb4", ["sample", "w", "absmax"], ["out_sample"], domain="com.microsoft",
                            K=k, N=n, block_size=block, quant_type=1)
    graph = helper.make_graph(
        [node], "unreadable",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor("w", TensorProto.UINT8, [k * n // 2], np.zeros(k * n // 2, np.uint8)),
         helper.make_tensor("absmax", TensorProto.FLOAT, [k * n // block], np.ones(k * n // block, np.float32))],
    )
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, path)


def test_unreadable_graph_names_component_and_op(openvino, tiny_bundle: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    _unreadable_unet(bundle / "unet.onnx")
    with pytest.raises(UnreadableGraph, match=r"component unet \(unet\.onnx\).*com\.microsoft\.MatMulBnb4"):
        open_bundle_dir(bundle, Manifest.read(bundle), engine="openvino")
    # with static shapes too: the model is read (and refused) at load, before any shape is compiled
    with pytest.raises(UnreadableGraph, match=r"component unet \(unet\.onnx\).*com\.microsoft\.MatMulBnb4"):
        open_bundle_dir(bundle, Manifest.read(bundle), engine="openvino", openvino=OpenVinoConfig(static_shapes=True))
    # ONNX Runtime reads it: the refusal is OpenVINO's, not a broken file
    OrtSession("unet", bundle / "unet.onnx")


def test_store_loads_on_openvino_and_rejects_unknown_engines(openvino, tiny_store: Path) -> None:  # type: ignore[no-untyped-def]
    models = load_store(tiny_store, engine="openvino", openvino=OpenVinoConfig(precision="f32"))
    assert isinstance(models["tiny"].sessions["unet"], OpenVinoSession)
    with pytest.raises(ValueError, match=r"engine='tensorrt' must be one of onnxruntime, openvino"):
        load_store(tiny_store, engine="tensorrt")
    with pytest.raises(ValueError, match=r"precision='fp16' must be one of default, f32, bf16"):
        OpenVinoConfig(precision="fp16")


def test_missing_openvino_names_the_extra(tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    monkeypatch.setattr(sessions_openvino, "_core", None)
    with pytest.raises(OpenVinoMissing, match=r"kiln\[openvino\]"):
        load_store(tiny_store, engine="openvino")
    # the default engine does not need it
    assert "tiny" in load_store(tiny_store)


def test_sdxl_pipeline_on_openvino_gives_onnxruntime_image(openvino, tiny_sdxl_store: Path,  # type: ignore[no-untyped-def]
                                                          tiny_sdxl_model) -> None:
    """SDXL's two text encoders (two outputs on the second) and its UNet's added-conditioning inputs."""
    from model_store import Store

    ov_model = load_bundle(Store(tiny_sdxl_store).latest("tiny-sdxl"), engine="openvino",
                           openvino=OpenVinoConfig(precision="f32"))
    assert set(ov_model.sessions) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert ov_model.sessions["text_encoder_2"].output_names == ("hidden_states", "text_embeds")
    m = tiny_sdxl_model.manifest
    request = pb.GenerateRequest(model="tiny-sdxl", prompt="a red circle", seed=3, steps=6, sampler="euler_a",
                                 guidance_scale=5.0, size_conditioning=pb.SizeConditioning(original_width=1024))
    p = validate(request, m.defaults, m.limits, sdxl=True)
    want, _ = Pipeline(tiny_sdxl_model).run(p)
    got, _ = Pipeline(ov_model).run(p)
    diff = np.abs(got[0].astype(int) - want[0].astype(int))
    assert want[0].std() > 5
    assert diff.max() <= 2, f"uint8 image differs by up to {diff.max()}"


def test_a_cache_dir_keeps_compiled_models_and_a_second_open_reads_them(openvino, tiny_bundle: Path,  # type: ignore[no-untyped-def]
                                                                       tmp_path: Path) -> None:
    m = Manifest.read(tiny_bundle)
    config = OpenVinoConfig(precision="f32", cache_dir=str(tmp_path / "ov"))
    inputs = feeds(m)["unet"]
    first = OpenVinoSession("unet", tiny_bundle / m.components["unet"].file, config)
    assert first.graph_cache == "written" and list((tmp_path / "ov").glob("*.blob"))
    second = OpenVinoSession("unet", tiny_bundle / m.components["unet"].file, config)
    assert second.graph_cache == "hit"
    for k, want in first.run(inputs).items():
        np.testing.assert_array_equal(second.run(inputs)[k], want)
    assert OpenVinoSession("unet", tiny_bundle / m.components["unet"].file, OpenVinoConfig()).graph_cache == "off"


def test_static_shapes_compile_per_shape_and_match_dynamic(openvino, tiny_bundle: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """static_shapes: one compiled model per input-shape signature, made on the first call that brings it (and
    cached in CACHE_DIR), with the dynamic model's outputs; the pipeline's image is ONNX Runtime's."""
    m = Manifest.read(tiny_bundle)
    path = tiny_bundle / m.components["unet"].file
    dynamic = OpenVinoSession("unet", path, OpenVinoConfig(precision="f32"))
    config = OpenVinoConfig(precision="f32", cache_dir=str(tmp_path / "ov"), static_shapes=True)
    static = OpenVinoSession("unet", path, config)
    assert static.static_shapes == [] and static.graph_cache == "pending" and static.inference_precision == ""
    assert static.input_names == dynamic.input_names and static.output_names == dynamic.output_names
    two = feeds(m)["unet"]
    one = {k: v[:1] for k, v in two.items()}
    for inputs in (two, one, two):
        for k, want in dynamic.run(inputs).items():
            np.testing.assert_allclose(static.run(inputs)[k], want, rtol=0, atol=1e-5)
    assert sorted(s["sample"] for s in static.static_shapes) == [(1, 4, 8, 8), (2, 4, 8, 8)]  # two, not three
    assert static.graph_cache == "written" and static.inference_precision == "f32"
    again = OpenVinoSession("unet", path, config)
    again.run(one)
    assert again.graph_cache == "hit"  # the shape's compiled model came from CACHE_DIR

    model = load_bundle(BundleRef(tiny_bundle, m), engine="openvino",
                        openvino=OpenVinoConfig(precision="f32", static_shapes=True))
    ort = load_bundle(BundleRef(tiny_bundle, m))
    p = params(ort, seed=3, steps=4, guidance_scale=5.0, guidance_end=0.5)  # batch-2 and batch-1 UNet calls
    got, want = Pipeline(model).run(p)[0][0], Pipeline(ort).run(p)[0][0]
    assert want.std() > 5 and np.abs(got.astype(int) - want.astype(int)).max() <= 2
    assert {s["sample"][0] for s in model.sessions["unet"].static_shapes} == {1, 2}
