"""Test helpers for "bring your own model": image parity of a bundle against a diffusers pipeline (the LoRA
files come from tests/lora_files.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def diffusers_pipe(folder: Path) -> Any:
    """The folder's diffusers pipeline: StableDiffusionXLPipeline for an SDXL design, else StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if (folder / "text_encoder_2").is_dir():
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kiln_image(bundle: Path, latents: np.ndarray, prompt: str, steps: int = 8, decoder: str = "") -> np.ndarray:
    from model_store import BundleRef, Manifest
    from proto.kiln.v1 import kiln_pb2 as pb
    from runtime.model import load_bundle
    from runtime.pipeline import Pipeline
    from runtime.validate import validate

    model = load_bundle(BundleRef(bundle, Manifest.read(bundle)))
    h, w = latents.shape[2] * 8, latents.shape[3] * 8
    request = pb.GenerateRequest(model=model.manifest.name, prompt=prompt, width=w, height=h, steps=steps,
                                 guidance_scale=7.5, sampler="euler", seed=0, decoder=decoder)
    params = validate(request, model.manifest.defaults, model.manifest.limits, schedule=model.schedule,
                      decoders=tuple(model.manifest.model.get("decoders", {"full": None})))
    images, _ = Pipeline(model).run(params, latents=latents)
    return images[0]


def diffusers_image(pipe: Any, latents: np.ndarray, prompt: str, steps: int = 8) -> np.ndarray:
    import torch
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    h, w = latents.shape[2] * 8, latents.shape[3] * 8
    with torch.inference_mode():
        out = pipe(prompt, height=h, width=w, num_inference_steps=steps, guidance_scale=7.5,
                   latents=torch.from_numpy(latents.copy()), output_type="np").images[0]
    return (out * 255).round().astype(np.uint8)


def assert_images_match(got: np.ndarray, ref: np.ndarray) -> None:
    """The parity bound of tests/runtime/test_diffusers_parity.py: 1/255 mean, 3/255 max."""
    assert got.shape == ref.shape
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() <= 1.0 and diff.max() <= 3, (diff.mean(), diff.max())
    assert ref.std() > 5  # something to compare
