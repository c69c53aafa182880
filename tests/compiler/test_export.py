"""Source models and ONNX files: deterministic init, the real SD v1 architecture, one external-data file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.source import init_model, load_source
from compiler.source.init import CONFIGS
from model_store.onnx_files import save_model, weight_bytes


def test_init_is_deterministic_per_seed(tiny_source: Path, tmp_path: Path) -> None:
    again = init_model(tmp_path / "again", "tiny", seed=0, progress=False)
    other = init_model(tmp_path / "other", "tiny", seed=1, progress=False)
    h = load_source(tiny_source).content_hash()
    assert load_source(again).content_hash() == h
    assert load_source(other).content_hash() != h
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (again / part).exists()


def test_init_rejects_unknown_arch_and_nonempty_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"arch=.sd-v9. is not one of: sd-turbo, sd-v1, sd-v1-inpainting, sd-v2, sd-v2-768, sdxl, "
                                         "sdxl-inpainting, sdxl-turbo, shapes, tiny, tiny-inpainting"):
        init_model(tmp_path / "x", "sd-v9")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(FileExistsError):
        init_model(tmp_path / "full", "tiny")


def test_sd_v1_configs_build_the_real_architecture() -> None:
    """The shipped SD v1 configs give the 860M-parameter UNet (built on the meta device: no weights)."""
    import json

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CONFIGS / "sd-v1"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((cfg / "unet/config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((cfg / "vae/config.json").read_text()))
        te = json.loads((cfg / "text_encoder/config.json").read_text())
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te.items() if not k.startswith("_")}))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    with torch.device("meta"):  # SD's inpainting UNet: the same, with 5 more input channels in conv_in
        inpaint = UNet2DConditionModel.from_config(json.loads((CONFIGS / "sd-v1-inpainting/unet/config.json").read_text()))
    assert inpaint.config.in_channels == 9 and count(inpaint) == 859_520_964 + 5 * 320 * 3 * 3
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480


def test_sd_v2_configs_build_the_real_architecture() -> None:
    """The shipped SD 2.x configs (`models init --arch sd-v2`, `sd-v2-768`, `sd-turbo`): SD 2's 866M-parameter UNet
    and the 23-layer OpenCLIP-H text encoder (on the meta device: no weights)."""
    import json

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        for name in ("sd-v2", "sd-v2-768", "sd-turbo"):
            unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / name / "unet/config.json").read_text()))
            assert count(unet) == 865_910_724, name
        te = json.loads((CONFIGS / "sd-v2/text_encoder/config.json").read_text())
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te.items() if not k.startswith("_")}))
    assert te["num_hidden_layers"] == 23 and count(text) == 340_387_840
    scheduler = json.loads((CONFIGS / "sd-v2-768/scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    turbo = json.loads((CONFIGS / "sd-turbo/kiln.json").read_text())["defaults"]
    assert turbo == {"steps": 1, "guidance_scale": 0.0, "sampler": "turbo", "size": 512}


def test_sdxl_configs_build_the_real_architecture() -> None:
    """The shipped SDXL configs (`models init --arch sdxl`, `sdxl-turbo`, `sdxl-inpainting`): the 2.57B-parameter
    UNet and the 695M-parameter OpenCLIP bigG text encoder with projection (on the meta device: no weights)."""
    import json

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    read = lambda path: json.loads((CONFIGS / path).read_text())  # noqa: E731
    with torch.device("meta"):
        for name in ("sdxl", "sdxl-turbo"):
            assert count(UNet2DConditionModel.from_config(read(f"{name}/unet/config.json"))) == 2_567_463_684, name
        inpaint = UNet2DConditionModel.from_config(read("sdxl-inpainting/unet/config.json"))
        te = read("sdxl/text_encoder_2/config.json")
        text = CLIPTextModelWithProjection(CLIPTextConfig(**{k: v for k, v in te.items() if not k.startswith("_")}))
    assert count(inpaint) == 2_567_463_684 + 5 * 320 * 3 * 3
    assert count(text) == 694_659_840
    assert read("sdxl-turbo/kiln.json")["defaults"] == {"steps": 1, "guidance_scale": 0.0, "sampler": "turbo",
                                                         "size": 512}
    turbo = read("sdxl-turbo/scheduler/scheduler_config.json")
    assert (turbo["_class_name"], turbo["timestep_spacing"]) == ("EulerAncestralDiscreteScheduler", "trailing")


def test_large_models_get_exactly_one_external_data_file(tiny_bundle: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_bundle / "unet.onnx"))
    assert weight_bytes(model) > 1 << 20
    files = save_model(model, tmp_path / "unet.onnx", limit=1 << 20)
    assert [p.name for p in files] == ["unet.onnx", "unet.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    assert (tmp_path / "unet.onnx").stat().st_size < 1 << 20
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32), "timestep": np.array([5.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32)}
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
    np.testing.assert_array_equal(run(tmp_path / "unet.onnx"), run(tiny_bundle / "unet.onnx"))


def test_external_data_on_request_and_back_to_one_file(tiny_bundle: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_bundle / "vae_decoder.onnx"))
    assert [p.name for p in save_model(model, tmp_path / "vae_decoder.onnx", external=True)] == \
        ["vae_decoder.onnx", "vae_decoder.onnx.data"]
    # saving again inline replaces both files with one: no stale .data left to confuse a loader
    model = onnx.load(str(tiny_bundle / "vae_decoder.onnx"))  # saving with external data moved the weights out
    assert [p.name for p in save_model(model, tmp_path / "vae_decoder.onnx")] == ["vae_decoder.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae_decoder.onnx"]


def test_cli_init_writes_an_inpainting_model(tmp_path: Path) -> None:
    import json

    from tests.conftest import kiln

    out = kiln("models", "init", str(tmp_path / "m"), "--arch", "tiny-inpainting")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "m/unet/config.json").read_text())["in_channels"] == 9
    assert json.loads((tmp_path / "m/model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
