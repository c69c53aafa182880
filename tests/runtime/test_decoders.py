"""The per-request decoder (GenerateRequest.decoder): the tiny decoder's images match diffusers' pipeline with
`pipe.vae = AutoencoderTiny(...)` for the same latents, the full one's match it with the model's own VAE, and
`decoder` is validated against the model's decoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from proto.kiln.v1 import kiln_pb2 as pb
from runtime.errors import InvalidArgument
from runtime.pipeline import Pipeline
from runtime.validate import validate
from tests.conftest import VaeFiles, load_latest


@pytest.mark.parametrize("decoder", ["tiny", "full"])
def test_decoder_matches_diffusers(vae_store: Path, vae_files: VaeFiles, decoder: str) -> None:
    import torch
    from diffusers import AutoencoderTiny, EulerDiscreteScheduler, StableDiffusionPipeline

    model = load_latest(vae_store, "swapped")
    pipe = StableDiffusionPipeline.from_pretrained(vae_files.with_vae, safety_checker=None,
                                                   requires_safety_checker=False)
    if decoder == "tiny":
        pipe.vae = AutoencoderTiny.from_pretrained(vae_files.taesd)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(5).standard_normal((2, 4, 9, 8), dtype=np.float32)
    request = pb.GenerateRequest(model="swapped", prompt="a green square", width=64, height=72, steps=8, seed=0,
                                 sampler="euler", num_images=2, decoder=decoder)
    params = validate(request, model.manifest.defaults, model.manifest.limits, decoders=tuple(model.decoders))
    assert params.decoder == decoder
    with torch.inference_mode():
        ref = pipe([request.prompt] * 2, height=72, width=64, num_inference_steps=8,
                   guidance_scale=params.guidance_scale, latents=torch.from_numpy(latents.copy()),
                   output_type="np").images
    ref = (ref * 255).round().astype(np.uint8)
    got = np.stack(Pipeline(model).run(params, latents=latents)[0])
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() <= 1.0 and diff.max() <= 3, (diff.mean(), diff.max())
    assert ref.std() > 5


def test_tiny_and_full_decoders_draw_different_images(vae_store: Path) -> None:
    """The same latents through both decoders: different VAEs, so the decoder a request picks is the one used."""
    model = load_latest(vae_store, "swapped")
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)
    full, tiny = (Pipeline(model).vae_decode(latents, d) for d in ("full", "tiny"))
    assert full.shape == tiny.shape == (1, 64, 64, 3)
    assert np.abs(full.astype(int) - tiny.astype(int)).mean() > 10


def test_tiny_decoder_is_named_in_the_png(vae_store: Path) -> None:
    import io

    from PIL import Image

    model = load_latest(vae_store, "swapped")
    pipe = Pipeline(model)
    texts = {}
    for decoder in ("full", "tiny"):
        request = pb.GenerateRequest(model="swapped", prompt="a red circle", seed=3, steps=2, decoder=decoder)
        images, gen = pipe.run(validate(request, model.manifest.defaults, model.manifest.limits,
                                        decoders=tuple(model.decoders)))
        texts[decoder] = Image.open(io.BytesIO(pipe.encode_png(gen, 0, images[0]))).text["parameters"]
    assert "Decoder:" not in texts["full"] and ", Decoder: tiny, Model: swapped," in texts["tiny"]


@pytest.mark.parametrize(("decoder", "decoders", "message"), [
    ("tiny", ("full",), "decoder='tiny': model 'm' has no tiny decoder; its decoders: full (compile it with "
                        "--tiny-decoder to add one)"),
    ("bogus", ("full", "tiny"), "decoder='bogus' is not one of: full, tiny"),
    ("FULL", ("full", "tiny"), "decoder='FULL' is not one of: full, tiny"),
])
def test_decoder_is_validated(decoder: str, decoders: tuple[str, ...], message: str) -> None:
    request = pb.GenerateRequest(model="m", prompt="x", decoder=decoder)
    defaults = {"width": 64, "height": 64, "steps": 4, "guidance_scale": 7.5, "sampler": "euler"}
    limits = {"min_size": 64, "max_size": 512, "max_steps": 50, "max_images": 4, "max_guidance_scale": 30.0}
    with pytest.raises(InvalidArgument) as e:
        validate(request, defaults, limits, decoders=decoders)
    assert [(v.field, v.description) for v in e.value.violations] == [("decoder", message)]
    assert validate(pb.GenerateRequest(model="m", prompt="x"), defaults, limits, decoders=decoders).decoder == "full"


def test_a_bundle_without_decoders_in_its_manifest_has_the_full_one(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Bundles compiled before `model.decoders` existed: the full decoder, at the manifest's scaling factor."""
    import dataclasses

    from runtime.model import Decoder

    model = dict(tiny_model.manifest.model)
    model.pop("decoders", None)
    old = dataclasses.replace(tiny_model, manifest=dataclasses.replace(tiny_model.manifest, model=model))
    assert old.decoders == {"full": Decoder("vae_decoder", model["vae_scaling_factor"])}
