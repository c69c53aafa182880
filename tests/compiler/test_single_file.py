"""Single-file checkpoints in the original layout: detection, conversion, parity with the folder and with
diffusers' own single-file loading, and clear refusals of files that do not fit (nothing published)."""

from __future__ import annotations

import pickle
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
from compiler.source.single_file import detect, load_pipeline
from model_store import Manifest, Store, sha256_file
from tests.compiler.byom import assert_images_match, diffusers_image, kiln_image
from tests.compiler.ldm_layout import to_ldm
from tests.conftest import kiln


@pytest.fixture(scope="module")
def ldm(tiny_source: Path) -> dict[str, torch.Tensor]:
    return to_ldm(tiny_source)


@pytest.fixture(scope="module")
def ckpt(ldm: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-model.safetensors"
    save_file(ldm, str(path))
    return path


@pytest.fixture(scope="module")
def file_bundle(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("file-store")
    return compile_model(ckpt, store, CompileConfig(name="from-file"), progress=False).path


def _outputs(bundle: Path, component: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    s = ort.InferenceSession(str(bundle / f"{component}.onnx"), providers=["CPUExecutionProvider"])
    types = {i.name: np.int64 if i.type == "tensor(int64)" else np.float32 for i in s.get_inputs()}
    return s.run(None, {k: v.astype(types[k]) for k, v in feeds.items()})


def test_single_file_bundle_equals_the_folder_bundle(file_bundle: Path, tiny_bundle: Path, ckpt: Path) -> None:
    m = Manifest.read(file_bundle)
    assert m.source["family"] == "tiny" and m.source["file_sha256"] == sha256_file(ckpt)
    assert m.source["prediction_type"] == "epsilon" and m.source["ema"] is False
    assert m.source["path"] == str(ckpt.resolve())
    assert m.scheduler_config["prediction_type"] == "epsilon"
    # the family's scheduler file, not diffusers' PNDM defaults written out (they would hold for every sampler)
    assert "timestep_spacing" not in m.scheduler_config
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49408, (1, 77)).astype(np.int64)
    feeds = {
        "text_encoder": {"input_ids": ids},
        "unet": {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
                 "timestep": np.array([10, 500], dtype=np.int64),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)},
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32)},
    }
    for name, feed in feeds.items():
        got, want = _outputs(file_bundle, name, feed), _outputs(tiny_bundle, name, feed)
        assert np.abs(got[0] - want[0]).max() <= m.components[name].parity["threshold"], name


def test_image_matches_diffusers_loading_the_same_file(file_bundle: Path, ckpt: Path, tiny_source: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(tiny_source), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
    prompt = "a red circle on a blue background"
    assert_images_match(kiln_image(file_bundle, latents, prompt), diffusers_image(pipe, latents, prompt))


def test_fp16_ckpt_with_ema_weights_loads_the_ema_weights_upcast(ldm: dict[str, torch.Tensor], tiny_source: Path,
                                                                 tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    half = {k: v.half() for k, v in ldm.items()}
    with_ema = {}
    for k, v in half.items():
        if k.startswith("model.diffusion_model."):
            with_ema["model_ema." + "".join(k.split(".")[1:])] = v
            with_ema[k] = torch.zeros_like(v)  # the training weights: not what inference should use
        else:
            with_ema[k] = v
    path = tmp_path / "ema.ckpt"
    torch.save({"state_dict": with_ema, "global_step": 1234, "epoch": 3}, path)  # plain weights: weights_only loads it
    pipe, info, _ = load_pipeline(path, SourceOptions())
    assert info["ema"] is True and info["file_dtypes"] == ["float16"] and info["family"] == "tiny"
    want = UNet2DConditionModel.from_pretrained(tiny_source / "unet").state_dict()
    got = pipe.unet.state_dict()
    for k, v in want.items():
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], v.half().float()), k


def test_inpainting_checkpoint_is_detected_from_its_nine_channels(tmp_path: Path) -> None:
    from compiler.source import init_model

    folder = init_model(tmp_path / "inp", "tiny-inpainting", progress=False)
    path = tmp_path / "inp.safetensors"
    save_file(to_ldm(folder), str(path))
    pipe, info, _ = load_pipeline(path, SourceOptions())
    assert info["family"] == "tiny-inpainting"
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline" and pipe.unet.config.in_channels == 9


def _sd2_shapes() -> dict[str, torch.Tensor]:
    """Just the tensors detection reads, as an SD 2.x file has them (meta tensors: shapes, no data)."""
    meta = torch.device("meta")
    return {"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 4, 3, 3, device=meta),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                torch.empty(320, 1024, device=meta),
            "cond_stage_model.model.token_embedding.weight": torch.empty(49408, 1024, device=meta)}


def test_sd2_prediction_type_comes_from_the_yaml_or_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "v2-model.safetensors"
    with pytest.raises(SourceError, match=r"v2-model.yaml beside it or pass --prediction-type"):
        detect(path, _sd2_shapes(), SourceOptions())
    family, prediction, origin = detect(path, _sd2_shapes(), SourceOptions(prediction_type="epsilon"))
    assert (family.name, prediction, origin) == ("sd-v2", "epsilon", "--prediction-type")
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n    linear_start: 0.00085\n")
    assert detect(path, _sd2_shapes(), SourceOptions())[1:] == ("v_prediction", "v2-model.yaml")
    sd1 = {**_sd2_shapes(), "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
           torch.empty(320, 768, device="meta")}
    sd1 = {k.replace("cond_stage_model.model.", "cond_stage_model.transformer.text_model."): v for k, v in sd1.items()}
    assert detect(tmp_path / "x.safetensors", sd1, SourceOptions())[:2][1] == "epsilon"
    assert detect(tmp_path / "x.safetensors", sd1, SourceOptions())[0].name == "sd-v1"


class NotWeights:
    """Anything but tensors in a pickle: PyTorch's weights_only loader must refuse it."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("this ran while loading",))


def _bad_files(ldm: dict[str, torch.Tensor], good: Path, d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error must say)."""
    out: dict[str, tuple[Path, str]] = {}
    p = d / "random.safetensors"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    out["random bytes"] = (p, "not a readable safetensors file")
    p = d / "truncated.safetensors"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out["truncated"] = (p, "truncated or damaged")
    p = d / "code.ckpt"
    with p.open("wb") as f:
        pickle.dump({"state_dict": {"x": NotWeights()}}, f)
    out["pickle with code"] = (p, "weights_only loader refused it")
    p = d / "sdxl-refiner.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(4, 4, 3, 3),
               "conditioner.embedders.0.model.text_projection": torch.ones(4, 4)}, str(p))
    out["sdxl refiner"] = (p, "an SDXL refiner checkpoint")
    p = d / "other.safetensors"
    save_file({"encoder.weight": torch.ones(4)}, str(p))
    out["unknown layout"] = (p, "unknown layout: no model.diffusion_model.input_blocks.0.0.weight")
    key = "model.diffusion_model.out.2.weight"
    p = d / "shape.safetensors"
    save_file({**ldm, key: torch.zeros(4, 32, 1, 1)}, str(p))
    out["wrong shape"] = (p, r"unet tensor conv_out.weight has shape \[4, 32, 1, 1\], a tiny checkpoint has \[4, 32, 3, 3\]")
    p = d / "missing.safetensors"
    save_file({k: v for k, v in ldm.items() if k != "first_stage_model.decoder.conv_out.bias"}, str(p))
    out["missing tensor"] = (p, "vae tensor decoder.conv_out.bias is missing")
    p = d / "other-width.safetensors"
    save_file({**ldm, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(48, 4, 3, 3)}, str(p))
    out["no family fits"] = (p, r"has shape \[48, 4, 3, 3\] .* fits none of the families")
    return out


def test_bad_checkpoints_are_refused_by_name_and_nothing_is_published(ldm: dict[str, torch.Tensor], ckpt: Path,
                                                                       tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "store"
    for what, (path, message) in _bad_files(ldm, ckpt, tmp_path).items():
        with pytest.raises(SourceError, match=message) as e:
            compile_model(path, store, CompileConfig(name="bad"), progress=False)
        assert str(path) in str(e.value), what
        assert Store(store).versions("bad") == [], what
        assert list((store / "bad").iterdir()) == [], what  # staging and the prepared source removed
    assert "this ran while loading" not in capsys.readouterr().out


def test_cli_compiles_a_single_file_and_prints_its_family(ckpt: Path, tmp_path: Path) -> None:
    r = kiln("compile", str(ckpt), "--name", "cli-file", "--store", str(tmp_path / "store"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"source: {ckpt.name} (sha256 {sha256_file(ckpt)[:16]}...), family tiny, epsilon" in r.stdout


def test_cli_names_the_bad_file_and_exits_5(tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 100)
    r = kiln("compile", str(bad), "--name", "x", "--store", str(tmp_path / "store"), "--quiet")
    assert r.returncode == 5, r.stderr
    assert "nothing was published" in r.stderr and str(bad) in r.stderr
    r = kiln("compile", str(tmp_path), "--name", "x", "--store", str(tmp_path / "s"), "--prediction-type", "epsilon")
    assert r.returncode != 0 and "single-file checkpoints only" in r.stderr


def test_sd2_design_v_prediction_file_matches_diffusers(tmp_path: Path) -> None:
    """SD 2.x's layout (OpenCLIP text encoder with packed q/k/v, linear projections, "!" padding) at tiny size,
    with AUTOMATIC1111's NAME.yaml saying v-prediction: the image matches diffusers' pipeline on that model."""
    import json

    from compiler.source import init_model
    from tests.compiler.byom import diffusers_pipe

    folder = init_model(tmp_path / "v2", "tiny-v2", seed=3, progress=False)
    path = tmp_path / "my-v2-model.safetensors"
    save_file(to_ldm(folder), str(path))
    assert any(k.endswith("attn.in_proj_weight") for k in to_ldm(folder))
    path.with_suffix(".yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
                                         "  params:\n    parameterization: \"v\"\n")
    bundle = compile_model(path, tmp_path / "store", CompileConfig(name="v2"), progress=False).path
    m = Manifest.read(bundle)
    assert (m.source["family"], m.source["prediction_type"], m.source["prediction_type_from"]) == \
        ("tiny-v2", "v_prediction", "my-v2-model.yaml")
    assert m.scheduler_config["prediction_type"] == "v_prediction"
    assert m.tokenizer["pad_id"] == 0  # "!", as SD 2.x pads

    sched = folder / "scheduler/scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8), dtype=np.float32)
    prompt = "a blue triangle"
    assert_images_match(kiln_image(bundle, latents, prompt), diffusers_image(diffusers_pipe(folder), latents, prompt))


def test_recompiling_the_same_file_reuses_the_exports(file_bundle: Path, ckpt: Path) -> None:
    """The prepared folder is byte-for-byte the same each time, so its hash finds the earlier bundle's graphs."""
    again = compile_model(ckpt, file_bundle.parent.parent, CompileConfig(name="again"), progress=False)
    assert again.manifest.source["reused_exports_from"] == f"from-file/{file_bundle.name}"
    assert again.manifest.source["sha256"] == Manifest.read(file_bundle).source["sha256"]
