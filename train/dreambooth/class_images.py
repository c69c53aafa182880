"""Class images for prior preservation: drawn by the base model itself for the class prompt with diffusers'
StableDiffusionPipeline (seeded per image; class image i for prompt i mod the prompt count), cached in OUT/class-images/ with `made.json` saying what made them,
so a rerun or a resume reuses them and a changed prompt, count, base model or step count draws them again."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from train.dreambooth.config import DreamboothConfig

MADE = "made.json"


def base_hash(base: Path) -> str:
    """sha256 over the base model's weight files (names and bytes) and its scheduler config."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(base).rglob("*") if p.is_file() and (
        p.suffix in (".safetensors", ".bin") or p.name == "scheduler_config.json"))
    for p in files:
        h.update(str(p.relative_to(base)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def recipe(base: Path, config: DreamboothConfig, size: tuple[int, int]) -> dict:
    """What the class images depend on (written to made.json)."""
    return {"prompts": config.class_prompts(), "count": config.num_class_images, "base_sha256": base_hash(base),
            "steps": config.class_image_steps, "guidance": config.class_guidance, "seed": config.seed,
            "width": size[0], "height": size[1]}


def class_images(base: Path, folder: Path, config: DreamboothConfig, size: tuple[int, int],
                 progress: bool = True) -> tuple[list[Path], list[str]]:
    """The class image files in `folder` and their prompts, drawn now unless made.json says the same recipe
    made them."""
    want = recipe(base, config, size)
    files = [folder / f"{i:04d}.png" for i in range(config.num_class_images)]
    made = folder / MADE
    prompts = [want["prompts"][i % len(want["prompts"])] for i in range(len(files))]
    if made.exists() and json.loads(made.read_text()) == want and all(f.exists() for f in files):
        return files, prompts
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _draw(base, files, prompts, config, size, progress)
    made.write_text(json.dumps(want, indent=2) + "\n")  # last: an interrupted draw is redone
    return files, prompts


BATCH = 16
"""Class images drawn per pipeline call (each with its own seeded generator)."""


def _draw(base: Path, files: list[Path], prompts: list[str], config: DreamboothConfig, size: tuple[int, int],
          progress: bool) -> None:
    import torch
    from diffusers import StableDiffusionPipeline
    from tqdm import tqdm

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(files), desc="class images", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(files), BATCH):
        idx = range(start, min(start + BATCH, len(files)))
        generators = [torch.Generator("cpu").manual_seed(config.seed * 100_003 + i) for i in idx]
        with torch.inference_mode():
            images = pipe([prompts[i] for i in idx], width=size[0], height=size[1], generator=generators,
                          num_inference_steps=config.class_image_steps, guidance_scale=config.class_guidance).images
        for i, image in zip(idx, images, strict=True):
            image.save(files[i])
        bar.update(len(idx))
    bar.close()
