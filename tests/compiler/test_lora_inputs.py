"""`kiln compile --lora-inputs` and `kiln lora add` on the tiny model, and the images per-request adapters give.

The images are compared with diffusers' own pipeline with the same LoRA file loaded and fused the diffusers way
(`load_lora_weights` + `fuse_lora`), same latents, within the runtime's diffusers parity bounds (1/255 mean,
3/255 max; tests/runtime/test_diffusers_parity.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model_store import Store, sha256_file
from proto.kiln.v1 import kiln_pb2 as pb
from runtime.pipeline import Pipeline
from runtime.validate import validate
from tests.conftest import kiln

PROMPT, NEGATIVE, STEPS, GUIDANCE, SIZE = "a red circle on a blue background", "blurry", 8, 7.5, 64


@pytest.fixture(scope="module")
def lora_model(lora_store: Path):  # type: ignore[no-untyped-def]
    from runtime.model import load_store

    return load_store(lora_store)["tiny-lora"]


def _latents() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)


def kiln_image(model, loras: list[tuple[str, float]] = ()) -> np.ndarray:  # type: ignore[no-untyped-def,assignment]
    request = pb.GenerateRequest(model=model.name, prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE,
                                 steps=STEPS, guidance_scale=GUIDANCE, sampler="euler", seed=0,
                                 loras=[pb.LoraSelection(name=n, scale=s) for n, s in loras])
    params = validate(request, model.manifest.defaults, model.manifest.limits, adapters=model.adapters,
                      max_loras=model.max_loras)
    images, _ = Pipeline(model).run(params, latents=_latents())
    return images[0]


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_source: Path):  # type: ignore[no-untyped-def]
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_source, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(pipe, files: list[tuple[Path, float]]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """diffusers' image with the LoRA files loaded the diffusers way, at their scales, fused into the weights."""
    import torch

    names = [f"l{i}" for i in range(len(files))]
    for (path, _), name in zip(files, names, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    try:
        if files:
            pipe.set_adapters(names, adapter_weights=[s for _, s in files])
            pipe.fuse_lora(adapter_names=names)
        with torch.inference_mode():
            out = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                       guidance_scale=GUIDANCE, latents=torch.from_numpy(_latents()), output_type="np").images[0]
    finally:
        if files:
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
    return (out * 255).round().astype(np.uint8)


def close(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(diff.mean()), int(diff.max())


def test_bundle_has_lora_inputs_and_adapters_beside_versions(lora_store: Path, lora_model) -> None:  # type: ignore[no-untyped-def]
    store = Store(lora_store)
    assert store.names() == ["tiny-lora"]
    assert len(store.versions("tiny-lora")) == 1  # the adapters folder is no version
    m = store.latest("tiny-lora").manifest
    targets = m.model["lora_inputs"]["targets"]
    assert targets["unet"] > 0 and targets["text_encoder"] > 0
    for component in ("unet", "text_encoder"):
        names = m.components[component].inputs
        assert sum(n.startswith("lora_down.") for n in names) == targets[component]
        assert sum(n.startswith("lora_up.") for n in names) == targets[component]
    assert not any(n.startswith("lora_") for n in m.components["vae_decoder"].inputs)
    assert m.limits["max_loras"] == 2 and lora_model.max_loras == 2
    assert sorted(lora_model.adapters) == ["kohya", "peft"]


def test_adapter_files_record_their_source(lora_store: Path, lora_files: dict[str, Path], lora_model) -> None:  # type: ignore[no-untyped-def]
    info = json.loads((lora_store / "tiny-lora/adapters/kohya.json").read_text())
    assert info["sha256"] == sha256_file(lora_files["kohya"]) == lora_model.adapters["kohya"].sha256
    assert info["file_sha256"] == sha256_file(lora_store / "tiny-lora/adapters/kohya.safetensors")
    assert info["rank"] == 2 and lora_model.adapters["peft"].rank == 4
    m = Store(lora_store).latest("tiny-lora").manifest
    assert info["targets"] == m.model["lora_inputs"]["targets"]  # the test LoRAs adapt every target layer


def test_config_refuses_quantized_and_attention_passes() -> None:
    from compiler.config import CompileConfig

    with pytest.raises(ValueError, match="lora_inputs: text_encoder, unet at precision 'int8'"):
        CompileConfig(name="x", lora_inputs=True, precision="int8")
    CompileConfig(name="x", lora_inputs=True, precision="vae_decoder=int8")  # the VAE may be quantized
    with pytest.raises(ValueError, match="--tome"):
        CompileConfig(name="x", lora_inputs=True, tome=0.5)
    with pytest.raises(ValueError, match="max_loras=0"):
        CompileConfig(name="x", lora_inputs=True, max_loras=0)


def test_no_adapter_gives_the_plain_bundle_image(lora_model, tiny_model) -> None:  # type: ignore[no-untyped-def]
    plain, with_inputs = kiln_image(tiny_model), kiln_image(lora_model)
    mean, most = close(plain, with_inputs)
    assert mean <= 1.0 and most <= 3, (mean, most)
    assert plain.std() > 5


@pytest.mark.parametrize(("selection", "files"), [
    ([("kohya", 1.0)], [("kohya", 1.0)]),
    ([("peft", -0.7)], [("peft", -0.7)]),
    ([("peft", 0.5), ("kohya", 1.5)], [("kohya", 1.5), ("peft", 0.5)]),  # two adapters, concatenated along r
])
def test_adapter_matches_the_lora_fused_by_diffusers(lora_model, lora_files, diffusers_pipe, selection,  # type: ignore[no-untyped-def]
                                                     files) -> None:
    got = kiln_image(lora_model, selection)
    want = diffusers_image(diffusers_pipe, [(lora_files[n], s) for n, s in files])
    mean, most = close(got, want)
    assert mean <= 1.0 and most <= 3, (mean, most)
    # the image without the LoRA fails those bounds: the comparison would catch an adapter that is not applied
    base_mean, base_most = close(want, kiln_image(lora_model))
    assert base_mean > 1.0 and base_most > 3, (base_mean, base_most)


@pytest.mark.parametrize(("kind", "message"), [
    ("locon", "3x3 convolution (LoCon)"),
    ("foreign", "LoRA key 'down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight' fits no layer"),
])
def test_lora_add_refuses_what_does_not_fit(lora_store: Path, lora_files: dict[str, Path], kind: str,
                                            message: str) -> None:
    r = kiln("lora", "add", str(lora_files[kind]), "--model", "tiny-lora", "--store", str(lora_store),
             "--name", f"bad-{kind}")
    assert r.returncode == 5, r.stderr
    assert message in r.stderr and "nothing was written" in r.stderr
    assert not list((lora_store / "tiny-lora/adapters").glob("bad-*"))


def test_lora_add_needs_a_bundle_with_lora_inputs(tiny_store: Path, lora_files: dict[str, Path]) -> None:
    r = kiln("lora", "add", str(lora_files["kohya"]), "--model", "tiny", "--store", str(tiny_store))
    assert r.returncode == 2 and "compiled without --lora-inputs" in r.stderr, r.stderr
    assert not (tiny_store / "tiny/adapters").exists()


def test_openvino_engine_refuses_a_bundle_with_lora_inputs(lora_store: Path) -> None:
    from model_store import ManifestError
    from runtime.model import open_bundle_dir

    ref = Store(lora_store).latest("tiny-lora")
    with pytest.raises(ManifestError, match="compiled with --lora-inputs, which the OpenVINO engine does not feed"):
        open_bundle_dir(ref.path, ref.manifest, engine="openvino")


def test_graphs_with_and_without_lora_inputs_never_stand_in_for_each_other(tiny_source: Path,
                                                                         tmp_path: Path) -> None:
    """Export reuse (compiler/reuse.py) copies a donor's graphs only when their inputs are the ones wanted."""
    from tests.compiler.test_reuse import _compile

    plain, _ = _compile(tiny_source, tmp_path, "plain")
    with_inputs, log = _compile(tiny_source, tmp_path, "with-inputs", lora_inputs=True)
    assert with_inputs.source["reused_exports_from"] == f"plain/{plain.version}"
    assert "export vae_decoder: reuse plain/" in log  # the VAE has no LoRA inputs: reused
    assert "export unet ..." in log and "export text_encoder ..." in log  # exported afresh, with them
    assert any(i.startswith("lora_down.") for i in with_inputs.components["unet"].inputs)
    # the newest donor is now the bundle with LoRA inputs: its VAE is taken, its UNet and text encoder are not
    again, log = _compile(tiny_source, tmp_path, "plain-again")
    assert again.source["reused_exports_from"] == f"with-inputs/{with_inputs.version}"
    assert "export unet ..." in log and "export text_encoder ..." in log
    assert not any(i.startswith("lora_") for i in again.components["unet"].inputs)
