"""Compiling a source again (e.g. at another precision) reuses the fp32 graphs a bundle in the store already
has, when nothing that decides them changed, and never alters the donor's files."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from compiler import compile as compile_mod
from compiler import export as export_mod
from compiler import reuse
from compiler.config import CompileConfig
from model_store import BundleRef, Manifest, Store, sha256_file
from quantize.config import QuantizeConfig

FAST = QuantizeConfig(calibration_prompts=1, fidelity_prompts=1, min_psnr=15.0)


def _compile(source: Path, store: Path, name: str, precision: str = "fp32", **kw: object) -> tuple[Manifest, str]:
    """Compile with the progress lines captured; returns the manifest and the lines."""
    log = io.StringIO()
    real = compile_mod.Progress
    compile_mod.Progress = lambda total, enabled=True: real(total, True, log)  # type: ignore[assignment,misc]
    try:
        config = CompileConfig(name=name, precision=precision, default_steps=4, quantize=FAST, **kw)  # type: ignore[arg-type]
        result = compile_mod.compile_model(source, store, config)
    finally:
        compile_mod.Progress = real  # type: ignore[misc]
    return result.manifest, log.getvalue()


@pytest.fixture(scope="module")
def store_with_fp32(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("reuse-store")
    _compile(tiny_source, store, "tiny")
    return store


def test_second_precision_reuses_fp32_graphs_and_leaves_donor_intact(store_with_fp32: Path, tiny_source: Path) -> None:
    donor = Store(store_with_fp32).latest("tiny")
    m, log = _compile(tiny_source, store_with_fp32, "tiny-int8", "unet=int8")
    assert m.source["reused_exports_from"] == f"tiny/{donor.manifest.version}"
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert f"export {name}: reuse tiny/" in log
    assert "export unet ..." not in log
    bundle = Store(store_with_fp32).latest("tiny-int8")
    # fp32 components: the donor's files, byte for byte, with the donor's parity figures
    for name in ("text_encoder", "vae_decoder"):
        c = m.components[name]
        assert c.precision == "fp32" and c.passes == ["fusions"]
        assert sha256_file(bundle.path / c.file) == sha256_file(donor.path / donor.manifest.components[name].file)
        assert c.parity["max_abs_diff"] == donor.manifest.components[name].parity["max_abs_diff"]
    # the quantized UNet got the precision-specific pass on top and was verified against PyTorch again
    unet = m.components["unet"]
    assert unet.precision == "int8" and unet.passes == ["fusions", "unpack_attention"]
    assert "verify unet" in log
    # the donor is untouched
    BundleRef(donor.path, Manifest.read(donor.path)).check_files(hashes=True)


def test_reused_bundle_generates_what_a_fresh_compile_does(store_with_fp32: Path, tiny_source: Path,
                                                          tmp_path: Path) -> None:
    from quantize.calibration import run_pipeline
    from runtime.model import load_bundle

    reused, log = _compile(tiny_source, store_with_fp32, "tiny-nf4", "unet=nf4")
    assert "reuse" in log
    fresh, log = _compile(tiny_source, tmp_path, "tiny-nf4", "unet=nf4")
    assert "reuse" not in log and "reused_exports_from" not in fresh.source
    images = []
    for store in (store_with_fp32, tmp_path):
        model = load_bundle(Store(store).latest("tiny-nf4"))
        images.append(run_pipeline(model, ["a red circle"], 2, record=False).images[0])
    np.testing.assert_array_equal(images[0], images[1])


@pytest.mark.parametrize("change", ["opset", "export_code", "no_reuse", "other_source"])
def test_no_reuse_when_what_decides_the_graphs_differs(change: str, store_with_fp32: Path, tiny_source: Path,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, kw = tiny_source, {}
    if change == "opset":
        kw["opset"] = 18
    elif change == "export_code":
        monkeypatch.setattr(reuse, "export_code_hash", lambda: "edited")
    elif change == "no_reuse":
        kw["reuse_exports"] = False
    else:
        source = tmp_path / "other"
        shutil.copytree(tiny_source, source)
        (source / "scheduler/scheduler_config.json").write_text(
            (source / "scheduler/scheduler_config.json").read_text().replace("{", '{"note": "changed", ', 1))
    # the compile is stopped at its first export: what is checked is that it exports instead of copying a donor's
    # graphs (the rest of a compile after a fresh export is every other test's)
    exported: list[str] = []

    def first_export(spec, *args, **kwargs):  # type: ignore[no-untyped-def]
        exported.append(spec.name)
        raise _StopAtExport

    monkeypatch.setattr(compile_mod, "export_component", first_export)
    log = io.StringIO()
    real = compile_mod.Progress
    monkeypatch.setattr(compile_mod, "Progress", lambda total, enabled=True: real(total, True, log))
    config = CompileConfig(name=f"tiny-{change.replace('_', '-')}", default_steps=4, quantize=FAST, **kw)  # type: ignore[arg-type]
    with pytest.raises(_StopAtExport):
        compile_mod.compile_model(source, store_with_fp32, config)
    assert exported == ["text_encoder"] and "reuse" not in log.getvalue(), log.getvalue()


class _StopAtExport(Exception):
    """Raised by a stand-in for the exporter, to end a compile once it has decided to export."""


def test_graphs_past_the_size_limit_go_through_reuse_and_4bit(tiny_source: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """SD v1's UNet passes protobuf's 2 GB and is stored with one external data file; shrink the limit so the
    tiny model takes the same path: export, reuse (the copy carries the data file) and nf4 (whose fp32
    convolutions are saved with external data before they are quantized to int8)."""
    import functools

    from model_store import onnx_files
    from quantize import stage

    small = functools.partial(onnx_files.save_model, limit=64 << 10)
    for module in (compile_mod, stage, export_mod):
        monkeypatch.setattr(module, "save_model", small)
    fp32, _ = _compile(tiny_source, tmp_path, "tiny")
    assert fp32.components["unet"].external_data == "unet.onnx.data"
    m, log = _compile(tiny_source, tmp_path, "tiny-nf4", "unet=nf4")
    assert "export unet: reuse" in log and m.precision["unet"] == "nf4"
    assert m.components["unet"].quantization["conv"]["method"]
    bundle = Store(tmp_path).latest("tiny-nf4")
    bundle.check_files(hashes=True)
    from quantize.calibration import run_pipeline
    from runtime.model import load_bundle

    assert run_pipeline(load_bundle(bundle), ["a red circle"], 2, record=False).images[0].shape == (64, 64, 3)
