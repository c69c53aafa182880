"""Kiln's SDXL runtime against diffusers' StableDiffusionXL pipelines (PyTorch fp32) on the tiny SDXL model.

Same model folder, same starting latents and noise streams (as tests/runtime/test_image_editing.py gives them):
text-to-image, img2img and inpainting images within 1/255 mean and 3/255 max, as for SD v1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from proto.kiln.v1 import kiln_pb2 as pb
from runtime.pipeline import Pipeline, time_ids
from runtime.validate import validate
from tests.runtime.test_image_editing import (
    SIZE,
    assert_images_close,
    assert_latents_close,
    init_image,
    left_half_mask,
    png,
    request,
    streams,
)

TWINS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "turbo": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
}


def sdxl_pipe(cls_name: str, source, sampler: str):  # type: ignore[no-untyped-def]
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    twin, kw = TWINS[sampler]
    pipe.scheduler = getattr(diffusers, twin).from_config(pipe.scheduler.config, **kw)
    return pipe


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("sampler", "negative", "guidance", "size", "num_images", "steps"),
    [
        ("euler", "", 5.0, (64, 64), 1, 8),  # empty negative prompt: all-zero unconditional embeddings
        ("euler_a", "blurry, low quality", 7.0, (80, 64), 2, 6),
        ("dpmpp_2m", "", 1.0, (64, 72), 1, 6),  # no guidance: conditional rows only
        ("turbo", "", 0.0, (64, 64), 1, 1),  # SDXL-Turbo settings: one step, guidance off
    ],
)
def test_txt2img_matches_diffusers(tiny_sdxl_source, tiny_sdxl_model, sampler, negative, guidance, size,
                                   num_images, steps) -> None:  # type: ignore[no-untyped-def]
    width, height = size
    prompt = "a red circle on a blue background"
    pipe = sdxl_pipe("StableDiffusionXLPipeline", tiny_sdxl_source, sampler)
    latents = np.random.default_rng(5).standard_normal((num_images, 4, height // 8, width // 8), dtype=np.float32)
    g_ref, _, noise_fn, _ = streams()
    with torch.inference_mode():
        ref = pipe([prompt] * num_images, negative_prompt=[negative] * num_images if negative else None,
                   height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                   latents=torch.from_numpy(latents.copy()), generator=g_ref, output_type="np").images
    # diffusers draws ancestral noise for the whole batch at once: one draw per step, split per image
    pending: list[np.ndarray] = []

    def batch_noise(k: int, shape: tuple[int, ...]) -> np.ndarray:
        if k == 0:
            pending[:] = list(noise_fn(0, (num_images, *shape[1:]))[:, None])
        return pending[k]

    m = tiny_sdxl_model.manifest
    req = pb.GenerateRequest(model=m.name, prompt=prompt, negative_prompt=negative, width=width, height=height,
                             steps=steps, guidance_scale=guidance, sampler=sampler, num_images=num_images, seed=0)
    params = validate(req, m.defaults, m.limits, schedule=tiny_sdxl_model.schedule, sdxl=True)
    images, gen = Pipeline(tiny_sdxl_model).run(params, latents=latents, noise_fn=batch_noise)
    rows = 2 * num_images if params.guided else num_images
    assert gen.embeddings.shape == (rows, 77, 64) and gen.pooled.shape == (rows, 32)
    if params.guided and not negative:
        assert not gen.embeddings[:num_images].any() and not gen.pooled[:num_images].any()
    got = np.stack(images)
    assert got.shape == (num_images, height, width, 3)
    assert_images_close(got, to_uint8(ref))
    assert to_uint8(ref).std() > 5  # something to compare


def test_time_ids_are_the_requested_size(tiny_sdxl_model) -> None:  # type: ignore[no-untyped-def]
    params = request(tiny_sdxl_model, width=80, height=64, steps=2)
    np.testing.assert_array_equal(time_ids(params), [64, 80, 0, 0, 64, 80])
    gen_inputs = Pipeline(tiny_sdxl_model)
    from runtime.pipeline import Generation

    gen = Generation(params, tiny_sdxl_model)
    gen_inputs.tokenize(gen)
    gen_inputs.encode_text(gen)
    gen_inputs.prepare(gen)
    feed = gen_inputs.unet_inputs(gen)
    assert set(feed) == {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"}
    assert feed["time_ids"].shape == (feed["sample"].shape[0], 6)


@pytest.mark.parametrize(("sampler", "strength"), [("euler", 0.6), ("euler_a", 1.0)])
def test_img2img_matches_diffusers(tiny_sdxl_source, tiny_sdxl_model, monkeypatch, sampler, strength) -> None:  # type: ignore[no-untyped-def]
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module

    steps, guidance = 10, 5.0
    image = init_image()
    pipe = sdxl_pipe("StableDiffusionXLImg2ImgPipeline", tiny_sdxl_source, sampler)
    g_ref, retrieve, noise_fn, encode_noise_fn = streams()
    monkeypatch.setattr(module, "retrieve_latents", retrieve)
    params = request(tiny_sdxl_model, init_image=png(image), strength=strength, steps=steps, guidance_scale=guidance,
                     sampler=sampler)
    assert params.mode == "img2img"
    with torch.inference_mode():
        ref = pipe(params.prompt, image=Image.fromarray(image), strength=strength, num_inference_steps=steps,
                   guidance_scale=guidance, generator=g_ref, output_type="np").images[0]
    images, gen = Pipeline(tiny_sdxl_model).run(params, noise_fn=noise_fn, encode_noise_fn=encode_noise_fn)
    assert gen.steps_done == params.denoising_steps
    assert_images_close(images[0], to_uint8(ref))


@pytest.mark.parametrize(("sampler", "strength"), [("euler", 1.0), ("dpmpp_2m", 0.75)])
def test_inpainting_matches_diffusers(tiny_sdxl_source, tiny_sdxl_model, monkeypatch, sampler, strength) -> None:  # type: ignore[no-untyped-def]
    """SDXL's 4-channel UNet: the known region blended back after each step, as diffusers' SDXL Inpaint pipeline
    does; the final latents the same, and outside the mask the init image itself."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as module

    steps, guidance = 8, 5.0
    image, mask = init_image(), left_half_mask()
    pipe = sdxl_pipe("StableDiffusionXLInpaintPipeline", tiny_sdxl_source, sampler)
    g_ref, retrieve, noise_fn, encode_noise_fn = streams()
    monkeypatch.setattr(module, "retrieve_latents", retrieve)
    params = request(tiny_sdxl_model, init_image=png(image), mask_image=png(mask), strength=strength, steps=steps,
                     guidance_scale=guidance, sampler=sampler)
    with torch.inference_mode():
        ref = pipe(params.prompt, image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=strength,
                   num_inference_steps=steps, guidance_scale=guidance, generator=g_ref, output_type="latent").images
    images, gen = Pipeline(tiny_sdxl_model).run(params, noise_fn=noise_fn, encode_noise_fn=encode_noise_fn)
    assert_latents_close(gen.latents, ref.numpy())
    keep = mask < 128
    np.testing.assert_array_equal(images[0][keep], image[keep])
    assert image.shape[0] == SIZE


def test_size_conditioning_matches_diffusers(tiny_sdxl_source, tiny_sdxl_model) -> None:  # type: ignore[no-untyped-def]
    """GenerateRequest.size_conditioning is diffusers' original_size, crops_coords_top_left and target_size."""
    pipe = sdxl_pipe("StableDiffusionXLPipeline", tiny_sdxl_source, "euler")
    latents = np.random.default_rng(6).standard_normal((1, 4, 8, 8), dtype=np.float32)
    prompt = "a red circle on a blue background"
    with torch.inference_mode():
        ref = pipe(prompt, height=64, width=64, num_inference_steps=6, guidance_scale=5.0, original_size=(768, 1024),
                   crops_coords_top_left=(32, 16), target_size=(512, 640), latents=torch.from_numpy(latents.copy()),
                   output_type="np").images
    m = tiny_sdxl_model.manifest
    sc = pb.SizeConditioning(original_width=1024, original_height=768, crop_top=32, crop_left=16, target_width=640,
                             target_height=512)
    req = pb.GenerateRequest(model=m.name, prompt=prompt, width=64, height=64, steps=6, guidance_scale=5.0,
                             sampler="euler", seed=0, size_conditioning=sc)
    params = validate(req, m.defaults, m.limits, schedule=tiny_sdxl_model.schedule, sdxl=True)
    np.testing.assert_array_equal(time_ids(params), [768, 1024, 32, 16, 512, 640])
    images, _ = Pipeline(tiny_sdxl_model).run(params, latents=latents)
    assert_images_close(images[0], to_uint8(ref[0]))


@pytest.fixture(scope="module")
def sdxl_inpainting(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from compiler.compile import compile_model
    from compiler.config import CompileConfig
    from compiler.source import init_model
    from model_store import Store
    from runtime.model import load_bundle

    source = init_model(tmp_path_factory.mktemp("models") / "tiny-sdxl-inpainting", "tiny-sdxl-inpainting",
                        progress=False)
    store = tmp_path_factory.mktemp("sdxl-inpainting-store")
    compile_model(source, store, CompileConfig(name="tiny-sdxl-inpainting"), progress=False)
    return source, load_bundle(Store(store).latest("tiny-sdxl-inpainting"))


@pytest.mark.parametrize(("sampler", "strength"), [("euler", 1.0), ("euler_a", 0.75)])
def test_9_channel_sdxl_inpainting_matches_diffusers(sdxl_inpainting, monkeypatch, sampler, strength) -> None:  # type: ignore[no-untyped-def]
    """A 9-channel SDXL inpainting UNet (latents, mask, masked-image latents), as diffusers' SDXL Inpaint
    pipeline feeds it."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as module

    source, model = sdxl_inpainting
    assert model.inpainting and model.sdxl
    steps, guidance = 8, 5.0
    image, mask = init_image(), left_half_mask()
    pipe = sdxl_pipe("StableDiffusionXLInpaintPipeline", source, sampler)
    assert pipe.unet.config.in_channels == 9
    g_ref, retrieve, noise_fn, encode_noise_fn = streams()
    monkeypatch.setattr(module, "retrieve_latents", retrieve)
    params = request(model, init_image=png(image), mask_image=png(mask), strength=strength, steps=steps,
                     guidance_scale=guidance, sampler=sampler)
    with torch.inference_mode():
        ref = pipe(params.prompt, image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=strength,
                   num_inference_steps=steps, guidance_scale=guidance, generator=g_ref, output_type="np").images[0]
    images, _ = Pipeline(model).run(params, noise_fn=noise_fn, encode_noise_fn=encode_noise_fn)
    redraw = mask >= 128
    assert_images_close(images[0], to_uint8(ref), where=redraw)
    np.testing.assert_array_equal(images[0][~redraw], image[~redraw])
