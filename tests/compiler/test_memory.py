"""What keeps a compile's memory down, on the tiny model: graphs rewritten with their weights left on disk (the
same result as in memory), activation ranges calibrated without ONNX Runtime's copies of the weights (the same
ranges as its calibrator), and each stage's peak RSS recorded in the manifest."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.external_data_helper import uses_external_data

from compiler.export import COMPONENTS, export_component
from compiler.passes import fusions
from compiler.source import load_source
from model_store import Manifest
from model_store.onnx_files import load_graph, save_model


def _external(path: Path) -> set[str]:
    return {t.name for t in load_graph(path).graph.initializer if uses_external_data(t)}


def _feed(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if name == "unet":
        return {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
                "timestep": np.array([999.0, 10.0], np.float32),
                "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    return {"input_ids": rng.integers(0, 1000, (2, 77)).astype(np.int64)}


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("name", ["unet", "text_encoder"])
def test_fusing_with_weights_on_disk_gives_the_in_memory_graph(tiny_source: Path, tmp_path: Path, name: str) -> None:
    """The compile fuses a graph whose weights stay in its data file: the same nodes, weights and outputs as
    fusing the loaded graph, and no weight of the export is ever read into the graph."""
    path = export_component(COMPONENTS[name], load_source(tiny_source), tmp_path / f"{name}.onnx", 17,
                            external=True)
    on_disk = _external(path)
    assert len(on_disk) > 10  # the passes below really have weights to leave alone

    in_memory = fusions.apply(onnx.load(str(path)), name)
    graph = load_graph(path)
    with contextlib.chdir(tmp_path):
        lean = fusions.apply(graph, name)
    loaded = {t.name for t in lean.graph.initializer if t.name in on_disk and not uses_external_data(t)}
    assert loaded == set()

    assert fusions.op_counts(lean) == fusions.op_counts(in_memory)
    if name == "unet":
        assert fusions.op_counts(lean)["Attention"] == 4
    assert [n.SerializeToString() for n in lean.graph.node] == [n.SerializeToString() for n in in_memory.graph.node]
    mem_path = tmp_path / "mem" / f"{name}.onnx"
    mem_path.parent.mkdir()
    save_model(in_memory, mem_path, external=True)
    assert save_model(lean, path, external=True, base_dir=tmp_path) == [path, path.with_name(path.name + ".data")]
    a, b = onnx.load(str(mem_path)), onnx.load(str(path))
    weights = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    np.testing.assert_array_equal(_run(mem_path, _feed(name)), _run(path, _feed(name)))


def test_save_model_copies_weights_from_disk_into_either_layout(tiny_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "src" / "unet.onnx"
    src.parent.mkdir()
    save_model(onnx.load(str(tiny_bundle / "unet.onnx")), src, external=True)
    feed = _feed("unet")
    want = _run(tiny_bundle / "unet.onnx", feed)

    with pytest.raises(ValueError, match=r"tensors of the graph for out.onnx are stored externally .* base_dir"):
        save_model(load_graph(src), tmp_path / "out.onnx")
    # inline when the weights fit: the graph loads them
    assert save_model(load_graph(src), tmp_path / "inline.onnx", base_dir=src.parent) == [tmp_path / "inline.onnx"]
    assert _external(tmp_path / "inline.onnx") == set()
    np.testing.assert_array_equal(_run(tmp_path / "inline.onnx", feed), want)
    # over its own data file: written beside it, then renamed over it
    files = save_model(load_graph(src), src, external=True, base_dir=src.parent)
    assert sorted(p.name for p in src.parent.iterdir()) == ["unet.onnx", "unet.onnx.data"] == [p.name for p in files]
    np.testing.assert_array_equal(_run(src, feed), want)

    graph = load_graph(src)
    tensor = next(t for t in graph.graph.initializer if uses_external_data(t))
    next(e for e in tensor.external_data if e.key == "location").value = "../unet.onnx.data"
    with pytest.raises(ValueError, match=r"location '../unet.onnx.data' is not a file name"):
        save_model(graph, tmp_path / "bad.onnx", base_dir=src.parent)


def test_activation_ranges_are_onnx_runtime_calibrators(tiny_source: Path, tmp_path: Path) -> None:
    """The ranges handed to ONNX Runtime's static quantizer are the ones its own MinMax calibrator finds, feed by
    feed, over the same typed graph: every tensor, bit for bit, the shape and dtype included."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from quantize import int8
    from quantize.calibration import activation_ranges

    path = export_component(COMPONENTS["unet"], load_source(tiny_source), tmp_path / "unet.onnx", 17, external=True)
    rng = np.random.default_rng(1)
    feeds = [{**_feed("unet"), "sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32) * (i + 1)}
             for i in range(3)]
    op_types = ["Conv", "MatMul", "Gemm"]
    with int8._typed_copy(path) as typed:
        ours = activation_ranges(typed, feeds, op_types)
        calibrator = create_calibrator(typed, op_types, augmented_model_path=str(tmp_path / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)

        class One:
            def __init__(self, feed: dict[str, np.ndarray]) -> None:
                self.feeds = iter([feed])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.feeds, None)

        for feed in feeds:
            calibrator.collect_data(One(feed))
        theirs = calibrator.compute_data()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # helpers removed
    assert len(theirs.data) > 50 and set(ours.keys()) == set(theirs.keys())
    for name in theirs:
        for got, want in zip(ours[name].range_value, theirs[name].range_value, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_compile_records_each_stage_and_never_loads_the_weights_it_fuses(tiny_source: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage's seconds and peak RSS are in the manifest; the graphs the optimize stage writes hold none of
    the exported weights in memory (only what the passes made, e.g. packed Q/K/V)."""
    import compiler.compile as compile_module
    from compiler.compile import compile_model
    from compiler.config import CompileConfig

    real = compile_module.save_model
    checked = []

    def save_model_checked(graph, out, *args, **kwargs):  # type: ignore[no-untyped-def]
        on_disk = _external(out)  # the export, still in place
        assert on_disk, f"{out.name} was exported without a data file"
        loaded = [t.name for t in graph.graph.initializer if t.name in on_disk and not uses_external_data(t)]
        assert loaded == [], f"{out.name}: the passes loaded {loaded[:3]}"
        checked.append(out.name)
        return real(graph, out, *args, **kwargs)

    monkeypatch.setattr(compile_module, "save_model", save_model_checked)
    m = compile_model(tiny_source, tmp_path, CompileConfig(name="stats", reuse_exports=False), progress=False).manifest
    assert sorted(checked) == sorted(f"{c}.onnx" for c in COMPONENTS)
    assert m.components["unet"].op_counts["Attention"] == 4  # the fusions did run on those graphs
    assert m.components["text_encoder"].external_data is None  # and the bundle's layout is unchanged

    stages = m.compile_stats["stages"]
    names = [s["stage"] for s in stages]
    for c in COMPONENTS:
        assert names.index(f"export {c}") < names.index(f"optimize {c}") < names.index(f"verify {c}")
    assert names[0] == "hash source model" and names[-1] == "tokenizer and manifest"
    for s in stages:
        assert s["seconds"] > 0 and isinstance(s["peak_rss_bytes"], int), s
        assert 50 << 20 < s["peak_rss_bytes"] < 64 << 30, s  # a Python process with numpy, and below any machine
    assert m.compile_stats["peak_rss_bytes"] == max(s["peak_rss_bytes"] for s in stages)
    assert Manifest.read(tmp_path / "stats" / m.version).compile_stats == m.compile_stats
    # a manifest from before Kiln recorded it still reads
    old = {k: v for k, v in json.loads(m.to_json()).items() if k != "compile_stats"}
    assert Manifest.from_dict(old).compile_stats == {}


def test_quantizing_a_component_holds_no_fp32_session(tiny_source: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """While a component is quantized (its weights loaded by the quantizer, and a calibration session over them for
    static int8), no session over an fp32 graph is open: only the gate sessions of components quantized before."""
    import gc

    from compiler.compile import compile_model
    from compiler.config import CompileConfig
    from quantize import stage
    from quantize.config import QuantizeConfig
    from runtime.sessions import OrtSession

    real = stage._quantize
    live: dict[str, list[str]] = {}

    gc.collect()  # sessions other tests of this process still hold are not the compile's
    before = {id(o) for o in gc.get_objects() if isinstance(o, OrtSession)}

    def quantize_checked(component, *args, **kwargs):  # type: ignore[no-untyped-def]
        gc.collect()
        live[component] = sorted(o.name for o in gc.get_objects() if isinstance(o, OrtSession) and id(o) not in before)
        return real(component, *args, **kwargs)

    monkeypatch.setattr(stage, "_quantize", quantize_checked)
    config = CompileConfig(name="q", precision="int8", quantize=QuantizeConfig(
        calibration_prompts=1, fidelity_prompts=1, allow_low_fidelity=True))
    m = compile_model(tiny_source, tmp_path, config, progress=False).manifest
    assert live == {"text_encoder": [], "unet": ["text_encoder"], "vae_decoder": ["text_encoder", "unet"],
                    "vae_encoder": sorted(c for c in ("text_encoder", "unet", "vae_decoder")
                                          if m.components[c].precision == "int8")}
    stages = [s["stage"] for s in m.compile_stats["stages"]]
    assert stages.index("quantize unet to int8") < stages.index("fidelity unet") < stages.index("fidelity of the bundle")
