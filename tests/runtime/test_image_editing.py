"""img2img and inpainting against diffusers' Img2Img and Inpaint pipelines on the tiny models.

Same model folder, same init image and mask, same noise: diffusers draws its starting and per-step noise from
one generator and samples the VAE posterior with `retrieve_latents`; the test routes those posterior samples
through a second generator and gives Kiln the same two streams (`noise_fn`, `encode_noise_fn`). Decoded images
must match within 1/255 mean and 3/255 max; latents within 1e-4 relative.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from proto.kiln.v1 import kiln_pb2 as pb
from runtime.pipeline import Pipeline
from runtime.validate import validate

SAMPLERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "ddim": ("DDIMScheduler", {}),
}
SIZE = 64


def init_image(size: int = SIZE) -> np.ndarray:
    """A smooth colour pattern: something a VAE round trip keeps recognisable."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def left_half_mask(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[:, : size // 2] = 255
    return mask


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inpainting_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from compiler.source import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny-inpainting", "tiny-inpainting", progress=False)


@pytest.fixture(scope="module")
def inpainting_model(inpainting_source: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from compiler.compile import compile_model
    from compiler.config import CompileConfig
    from model_store import Store
    from runtime.model import load_bundle

    store = tmp_path_factory.mktemp("inpainting-store")
    compile_model(inpainting_source, store, CompileConfig(name="tiny-inpainting"), progress=False)
    return load_bundle(Store(store).latest("tiny-inpainting"))


def streams(seed: int = 99, encode_seed: int = 7):  # type: ignore[no-untyped-def]
    """(diffusers generator, patched retrieve_latents, Kiln noise_fn, Kiln encode_noise_fn), drawing the same
    numbers on both sides."""
    g_ref, g_enc_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(encode_seed)
    g_ours, g_enc_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(encode_seed)

    def retrieve_latents(encoder_output, generator=None, sample_mode="sample"):  # type: ignore[no-untyped-def]
        return encoder_output.latent_dist.sample(g_enc_ref)

    def noise_fn(k: int, shape: tuple[int, ...]) -> np.ndarray:
        return torch.randn(shape, generator=g_ours, dtype=torch.float32).numpy()

    def encode_noise_fn(k: int, shape: tuple[int, ...]) -> np.ndarray:
        return torch.randn(shape, generator=g_enc_ours, dtype=torch.float32).numpy()

    return g_ref, retrieve_latents, noise_fn, encode_noise_fn


def diffusers_pipe(cls_name: str, source: Path, sampler: str):  # type: ignore[no-untyped-def]
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    twin, kw = SAMPLERS[sampler]
    pipe.scheduler = getattr(diffusers, twin).from_config(pipe.scheduler.config, **kw)
    return pipe


def request(model, **fields):  # type: ignore[no-untyped-def]
    m = model.manifest
    fields.setdefault("seed", 1)
    req = pb.GenerateRequest(model=m.name, prompt="a red circle on a blue background", **fields)
    return validate(req, m.defaults, m.limits, schedule=model.schedule, sdxl=model.sdxl)


def assert_images_close(ours: np.ndarray, ref: np.ndarray, where: np.ndarray | None = None) -> None:
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    if where is not None:
        diff = diff[where]
    assert diff.mean() <= 1.0 and diff.max() <= 3, f"mean {diff.mean():.3f}/255, max {diff.max()}/255"


def assert_latents_close(ours: np.ndarray, ref: np.ndarray) -> None:
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-4 * max(1.0, float(np.abs(ref).max())), f"max abs latent diff {err:.3g}"


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_img2img_matches_diffusers(tiny_source, tiny_model, monkeypatch, sampler, strength) -> None:  # type: ignore[no-untyped-def]
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    steps, guidance = 10, 7.5
    image = init_image()
    pipe = diffusers_pipe("StableDiffusionImg2ImgPipeline", tiny_source, sampler)
    g_ref, retrieve, noise_fn, encode_noise_fn = streams()
    monkeypatch.setattr(module, "retrieve_latents", retrieve)
    params = request(tiny_model, init_image=png(image), strength=strength, steps=steps, guidance_scale=guidance,
                     sampler=sampler)
    assert params.mode == "img2img" and params.denoising_steps == int(steps * strength)
    with torch.inference_mode():
        ref = pipe(params.prompt, image=Image.fromarray(image), strength=strength, num_inference_steps=steps,
                   guidance_scale=guidance, generator=g_ref, output_type="np").images[0]
    images, gen = Pipeline(tiny_model).run(params, noise_fn=noise_fn, encode_noise_fn=encode_noise_fn)
    assert gen.steps_done == params.denoising_steps
    assert_images_close(images[0], (ref * 255).round().astype(np.uint8))


@pytest.mark.parametrize(("sampler", "strength"), [("euler", 1.0), ("euler_a", 0.75), ("ddim", 0.5),
                                                    ("dpmpp_2m", 1.0)])
def test_9_channel_inpainting_matches_diffusers(inpainting_source, inpainting_model, monkeypatch, sampler,
                                                strength) -> None:  # type: ignore[no-untyped-def]
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    steps, guidance = 8, 7.5
    image, mask = init_image(), left_half_mask()
    pipe = diffusers_pipe("StableDiffusionInpaintPipeline", inpainting_source, sampler)
    assert pipe.unet.config.in_channels == 9
    g_ref, retrieve, noise_fn, encode_noise_fn = streams()
    monkeypatch.setattr(module, "retrieve_latents", retrieve)
    params = request(inpainting_model, init_image=png(image), mask_image=png(mask), strength=strength, steps=steps,
                     guidance_scale=guidance, sampler=sampler)
    assert params.mode == "inpaint"
    with torch.inference_mode():
        ref = pipe(params.prompt, image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=strength,
                   num_inference_steps=steps, guidance_scale=guidance, generator=g_ref, output_type="np").images[0]
    images, gen = Pipeline(inpainting_model).run(params, noise_fn=noise_fn, encode_noise_fn=encode_noise_fn)
    redraw = mask >= 128
    # inside the mask: diffusers' image; outside: the init image itself (Kiln pastes through the mask)
    assert_images_close(images[0], (ref * 255).round().astype(np.uint8), where=redraw)
    np.testing.assert_array_equal(images[0][~redraw], image[~redraw])


@pytest.mark.parametrize(("sampler", "strength"), [("euler", 1.0), ("euler_a", 0.75), ("dpmpp_2m", 0.5)])
def test_blended_inpainting_matches_diffusers(tiny_source, tiny_model, monkeypatch, sampler, strength) -> None:  # type: ignore[no-untyped-def]
    """An ordinary (4-channel) UNet: diffusers' Inpaint pipeline blends the noised init latents back in outside
    the mask after every step; the final latents must be the same."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    steps, guidance = 8, 7.5
    image, mask = init_image(), left_half_mask()
    pipe = diffusers_pipe("StableDiffusionInpaintPipeline", tiny_source, sampler)
    g_ref, retrieve, noise_fn, encode_noise_fn = streams()
    monkeypatch.setattr(module, "retrieve_latents", retrieve)
    params = request(tiny_model, init_image=png(image), mask_image=png(mask), strength=strength, steps=steps,
                     guidance_scale=guidance, sampler=sampler)
    with torch.inference_mode():
        ref = pipe(params.prompt, image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=strength,
                   num_inference_steps=steps, guidance_scale=guidance, generator=g_ref, output_type="latent").images
    pipeline = Pipeline(tiny_model)
    _, gen = pipeline.run(params, noise_fn=noise_fn, encode_noise_fn=encode_noise_fn)
    assert gen.latents is not None
    assert_latents_close(gen.latents, ref.numpy())


@pytest.mark.parametrize("blur", [0, 4])
def test_blended_inpainting_keeps_unmasked_pixels(tiny_model, blur) -> None:  # type: ignore[no-untyped-def]
    """Outside the mask the result is the init image: exactly with a hard mask, and beyond the blur's reach
    (3 radii) with a blurred one; inside, it is redrawn."""
    image, mask = init_image(), left_half_mask()
    params = request(tiny_model, init_image=png(image), mask_image=png(mask), steps=6, mask_blur=blur)
    out = Pipeline(tiny_model).run(params)[0][0]
    keep = np.zeros(mask.shape, bool)
    keep[:, SIZE // 2 + 3 * blur:] = True
    np.testing.assert_array_equal(out[keep], image[keep])
    redrawn = np.abs(out[:, : SIZE // 2 - 3 * blur].astype(np.int16) - image[:, : SIZE // 2 - 3 * blur])
    assert redrawn.mean() > 10, "the masked half was not redrawn"
    if blur:  # a soft seam: pixels just inside the kept side mix both
        seam = np.abs(out[:, SIZE // 2: SIZE // 2 + blur].astype(np.int16) - image[:, SIZE // 2: SIZE // 2 + blur])
        assert seam.max() > 0


def test_text_to_image_on_an_inpainting_model(inpainting_model, tiny_model) -> None:  # type: ignore[no-untyped-def]
    """No init image: the whole image is "masked" and the masked image is blank, as diffusers' Inpaint pipeline
    does with an all-white mask; the result is a normal image of the requested size."""
    from runtime.server.servicer import model_info

    assert inpainting_model.manifest.model["inpainting"] is True  # the compiler saw the 9-channel UNet
    assert model_info(inpainting_model).inpainting_model and not model_info(tiny_model).inpainting_model
    params = request(inpainting_model, steps=3)
    images, gen = Pipeline(inpainting_model).run(params)
    assert params.mode == "text_to_image" and images[0].shape == (SIZE, SIZE, 3)
    assert gen.unet_extra is not None and gen.unet_extra.shape == (1, 5, SIZE // 8, SIZE // 8)
    assert np.all(gen.unet_extra[:, 0] == 1.0)


def test_seeded_img2img_is_deterministic_and_seed_dependent(tiny_model) -> None:  # type: ignore[no-untyped-def]
    image = png(init_image())
    a = Pipeline(tiny_model).run(request(tiny_model, init_image=image, steps=5))[0][0]
    b = Pipeline(tiny_model).run(request(tiny_model, init_image=image, steps=5))[0][0]
    c = Pipeline(tiny_model).run(request(tiny_model, init_image=image, steps=5, seed=2))[0][0]
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(np.int16) - c).max() > 0


@pytest.mark.parametrize("masked", [False, True])
def test_image_k_of_a_request_is_the_image_of_seed_plus_k(tiny_model, masked) -> None:  # type: ignore[no-untyped-def]
    """Each image of an img2img or inpainting request draws its noise and its posterior sample from its own seed,
    so image k of a two-image request equals a one-image request with seed + k."""
    fields = {"init_image": png(init_image()), "steps": 4}
    if masked:
        fields["mask_image"] = png(left_half_mask())
    pair = Pipeline(tiny_model).run(request(tiny_model, num_images=2, seed=20, **fields))[0]
    for k in range(2):
        alone = Pipeline(tiny_model).run(request(tiny_model, seed=20 + k, **fields))[0][0]
        np.testing.assert_array_equal(pair[k], alone)
    assert np.abs(pair[0].astype(np.int16) - pair[1]).max() > 0
