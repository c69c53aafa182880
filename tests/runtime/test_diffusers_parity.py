"""Kiln's runtime against diffusers' StableDiffusionPipeline (PyTorch fp32) on the tiny model.

Same model folder, same initial latents, same scheduler settings (and for ancestral sampling the
same per-step noise): the decoded images must match within 1/255 mean and 3/255 max.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from proto.kiln.v1 import kiln_pb2 as pb
from runtime.pipeline import Pipeline
from runtime.validate import validate

TWINS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "ddim": ("DDIMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "turbo": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
}


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_source: Path):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_source, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.source_scheduler_config = dict(pipe.scheduler.config)  # twins are built from this, never from each other
    return pipe


def test_every_sampler_has_a_twin() -> None:
    from runtime.samplers import SAMPLERS

    assert set(SAMPLERS) == set(TWINS)


@pytest.mark.parametrize("sampler", sorted(TWINS))
@pytest.mark.parametrize(
    ("prompt", "negative", "guidance", "size", "num_images"),
    [
        ("a red circle on a blue background", "", 7.5, (64, 64), 1),
        ("a small green square, on the left", "blurry", 4.0, (80, 72), 2),
        ("no guidance at all", "", 1.0, (64, 64), 1),
    ],
)
def test_images_match_diffusers(diffusers_pipe, tiny_model, sampler, prompt, negative, guidance, size,
                                num_images) -> None:  # type: ignore[no-untyped-def]
    import diffusers
    import torch

    steps = 4 if sampler == "turbo" else 12  # turbo allows 1-4 steps
    width, height = size
    cls_name, kw = TWINS[sampler]
    diffusers_pipe.scheduler = getattr(diffusers, cls_name).from_config(diffusers_pipe.source_scheduler_config, **kw)

    latents = np.random.default_rng(5).standard_normal((num_images, 4, height // 8, width // 8), dtype=np.float32)
    with torch.inference_mode():
        ref = diffusers_pipe(
            [prompt] * num_images, negative_prompt=[negative] * num_images if negative else None,
            height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
            latents=torch.from_numpy(latents.copy()), generator=torch.Generator().manual_seed(99), output_type="np",
        ).images
    ref = (ref * 255).round().astype(np.uint8)

    # diffusers draws ancestral noise for the whole batch from one generator, once per step
    g = torch.Generator().manual_seed(99)
    pending: list[np.ndarray] = []

    def noise_fn(k: int, shape: tuple[int, ...]) -> np.ndarray:
        if k == 0:
            batch = torch.randn((num_images, *shape[1:]), generator=g, dtype=torch.float32).numpy()
            pending[:] = list(batch[:, None])
        return pending[k]

    request = pb.GenerateRequest(model="tiny", prompt=prompt, negative_prompt=negative, width=width, height=height,
                                 steps=steps, guidance_scale=guidance, sampler=sampler, num_images=num_images, seed=0)
    params = validate(request, tiny_model.manifest.defaults, tiny_model.manifest.limits)
    images, gen = Pipeline(tiny_model).run(params, latents=latents, noise_fn=noise_fn)
    assert gen.embeddings.shape[0] == (2 * num_images if guidance > 1 else num_images)

    got = np.stack(images)
    assert got.shape == ref.shape == (num_images, height, width, 3)
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() <= 1.0 and diff.max() <= 3, (diff.mean(), diff.max())
    # the model is random but the images are not flat: the comparison has something to compare
    assert ref.std() > 5


@pytest.mark.parametrize(("guidance_end", "num_images"), [(0.5, 1), (0.25, 2)])
def test_guidance_end_matches_diffusers_dynamic_guidance(diffusers_pipe, tiny_model, guidance_end,
                                                         num_images) -> None:  # type: ignore[no-untyped-def]
    """diffusers' own recipe for guidance on the first part of the schedule (its docs, "dynamic classifier-free
    guidance"): a step-end callback that keeps the conditional embeddings only and sets the scale to 0. Compared on
    the final latents: on the tiny random model the unguided late steps move the decoded image by a few levels
    only, the latents clearly."""
    import diffusers
    import torch

    steps, size, prompt = 12, 64, "a red circle on a blue background"
    guided = int(np.ceil(guidance_end * steps))
    diffusers_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(diffusers_pipe.source_scheduler_config)

    def stop_guidance(pipe, i, t, kwargs):  # type: ignore[no-untyped-def]
        if i == guided - 1:  # runs after step i: steps 0..guided-1 were guided
            pipe._guidance_scale = 0.0
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
        return kwargs

    latents = np.random.default_rng(6).standard_normal((num_images, 4, size // 8, size // 8), dtype=np.float32)
    with torch.inference_mode():
        ref = diffusers_pipe(
            [prompt] * num_images, negative_prompt=["blurry"] * num_images, height=size, width=size,
            num_inference_steps=steps, guidance_scale=7.5, latents=torch.from_numpy(latents.copy()),
            callback_on_step_end=stop_guidance, callback_on_step_end_tensor_inputs=["prompt_embeds"],
            output_type="latent",
        ).images.numpy()

    def kiln(**fields):  # type: ignore[no-untyped-def]
        request = pb.GenerateRequest(model="tiny", prompt=prompt, negative_prompt="blurry", width=size, height=size,
                                     steps=steps, guidance_scale=7.5, sampler="euler", num_images=num_images, seed=0,
                                     **fields)
        params = validate(request, tiny_model.manifest.defaults, tiny_model.manifest.limits)
        _, gen = Pipeline(tiny_model).run(params, latents=latents)
        return params, gen.latents

    params, got = kiln(guidance_end=guidance_end)
    assert params.guided_steps == guided
    _, full = kiln()
    assert np.abs(got - ref).max() < 1e-3, np.abs(got - ref).max()  # measured: 6e-5
    assert np.abs(got - full).max() > 0.2, np.abs(got - full).max()  # measured: 0.26 (0.5) and 1.2 (0.25)
    assert np.array_equal(kiln(guidance_end=1.0)[1], full)
