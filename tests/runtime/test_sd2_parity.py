"""SD 2.x against diffusers in all three modes, epsilon and v-prediction, and a turbo request (issue 23).

Tiny models of the SD 2.x design (`kiln models init`): `tiny-v2` (OpenCLIP-style text encoder, "!" padding,
linear attention projections, upcast attention; epsilon), `tiny-v2-768` (as SD 2.1 768-v: per-block head counts,
v-prediction, a larger native size) and `tiny-v2-inpainting` (a 9-channel UNet). Each is compiled once, into one
store; its images must match diffusers' StableDiffusion, Img2Img and Inpaint pipelines on the same folder with the
same latents and noise within 1/255 mean and 3/255 max, as SD v1's do (tests/runtime/test_diffusers_parity.py,
test_image_editing.py). `tiny-v2` compiled with `--preset turbo` serves a turbo request as SD-Turbo's setup does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compiler.source.init import CONFIGS
from proto.kiln.v1 import kiln_pb2 as pb
from runtime.pipeline import Pipeline
from runtime.validate import validate
from tests.runtime.test_image_editing import (
    assert_images_close,
    assert_latents_close,
    init_image,
    left_half_mask,
    png,
    streams,
)

ARCHS = ("tiny-v2", "tiny-v2-768")
TWINS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "turbo": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
}


@dataclass
class Sd2:
    arch: str
    source: Path
    model: object
    """The compiled bundle, loaded as the server loads it."""
    components: dict
    """diffusers' modules of the same folder (pipelines are built from them per test, each with its twin)."""

    @property
    def size(self) -> int:
        return int(self.model.manifest.defaults["width"])  # type: ignore[attr-defined]

    def pipe(self, cls_name: str, sampler: str):  # type: ignore[no-untyped-def]
        import diffusers

        twin, kw = TWINS[sampler]
        scheduler = getattr(diffusers, twin).from_config(dict(self.components["scheduler"].config), **kw)
        pipe = getattr(diffusers, cls_name)(**{**self.components, "scheduler": scheduler})
        pipe.set_progress_bar_config(disable=True)
        return pipe


@pytest.fixture(scope="module")
def sd2_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """Both tiny SD 2.x models, each compiled into one store (sources, store)."""
    from compiler.compile import compile_model
    from compiler.config import CompileConfig
    from compiler.source import init_model

    root = tmp_path_factory.mktemp("sd2")
    sources = {arch: init_model(root / arch, arch, seed=0, progress=False) for arch in ARCHS}
    for arch, source in sources.items():
        compile_model(source, root / "store", CompileConfig(name=arch), progress=False)
    return root / "store", sources


@pytest.fixture(scope="module", params=ARCHS)
def sd2(request: pytest.FixtureRequest, sd2_store: tuple[Path, dict[str, Path]]) -> Sd2:
    from diffusers import StableDiffusionPipeline

    from tests.conftest import load_latest

    store, sources = sd2_store
    ref = StableDiffusionPipeline.from_pretrained(sources[request.param], safety_checker=None,
                                                  requires_safety_checker=False)
    return Sd2(request.param, sources[request.param], load_latest(store, request.param), ref.components)


def test_the_tiny_models_have_the_sd2_features(sd2: Sd2) -> None:
    """What the real SD 2.x configs (compiler/source/configs/sd-v2, sd-v2-768) have, the tiny ones have too."""
    unet = json.loads((sd2.source / "unet/config.json").read_text())
    real = json.loads((CONFIGS / "sd-v2-768/unet/config.json").read_text())
    assert unet["use_linear_projection"] is real["use_linear_projection"] is True
    assert unet["upcast_attention"] is real["upcast_attention"] is True
    m = sd2.model.manifest  # type: ignore[attr-defined]
    assert m.tokenizer["pad_id"] == sd2.components["tokenizer"].pad_token_id == 0  # "!", not <|endoftext|>
    if sd2.arch == "tiny-v2-768":
        assert isinstance(unet["attention_head_dim"], list) and len(set(unet["attention_head_dim"])) > 1
        assert m.scheduler_config["prediction_type"] == "v_prediction"
        assert m.defaults["width"] == m.defaults["height"] == 96  # its UNet's sample_size x 8, as 768 for SD 2.1
    else:
        assert m.scheduler_config.get("prediction_type", "epsilon") == "epsilon"
    # every attention layer fused, upcast or not, whatever its head count (self: Attention, cross: MultiHeadAttention)
    from diffusers.models.attention_processor import Attention

    layers = sum(isinstance(mod, Attention) for mod in sd2.components["unet"].modules())
    ops = m.components["unet"].op_counts
    assert ops.get("Attention", 0) + ops.get("MultiHeadAttention", 0) == layers > 0


def _ancestral_noise(n: int, seed: int = 99):  # type: ignore[no-untyped-def]
    """Kiln's per-image noise_fn drawing what diffusers' text-to-image pipeline draws: one batch per step from
    one generator (the starting latents are given)."""
    g = torch.Generator().manual_seed(seed)
    pending: list[np.ndarray] = []

    def noise_fn(k: int, shape: tuple[int, ...]) -> np.ndarray:
        if k == 0:
            pending[:] = list(torch.randn((n, *shape[1:]), generator=g, dtype=torch.float32).numpy()[:, None])
        return pending[k]

    return noise_fn


@pytest.mark.parametrize(("sampler", "negative", "num_images"), [("euler", "", 1), ("dpmpp_2m_karras", "blurry", 2)])
def test_text_to_image_matches_diffusers(sd2: Sd2, sampler: str, negative: str, num_images: int) -> None:
    prompt, steps, guidance, size = "a red circle on a blue background", 8, 7.5, sd2.size
    latents = np.random.default_rng(5).standard_normal((num_images, 4, size // 8, size // 8), dtype=np.float32)
    with torch.inference_mode():
        ref = sd2.pipe("StableDiffusionPipeline", sampler)(
            [prompt] * num_images, negative_prompt=[negative] * num_images if negative else None, height=size,
            width=size, num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents.copy()),
            generator=torch.Generator().manual_seed(99), output_type="np").images
    m = sd2.model.manifest  # type: ignore[attr-defined]
    request = pb.GenerateRequest(model=m.name, prompt=prompt, negative_prompt=negative, steps=steps,
                                 guidance_scale=guidance, sampler=sampler, num_images=num_images, seed=0)
    params = validate(request, m.defaults, m.limits, schedule=sd2.model.schedule)  # type: ignore[attr-defined]
    images, _ = Pipeline(sd2.model).run(params, latents=latents, noise_fn=_ancestral_noise(num_images))  # type: ignore[arg-type]
    ref = (ref * 255).round().astype(np.uint8)
    assert np.stack(images).shape == ref.shape == (num_images, size, size, 3)
    assert_images_close(np.stack(images), ref)
    assert ref.std() > 5  # not flat: the comparison compares something


@pytest.mark.parametrize(("sampler", "strength"), [("euler", 0.6), ("ddim", 1.0)])
def test_img2img_matches_diffusers(sd2: Sd2, monkeypatch: pytest.MonkeyPatch, sampler: str, strength: float) -> None:
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    steps, guidance, image = 8, 7.5, init_image(sd2.size)
    g_ref, retrieve, noise_fn, encode_noise_fn = streams()
    monkeypatch.setattr(module, "retrieve_latents", retrieve)
    m = sd2.model.manifest  # type: ignore[attr-defined]
    params = validate(pb.GenerateRequest(model=m.name, prompt="a red circle", init_image=png(image), strength=strength,
                                         steps=steps, guidance_scale=guidance, sampler=sampler, seed=1),
                      m.defaults, m.limits, schedule=sd2.model.schedule)  # type: ignore[attr-defined]
    assert params.mode == "img2img" and params.denoising_steps == int(steps * strength)
    with torch.inference_mode():
        ref = sd2.pipe("StableDiffusionImg2ImgPipeline", sampler)(
            params.prompt, image=Image.fromarray(image), strength=strength, num_inference_steps=steps,
            guidance_scale=guidance, generator=g_ref, output_type="np").images[0]
    images, gen = Pipeline(sd2.model).run(params, noise_fn=noise_fn, encode_noise_fn=encode_noise_fn)  # type: ignore[arg-type]
    assert gen.steps_done == params.denoising_steps
    assert_images_close(images[0], (ref * 255).round().astype(np.uint8))


@pytest.mark.parametrize(("sampler", "strength"), [("euler", 1.0), ("euler_a", 0.75)])
def test_inpainting_matches_diffusers(sd2: Sd2, monkeypatch: pytest.MonkeyPatch, sampler: str,
                                      strength: float) -> None:
    """An ordinary (4-channel) SD 2.x UNet: diffusers' Inpaint pipeline blends the noised init latents back in
    after every step. The final latents must match, and so must the image inside the mask (outside it Kiln
    pastes the init image)."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    steps, guidance = 8, 7.5
    image, mask = init_image(sd2.size), left_half_mask(sd2.size)
    g_ref, retrieve, noise_fn, encode_noise_fn = streams()
    monkeypatch.setattr(module, "retrieve_latents", retrieve)
    m = sd2.model.manifest  # type: ignore[attr-defined]
    params = validate(pb.GenerateRequest(model=m.name, prompt="a red circle", init_image=png(image),
                                         mask_image=png(mask), strength=strength, steps=steps, guidance_scale=guidance,
                                         sampler=sampler, seed=1),
                      m.defaults, m.limits, schedule=sd2.model.schedule)  # type: ignore[attr-defined]
    assert params.mode == "inpaint"
    with torch.inference_mode():
        ref = sd2.pipe("StableDiffusionInpaintPipeline", sampler)(
            params.prompt, image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=strength,
            num_inference_steps=steps, guidance_scale=guidance, generator=g_ref, output_type="latent").images
        vae = sd2.components["vae"]
        ref_image = vae.decode(ref / vae.config.scaling_factor).sample
    images, gen = Pipeline(sd2.model).run(params, noise_fn=noise_fn, encode_noise_fn=encode_noise_fn)  # type: ignore[arg-type]
    assert gen.latents is not None
    assert_latents_close(gen.latents, ref.numpy())
    ref_pixels = ((ref_image[0].permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1) * 255).round().astype(np.uint8)
    redraw = mask >= 128
    assert_images_close(images[0], ref_pixels, where=redraw)
    np.testing.assert_array_equal(images[0][~redraw], image[~redraw])


@pytest.fixture(scope="module")
def sd2_inpainting(sd2_store: tuple[Path, dict[str, Path]]) -> Sd2:
    """`tiny-v2-inpainting`: the tiny SD 2.x model with a 9-channel inpainting UNet (as SD 2 inpainting)."""
    from diffusers import StableDiffusionInpaintPipeline

    from compiler.compile import compile_model
    from compiler.config import CompileConfig
    from compiler.source import init_model
    from tests.conftest import load_latest

    store, sources = sd2_store
    source = init_model(store.parent / "tiny-v2-inpainting", "tiny-v2-inpainting", seed=0, progress=False)
    compile_model(source, store, CompileConfig(name="tiny-v2-inpainting"), progress=False)
    ref = StableDiffusionInpaintPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    return Sd2("tiny-v2-inpainting", source, load_latest(store, "tiny-v2-inpainting"), ref.components)


@pytest.mark.parametrize(("sampler", "strength"), [("euler", 1.0), ("ddim", 0.5)])
def test_9_channel_inpainting_matches_diffusers(sd2_inpainting: Sd2, monkeypatch: pytest.MonkeyPatch, sampler: str,
                                                strength: float) -> None:
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    sd2 = sd2_inpainting
    assert sd2.components["unet"].config.in_channels == 9 and sd2.model.manifest.model["inpainting"]  # type: ignore[attr-defined]
    steps, guidance = 8, 7.5
    image, mask = init_image(sd2.size), left_half_mask(sd2.size)
    g_ref, retrieve, noise_fn, encode_noise_fn = streams()
    monkeypatch.setattr(module, "retrieve_latents", retrieve)
    m = sd2.model.manifest  # type: ignore[attr-defined]
    params = validate(pb.GenerateRequest(model=m.name, prompt="a red circle", init_image=png(image),
                                         mask_image=png(mask), strength=strength, steps=steps, guidance_scale=guidance,
                                         sampler=sampler, seed=1),
                      m.defaults, m.limits, schedule=sd2.model.schedule)  # type: ignore[attr-defined]
    with torch.inference_mode():
        ref = sd2.pipe("StableDiffusionInpaintPipeline", sampler)(
            params.prompt, image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=strength,
            num_inference_steps=steps, guidance_scale=guidance, generator=g_ref, output_type="np").images[0]
    images, _ = Pipeline(sd2.model).run(params, noise_fn=noise_fn, encode_noise_fn=encode_noise_fn)  # type: ignore[arg-type]
    redraw = mask >= 128
    assert_images_close(images[0], (ref * 255).round().astype(np.uint8), where=redraw)
    np.testing.assert_array_equal(images[0][~redraw], image[~redraw])


@pytest.fixture(scope="module")
def turbo(sd2_store: tuple[Path, dict[str, Path]]) -> Sd2:
    """tiny-v2 compiled as an SD-Turbo would be (`kiln compile --preset turbo`); its graphs are tiny-v2's."""
    from diffusers import StableDiffusionPipeline

    from compiler.compile import compile_model
    from compiler.config import CompileConfig
    from tests.conftest import load_latest

    store, sources = sd2_store
    compile_model(sources["tiny-v2"], store, CompileConfig(name="tiny-v2-turbo", preset="turbo"), progress=False)
    ref = StableDiffusionPipeline.from_pretrained(sources["tiny-v2"], safety_checker=None, requires_safety_checker=False)
    return Sd2("tiny-v2", sources["tiny-v2"], load_latest(store, "tiny-v2-turbo"), ref.components)


def test_a_turbo_request_is_one_unet_call_without_guidance(turbo: Sd2, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that sets nothing but the prompt takes the turbo bundle's defaults (512x512, 1 step, guidance 0,
    the turbo sampler): one UNet call with one row per image (no unconditional rows), and the images of diffusers'
    SD-Turbo setup (EulerAncestral on trailing timesteps, guidance_scale=0, 1 step) with the same latents and
    noise."""
    m = turbo.model.manifest  # type: ignore[attr-defined]
    assert m.compile_config["preset"] == "turbo" and "reused_exports_from" in m.source
    assert m.defaults == {"width": 512, "height": 512, "steps": 1, "guidance_scale": 0.0, "sampler": "turbo"}
    assert m.limits["min_size"] <= 512 <= m.limits["max_size"]
    n, prompt = 2, "a red circle on a blue background"
    params = validate(pb.GenerateRequest(model=m.name, prompt=prompt, num_images=n, seed=0), m.defaults, m.limits,
                      schedule=turbo.model.schedule)  # type: ignore[attr-defined]
    assert (params.width, params.height, params.steps, params.guidance_scale, params.sampler) == \
        (512, 512, 1, 0.0, "turbo")
    assert not params.guided

    calls: list[dict[str, tuple[int, ...]]] = []
    unet = turbo.model.sessions["unet"]  # type: ignore[attr-defined]

    class Recorded:  # the real session, with its calls' input shapes written down
        def run(self, inputs):  # type: ignore[no-untyped-def]
            calls.append({k: v.shape for k, v in inputs.items()})
            return unet.run(inputs)

    monkeypatch.setitem(turbo.model.sessions, "unet", Recorded())  # type: ignore[attr-defined]
    latents = np.random.default_rng(5).standard_normal((n, 4, 64, 64), dtype=np.float32)
    images, gen = Pipeline(turbo.model).run(params, latents=latents, noise_fn=_ancestral_noise(n))  # type: ignore[arg-type]
    assert len(calls) == 1 and calls[0]["sample"] == (n, 4, 64, 64)
    assert calls[0]["encoder_hidden_states"][0] == n and gen.embeddings is not None and len(gen.embeddings) == n

    pipe = turbo.pipe("StableDiffusionPipeline", "turbo")
    ref_rows: list[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda _, args: ref_rows.append(args[0].shape[0]))
    try:
        with torch.inference_mode():
            ref = pipe([prompt] * n, height=512, width=512, num_inference_steps=1, guidance_scale=0.0,
                       latents=torch.from_numpy(latents.copy()), generator=torch.Generator().manual_seed(99),
                       output_type="np").images
    finally:
        hook.remove()
    assert ref_rows == [n]  # diffusers' twin makes the same single call
    ref = (ref * 255).round().astype(np.uint8)
    assert_images_close(np.stack(images), ref)
    assert ref.std() > 5


def test_a_served_turbo_bundle_answers_with_its_defaults(turbo: Sd2, sd2_store: tuple[Path, dict[str, Path]],
                                                         tmp_path: Path) -> None:
    """A real `kiln serve` over the store: ListModels says each SD 2.x bundle's defaults, and `kiln generate` with
    only a prompt gets a turbo image (512x512, 1 step)."""
    from runtime.client import list_models
    from tests.conftest import kiln, start_server

    server = start_server(sd2_store[0], tmp_path / "serve.log")
    try:
        models = {m.name: m for m in list_models(server.target).models}
        t = models["tiny-v2-turbo"]
        assert (t.default_width, t.default_height, t.default_steps, t.default_guidance_scale, t.default_sampler) == \
            (512, 512, 1, 0.0, "turbo")
        assert (models["tiny-v2-768"].default_width, models["tiny-v2"].default_width) == (96, 64)
        out = tmp_path / "turbo.png"
        r = kiln("generate", "--target", server.target, "--model", "tiny-v2-turbo", "--prompt", "a red circle",
                 "--seed", "3", "--out", str(out), "--quiet")
        assert r.returncode == 0, r.stderr
        assert "512x512, 1 steps, turbo, seed 3" in r.stdout
        assert Image.open(out).size == (512, 512)
    finally:
        assert server.stop() == 0
