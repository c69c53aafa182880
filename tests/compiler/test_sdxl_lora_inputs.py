"""`kiln compile --lora-inputs` and `kiln lora add` on SDXL (tiny-sdxl): the second text encoder gets LoRA inputs
too, `kiln lora add` reads SDXL kohya (`lora_te1_*`, `lora_te2_*`) and PEFT files, and a request's adapters give
diffusers' image with the same files loaded (same latents, 1/255 mean and 3/255 max)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compiler.adapters import add_adapter
from compiler.compile import compile_model
from compiler.config import CompileConfig
from model_store import Manifest, Store
from proto.kiln.v1 import kiln_pb2 as pb
from runtime.pipeline import Pipeline
from runtime.validate import validate
from tests.compiler.byom import assert_images_match, diffusers_image, diffusers_pipe
from tests.lora_files import write_kohya, write_peft

PROMPT = "a small green square, on the left"


@pytest.fixture(scope="module")
def xl_lora_store(tiny_sdxl_source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    store = tmp_path_factory.mktemp("sdxl-lora-inputs")
    compile_model(tiny_sdxl_source, store, CompileConfig(name="xl", lora_inputs=True), progress=False)
    d = tmp_path_factory.mktemp("sdxl-adapter-files")
    (d / "peft").mkdir()
    files = {"kohya": write_kohya(tiny_sdxl_source, d / "kohya.safetensors", seed=1, rank=4, alpha=2.0),
             "peft": write_peft(tiny_sdxl_source, d / "peft", seed=2, rank=4)}
    for name, path in files.items():
        add_adapter(path, store, "xl", name=name)
    return store, files


@pytest.fixture(scope="module")
def xl_model(xl_lora_store: tuple[Path, dict[str, Path]]):  # type: ignore[no-untyped-def]
    from runtime.model import load_store

    return load_store(xl_lora_store[0])["xl"]


def kiln_image(model, latents: np.ndarray, loras: list[tuple[str, float]]) -> np.ndarray:  # type: ignore[no-untyped-def]
    request = pb.GenerateRequest(model=model.name, prompt=PROMPT, width=64, height=64, steps=8, guidance_scale=7.5,
                                 sampler="euler", seed=0, loras=[pb.LoraSelection(name=n, scale=s) for n, s in loras])
    params = validate(request, model.manifest.defaults, model.manifest.limits, schedule=model.schedule,
                      adapters=model.adapters, max_loras=model.max_loras)
    images, _ = Pipeline(model).run(params, latents=latents)
    return images[0]


def test_second_text_encoder_has_lora_inputs_and_adapters_fill_them(xl_lora_store, xl_model) -> None:  # type: ignore[no-untyped-def]
    store, _ = xl_lora_store
    m = Manifest.read(Store(store).latest("xl").path)
    targets = m.model["lora_inputs"]["targets"]
    assert set(targets) == {"text_encoder", "text_encoder_2", "unet"} and targets["text_encoder_2"] > 0
    assert m.model["lora_inputs"]["text_encoder_2_config"] == "lora/text_encoder_2_config.json"
    for name in ("kohya", "peft"):
        info = json.loads((store / "xl/adapters" / f"{name}.json").read_text())
        assert info["targets"]["text_encoder_2"] == targets["text_encoder_2"], name
    assert sorted(xl_model.adapters) == ["kohya", "peft"]


def test_sdxl_adapters_per_request_match_diffusers(xl_lora_store, xl_model, tiny_sdxl_source: Path,  # type: ignore[no-untyped-def]
                                                   tiny_sdxl_model) -> None:
    _, files = xl_lora_store
    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)
    plain = kiln_image(xl_model, latents, [])
    # rank 0: the bundle as compiled
    assert_images_match(plain, kiln_image(tiny_sdxl_model, latents, []))
    pipe = diffusers_pipe(tiny_sdxl_source)
    pipe.load_lora_weights(str(files["kohya"]), adapter_name="a")
    pipe.load_lora_weights(str(files["peft"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.8, -0.5])
    got = kiln_image(xl_model, latents, [("kohya", 0.8), ("peft", -0.5)])
    assert_images_match(got, diffusers_image(pipe, latents, PROMPT))
    assert np.abs(got.astype(int) - plain.astype(int)).mean() > 2  # the adapters changed the picture
    # the second text encoder's deltas matter: without them (diffusers, same LoRAs elsewhere) the image parts
    pipe.set_adapters(["a", "b"], adapter_weights=[0.8, -0.5])
    for layer in pipe.text_encoder_2.modules():
        if hasattr(layer, "scaling") and isinstance(layer.scaling, dict):
            layer.scaling = {k: 0.0 for k in layer.scaling}
    partial = diffusers_image(pipe, latents, PROMPT)
    assert np.abs(got.astype(int) - partial.astype(int)).mean() > 1
