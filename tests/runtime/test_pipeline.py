"""Pipeline behaviour: determinism, per-image seeds, guidance batching, stage timings, PNG parameters."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from proto.kiln.v1 import kiln_pb2 as pb
from runtime.pipeline import Generation, Pipeline
from runtime.validate import validate


def params(model, **fields):  # type: ignore[no-untyped-def]
    request = pb.GenerateRequest(model="tiny", prompt=fields.pop("prompt", "a red circle"), **fields)
    return validate(request, model.manifest.defaults, model.manifest.limits)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m_karras"])
def test_same_seed_same_image_other_seed_other_image(tiny_model, sampler) -> None:  # type: ignore[no-untyped-def]
    pipe = Pipeline(tiny_model)
    a, _ = pipe.run(params(tiny_model, seed=7, steps=6, sampler=sampler))
    b, _ = pipe.run(params(tiny_model, seed=7, steps=6, sampler=sampler))
    c, _ = pipe.run(params(tiny_model, seed=8, steps=6, sampler=sampler))
    assert np.array_equal(a[0], b[0])
    assert np.abs(a[0].astype(int) - c[0].astype(int)).mean() > 1


def test_image_k_uses_seed_plus_k(tiny_model) -> None:  # type: ignore[no-untyped-def]
    pipe = Pipeline(tiny_model)
    pair, gen = pipe.run(params(tiny_model, seed=2**32 - 1, steps=4, sampler="euler_a", num_images=2))
    second, _ = pipe.run(params(tiny_model, seed=0, steps=4, sampler="euler_a"))
    assert gen.params.image_seed(1) == 0
    np.testing.assert_allclose(pair[1].astype(int), second[0].astype(int), atol=1)


def test_guidance_at_most_one_skips_the_unconditional_batch(tiny_model) -> None:  # type: ignore[no-untyped-def]
    pipe = Pipeline(tiny_model)
    gen = Generation(params(tiny_model, guidance_scale=1.0, num_images=3, steps=2), tiny_model)
    pipe.tokenize(gen)
    pipe.encode_text(gen)
    pipe.prepare(gen)
    assert gen.embeddings.shape[0] == 3 and pipe.unet_inputs(gen)["sample"].shape[0] == 3
    guided = Generation(params(tiny_model, guidance_scale=7.0, num_images=3, steps=2), tiny_model)
    pipe.tokenize(guided)
    pipe.encode_text(guided)
    pipe.prepare(guided)
    assert pipe.unet_inputs(guided)["sample"].shape[0] == 6


def test_stages_are_timed_and_png_carries_parameters(tiny_model) -> None:  # type: ignore[no-untyped-def]
    pipe = Pipeline(tiny_model)
    p = params(tiny_model, seed=11, steps=3, negative_prompt="blurry", guidance_scale=6.5, width=72, height=64)
    images, gen = pipe.run(p)
    assert list(gen.timings) == ["tokenize", "text_encode", "prepare", "denoise", "decode"]
    png = pipe.encode_png(gen, 0, images[0])
    img = Image.open(io.BytesIO(png))
    assert img.size == (72, 64)
    assert img.text["parameters"] == (
        "a red circle\nNegative prompt: blurry\n"
        f"Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 11, Size: 72x64, Model: tiny, "
        f"Model version: {tiny_model.version}, Generator: kiln"
    )
    # settings that change the image and are off by default are written only when set
    p = params(tiny_model, seed=11, steps=3, guidance_scale=6.5, width=72, height=64, guidance_end=0.5)
    images, gen = pipe.run(p)
    text = Image.open(io.BytesIO(pipe.encode_png(gen, 0, images[0]))).text["parameters"]
    assert "CFG scale: 6.5, CFG end: 0.5, Seed: 11, Size: 72x64, Model: tiny," in text
