"""`kiln compile --lora` on SDXL: kohya files (`lora_unet_*`, `lora_te1_*`, `lora_te2_*`, LoCon convolutions,
alpha) and diffusers / PEFT files, fused into the UNet and both text encoders, against diffusers' SDXL pipeline
loading the same files; LoRAs of the other family refused by key (per-request LoRA on SDXL:
tests/compiler/test_sdxl_lora_inputs.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from compiler.compile import compile_model
from compiler.config import CompileConfig
from compiler.source.errors import SourceError
from compiler.source.options import LoraSpec, SourceOptions
from model_store import Manifest, Store, sha256_file
from tests.compiler.byom import assert_images_match, diffusers_image, diffusers_pipe, kiln_image
from tests.lora_files import LOCON_TARGETS, UNET_TARGETS, write_kohya, write_peft

PROMPT = "a small green square, on the left"


@pytest.fixture(scope="module")
def sdxl_loras(tiny_sdxl_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sdxl-loras")
    (d / "peft").mkdir()
    # rank 4, alpha 2 (not the rank: alpha must be honoured), LoCon convolutions included
    return {"kohya": write_kohya(tiny_sdxl_source, d / "xl-style.safetensors", seed=1, rank=4, alpha=2.0,
                                 unet_targets=UNET_TARGETS + LOCON_TARGETS),
            "peft": write_peft(tiny_sdxl_source, d / "peft", seed=2, rank=4)}


def test_kohya_and_peft_sdxl_loras_match_diffusers_loading_them(tiny_sdxl_source: Path, tiny_sdxl_store: Path,
                                                                 sdxl_loras: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    kohya, peft = sdxl_loras["kohya"], sdxl_loras["peft"]
    names = load_file(str(kohya))
    assert any(k.startswith("lora_te1_text_model_encoder_") for k in names)  # as SDXL kohya files name them
    assert any(k.startswith("lora_te2_text_model_encoder_") for k in names)
    assert any(k.endswith("conv1.lora_down.weight") for k in names)
    assert any(k.startswith("text_encoder_2.") for k in load_file(str(peft)))
    bundle = compile_model(tiny_sdxl_source, tmp_path, CompileConfig(name="xl-styled"), progress=False,
                           options=SourceOptions(loras=[LoraSpec(str(kohya), 0.8), LoraSpec(str(peft), -0.5)])).path
    m = Manifest.read(bundle)
    assert [(lo["name"], lo["scale"], lo["sha256"]) for lo in m.source["loras"]] == \
        [("xl-style", 0.8, sha256_file(kohya)), ("pytorch_lora_weights", -0.5, sha256_file(peft))]
    for entry in m.source["loras"]:
        assert set(entry["layers"]) == {"unet", "text_encoder", "text_encoder_2"} and entry["rank"] == 4
    assert m.source["loras"][0]["convolutions"] > 0
    assert m.model["architecture"] == "sdxl"

    pipe = diffusers_pipe(tiny_sdxl_source)
    pipe.load_lora_weights(str(kohya), adapter_name="a")
    pipe.load_lora_weights(str(peft), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.8, -0.5])  # unfused: diffusers applies the pairs at run time
    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)
    got = kiln_image(bundle, latents, PROMPT)
    assert_images_match(got, diffusers_image(pipe, latents, PROMPT))
    base = kiln_image(Store(tiny_sdxl_store).latest("tiny-sdxl").path, latents, PROMPT)
    assert np.abs(got.astype(int) - base.astype(int)).mean() > 2  # the LoRAs changed the picture


def test_second_text_encoder_pairs_are_fused(tiny_sdxl_source: Path, sdxl_loras: dict[str, Path]) -> None:
    """The second text encoder's weights change by exactly scale x up @ down (alpha/rank folded in)."""
    import torch

    from compiler.source import lora
    from compiler.source.prepare import _load_folder

    pipe = _load_folder(tiny_sdxl_source)
    before = pipe.text_encoder_2.state_dict()["text_model.encoder.layers.1.self_attn.v_proj.weight"].clone()
    lora.fuse(pipe, [LoraSpec(str(sdxl_loras["kohya"]), 0.8)])
    after = pipe.text_encoder_2.state_dict()["text_model.encoder.layers.1.self_attn.v_proj.weight"]
    state = load_file(str(sdxl_loras["kohya"]))
    key = "lora_te2_text_model_encoder_layers_1_self_attn_v_proj"
    down, up, alpha = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"], state[f"{key}.alpha"]
    want = before + 0.8 * (alpha / down.shape[0]) * (up @ down)
    assert torch.allclose(after, want, atol=1e-6)


def test_loras_of_the_other_family_are_refused_by_key(tiny_source: Path, tiny_sdxl_source: Path,
                                                      sdxl_loras: dict[str, Path], tmp_path: Path) -> None:
    sd1 = write_kohya(tiny_source, tmp_path / "sd1.safetensors", seed=3)
    store = tmp_path / "store"
    with pytest.raises(SourceError, match=r"sd1\.safetensors: LoRA key .* names no layer of this model's unet"):
        compile_model(tiny_sdxl_source, store, CompileConfig(name="bad"), progress=False,
                      options=SourceOptions(loras=[LoraSpec(str(sd1))]))
    with pytest.raises(SourceError, match=r"LoRA key text_encoder_2\..* is for a model part this model does not "
                                          r"have \(it has unet, text_encoder\): a LoRA for another architecture"):
        compile_model(tiny_source, store, CompileConfig(name="bad"), progress=False,
                      options=SourceOptions(loras=[LoraSpec(str(sdxl_loras["kohya"]))]))
    assert Store(store).versions("bad") == []
