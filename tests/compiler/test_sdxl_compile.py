"""Compiling the SDXL design (tiny size): the bundle's components and their contracts, the manifest, reuse of
exports, and clear errors for an incomplete SDXL folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest

from compiler.compile import compile_model
from compiler.config import CompileConfig
from model_store import Store


def test_sdxl_bundle_contract(tiny_sdxl_store: Path) -> None:
    ref = Store(tiny_sdxl_store).latest("tiny-sdxl")
    m = ref.manifest
    assert set(m.components) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert m.components["text_encoder"].outputs == ["hidden_states"]
    assert m.components["text_encoder_2"].outputs == ["hidden_states", "text_embeds"]
    assert m.components["unet"].inputs == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    for name, c in m.components.items():  # every output checked against PyTorch
        assert c.parity["max_abs_diff"] <= c.parity["threshold"], name
    assert m.model["architecture"] == "sdxl" and m.model["text_hidden_size"] == 64
    assert m.model["sdxl"] == {"pooled_dim": 32, "force_zeros_for_empty_prompt": True}
    assert m.model["vae_scaling_factor"] == pytest.approx(0.13025) and m.model["vae_force_upcast"]
    second = m.tokenizer["second"]
    assert second["file"] == "tokenizer_2/tokenizer.json" and (ref.path / second["file"]).exists()
    assert second["pad_id"] == 0 and m.tokenizer["pad_id"] == 49407  # "!" vs the end token, as the configs say
    graph = onnx.load(str(ref.path / "unet.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["text_embeds"] == ["batch", 32] and dims["time_ids"] == ["batch", 6]


def test_sdxl_recompile_reuses_every_export(tiny_sdxl_source: Path, tiny_sdxl_store: Path, tmp_path: Path) -> None:
    store = shutil.copytree(tiny_sdxl_store, tmp_path / "store")
    first = Store(store).latest("tiny-sdxl").manifest
    again = compile_model(tiny_sdxl_source, store, CompileConfig(name="tiny-sdxl-again"), progress=False).manifest
    assert again.source["reused_exports_from"] == f"tiny-sdxl/{first.version}"
    for name, c in again.components.items():
        assert c.parity == {**first.components[name].parity, "threshold": c.parity["threshold"]}, name


def test_incomplete_sdxl_folder_is_refused(tiny_sdxl_source: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_sdxl_source, tmp_path / "broken")
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="SDXL design .* lacks tokenizer_2"):
        compile_model(broken, tmp_path / "store", CompileConfig(name="broken"), progress=False)
    assert not (tmp_path / "store" / "broken").exists() or not any((tmp_path / "store" / "broken").iterdir())
