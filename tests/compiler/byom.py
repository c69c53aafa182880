"""Test helpers for "bring your own model": real-format LoRA files for the tiny model, and image parity of a
bundle against a diffusers pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def diffusers_pipe(folder: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_layers(folder: Path, seed: int, rank: int = 4, alpha: float = 2.0) -> tuple[dict, dict]:
    """PEFT state dicts (unet, text encoder) of a random LoRA with non-zero up weights, LoCon convs included."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = diffusers_pipe(folder)
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS,
                                       init_lora_weights="gaussian"), pipe.unet)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_TARGETS,
                                       init_lora_weights="gaussian"), pipe.text_encoder)
    for name, p in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)


def write_kohya(folder: Path, out: Path, seed: int, rank: int = 4, alpha: float = 2.0) -> Path:
    """A kohya / AUTOMATIC1111-format LoRA (`lora_unet_*`, `lora_te_*`, `.alpha`), via diffusers' converter."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    unet, text = lora_layers(folder, seed, rank, alpha)
    full = {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.{k}": v for k, v in text.items()}}
    # SD 1.x kohya files name the text encoder `lora_te_text_model_*` (the converter writes SDXL's `lora_te1_`,
    # and transformers 5 dropped the `text_model` level from the module names)
    kohya = {k.replace("lora_te1_encoder_", "lora_te_text_model_encoder_"): v
             for k, v in convert_state_dict_to_kohya(full).items()}
    assert any(k.startswith("lora_unet_") for k in kohya) and any(k.startswith("lora_te_") for k in kohya)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out))
    return out


def write_peft(folder: Path, out_dir: Path, seed: int, rank: int = 4) -> Path:
    """A diffusers / PEFT-format LoRA (`pytorch_lora_weights.safetensors`); alpha = rank (the format's default)."""
    from diffusers import StableDiffusionPipeline

    unet, text = lora_layers(folder, seed, rank, alpha=float(rank))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=unet, text_encoder_lora_layers=text)
    return out_dir / "pytorch_lora_weights.safetensors"


def kiln_image(bundle: Path, latents: np.ndarray, prompt: str, steps: int = 8) -> np.ndarray:
    from model_store import BundleRef, Manifest
    from proto.kiln.v1 import kiln_pb2 as pb
    from runtime.model import load_bundle
    from runtime.pipeline import Pipeline
    from runtime.validate import validate

    model = load_bundle(BundleRef(bundle, Manifest.read(bundle)))
    h, w = latents.shape[2] * 8, latents.shape[3] * 8
    request = pb.GenerateRequest(model=model.manifest.name, prompt=prompt, width=w, height=h, steps=steps,
                                 guidance_scale=7.5, sampler="euler", seed=0)
    params = validate(request, model.manifest.defaults, model.manifest.limits)
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
