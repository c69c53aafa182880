"""SDXL single-file checkpoints (Stability's SGM layout: `conditioner.embedders.0/1.*`): detection from names
and shapes (real size from the shipped configs, no weights), conversion by diffusers' converters, parity with the
folder's bundle and with diffusers' own single-file loading, and clear refusals (the refiner, a missing encoder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from compiler.compile import compile_model
from compiler.config import CompileConfig
from compiler.source.errors import SourceError
from compiler.source.options import SourceOptions
from compiler.source.single_file import CONFIGS, detect, load_pipeline
from model_store import Manifest, Store, sha256_file
from tests.compiler.byom import assert_images_match, diffusers_image, kiln_image
from tests.compiler.ldm_layout import modules_to_ldm, to_ldm


@pytest.fixture(scope="module")
def sdxl_ldm(tiny_sdxl_source: Path) -> dict[str, torch.Tensor]:
    return to_ldm(tiny_sdxl_source)


@pytest.fixture(scope="module")
def sdxl_ckpt(sdxl_ldm: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sdxl-ckpt") / "tiny-sdxl-model.safetensors"
    save_file(sdxl_ldm, str(path))
    return path


@pytest.fixture(scope="module")
def sdxl_file_bundle(sdxl_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("sdxl-file-store")
    return compile_model(sdxl_ckpt, store, CompileConfig(name="sdxl-file"), progress=False).path


def _outputs(bundle: Path, component: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    s = ort.InferenceSession(str(bundle / f"{component}.onnx"), providers=["CPUExecutionProvider"])
    types = {i.name: np.int64 if i.type == "tensor(int64)" else np.float32 for i in s.get_inputs()}
    return s.run(None, {k: v.astype(types[k]) for k, v in feeds.items()})


def test_sdxl_file_bundle_equals_the_folder_bundle(sdxl_file_bundle: Path, sdxl_ckpt: Path,
                                                   tiny_sdxl_store: Path) -> None:
    """Every component of the bundle compiled from the file computes what the folder's does, within the
    compile's parity thresholds."""
    m = Manifest.read(sdxl_file_bundle)
    assert (m.source["family"], m.source["file_sha256"]) == ("tiny-sdxl", sha256_file(sdxl_ckpt))
    assert m.source["file_dtypes"] == ["float32"] and m.source["prediction_type"] == "epsilon"
    assert m.model["architecture"] == "sdxl" and m.model["sdxl"]["force_zeros_for_empty_prompt"] is True
    assert set(m.components) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert m.tokenizer["second"]["pad_id"] == 0  # "!": OpenCLIP's padding, from the shipped tokenizer_2 settings
    folder_bundle = Store(tiny_sdxl_store).latest("tiny-sdxl").path
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49408, (1, 77)).astype(np.int64)
    feeds = {
        "text_encoder": {"input_ids": ids},
        "text_encoder_2": {"input_ids": ids},
        "unet": {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
                 "timestep": np.array([10, 500], dtype=np.int64),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 64), dtype=np.float32),
                 "text_embeds": rng.standard_normal((2, 32), dtype=np.float32),
                 "time_ids": np.array([[64, 64, 0, 0, 64, 64]] * 2, dtype=np.float32)},
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32)},
    }
    for name, feed in feeds.items():
        got, want = _outputs(sdxl_file_bundle, name, feed), _outputs(folder_bundle, name, feed)
        for g, w in zip(got, want, strict=True):
            assert np.abs(g - w).max() <= m.components[name].parity["threshold"], name


def test_sdxl_file_image_matches_diffusers_loading_the_same_file(sdxl_file_bundle: Path, sdxl_ckpt: Path,
                                                                 tiny_sdxl_source: Path) -> None:
    """diffusers' own from_single_file for the UNet, VAE and first text encoder. Its second text encoder comes
    from the folder: diffusers picks the checkpoint's CLIP for it when both encoders have the same width (only
    at tiny size: 32 and 32; real SDXL has 768 and 1280) and leaves the projection unloaded."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    pipe = StableDiffusionXLPipeline.from_single_file(
        str(sdxl_ckpt), config=str(tiny_sdxl_source), local_files_only=True, torch_dtype=torch.float32,
        add_watermarker=False,
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(tiny_sdxl_source / "text_encoder_2"))
    pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
    prompt = "a red circle on a blue background"
    assert_images_match(kiln_image(sdxl_file_bundle, latents, prompt), diffusers_image(pipe, latents, prompt))


def test_fp16_sdxl_file_loads_every_part_upcast(sdxl_ldm: dict[str, torch.Tensor], tiny_sdxl_source: Path,
                                                tmp_path: Path) -> None:
    """Shared SDXL files are fp16: every part of the pipeline holds the file's values upcast to fp32."""
    from tests.compiler.byom import diffusers_pipe

    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in sdxl_ldm.items()}, str(path))
    pipe, info, _ = load_pipeline(path, SourceOptions())
    assert info["file_dtypes"] == ["float16"] and info["family"] == "tiny-sdxl"
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    want = diffusers_pipe(tiny_sdxl_source)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got = getattr(pipe, part).state_dict()
        for k, v in getattr(want, part).state_dict().items():
            assert got[k].dtype == torch.float32 and torch.equal(got[k], v.half().float()), (part, k)


def _real_size_shapes(config: str, refiner: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a real-size SGM checkpoint as meta tensors (shapes from the shipped configs, no data)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config(part: str) -> CLIPTextConfig:
        cfg = json.loads((CONFIGS / config / part / "config.json").read_text())
        return CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"})

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / config / "unet/config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((CONFIGS / config / "vae/config.json").read_text()))
        shapes = modules_to_ldm(unet, vae, CLIPTextModel(text_config("text_encoder")),
                                CLIPTextModelWithProjection(text_config("text_encoder_2")))
    if refiner:  # the refiner's one text encoder is OpenCLIP bigG, as embedder 0
        shapes = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in shapes.items()
                  if not k.startswith("conditioner.embedders.0.")}
    return shapes


def test_real_size_sdxl_is_detected_from_its_shapes(tmp_path: Path) -> None:
    shapes = _real_size_shapes("sdxl")
    assert shapes["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert shapes["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    family, prediction, origin = detect(tmp_path / "sd_xl_base_1.0.safetensors", shapes, SourceOptions())
    assert (family.name, prediction, origin) == ("sdxl", "epsilon", "family sdxl")
    # v-prediction SDXL fine-tunes say so with the flag (or NAME.yaml)
    assert detect(tmp_path / "x.safetensors", shapes, SourceOptions(prediction_type="v_prediction"))[1] == \
        "v_prediction"
    assert detect(tmp_path / "t.safetensors", _real_size_shapes("tiny-sdxl"), SourceOptions())[0].name == "tiny-sdxl"


def test_real_size_refiner_and_incomplete_sdxl_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "sd_xl_refiner_1.0.safetensors"
    with pytest.raises(SourceError, match=r"an SDXL refiner checkpoint .*conditioner\.embedders\.0\.model\.\*"):
        detect(path, _real_size_shapes("sdxl", refiner=True), SourceOptions())
    shapes = {k: v for k, v in _real_size_shapes("sdxl").items() if not k.startswith("conditioner.embedders.1.")}
    with pytest.raises(SourceError, match=r"without its second text encoder \(no conditioner\.embedders\.1\.model"):
        detect(path, shapes, SourceOptions())
    # SDXL text encoders with another added-conditioning width (the refiner's 2560) fit no family
    shapes = _real_size_shapes("sdxl")
    shapes["model.diffusion_model.label_emb.0.0.weight"] = torch.empty(1280, 2560, device="meta")
    with pytest.raises(SourceError, match=r"added-conditioning width 2560 and SDXL's two text encoders, which fits "
                                          r"none of the families"):
        detect(path, shapes, SourceOptions())


def test_bad_sdxl_files_are_refused_by_tensor_and_nothing_is_published(sdxl_ldm: dict[str, torch.Tensor],
                                                                        tmp_path: Path) -> None:
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    cases = {
        "wrong shape": ({**sdxl_ldm, key: torch.zeros(96, 16)},
                        r"text_encoder_2 tensor text_model\.encoder\.layers\.0\.self_attn\.k_proj\.weight has shape "
                        r"\[32, 16\], a tiny-sdxl checkpoint has \[32, 32\]"),
        "missing": ({k: v for k, v in sdxl_ldm.items() if k != "conditioner.embedders.1.model.text_projection"},
                    r"text_encoder_2 tensor text_projection\.weight is missing"),
    }
    store = tmp_path / "store"
    for what, (state, message) in cases.items():
        path = tmp_path / f"{what.replace(' ', '-')}.safetensors"
        save_file(state, str(path))
        with pytest.raises(SourceError, match=message) as e:
            compile_model(path, store, CompileConfig(name="bad"), progress=False)
        assert str(path) in str(e.value), what
        assert Store(store).versions("bad") == [], what
