"""`kiln models init`: write a diffusers-format SD folder with deterministic random weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"
TOKENIZER_DIR = CONFIGS / "sd-v1" / "tokenizer"
PRETRAINED = Path(__file__).parent / "pretrained"

# arch name -> (unet config folder, vae/text encoder/scheduler config folder); random weights. The UNet's folder
# may hold its own scheduler/ (a variant's prediction type or timestep spacing) and kiln.json (request defaults).
RANDOM_ARCHS: dict[str, tuple[str, str]] = {
    "tiny": ("tiny", "tiny"),
    "sd-v1": ("sd-v1", "sd-v1"),
    # inpainting UNets: 9 input channels (latents, mask, masked-image latents), otherwise the same model
    "tiny-inpainting": ("tiny-inpainting", "tiny"),
    "sd-v1-inpainting": ("sd-v1-inpainting", "sd-v1"),
    # the SD 2.x design at tiny size (OpenCLIP-style text encoder, linear attention projections, "!" padding)
    "tiny-v2": ("tiny-v2", "tiny-v2"),
    "tiny-v2-inpainting": ("tiny-v2-inpainting", "tiny-v2"),
    # SD 2.1 768-v at tiny size: v-prediction, per-block head counts, upcast attention
    "tiny-v2-768": ("tiny-v2-768", "tiny-v2"),
    # real-size SD 2.x (OpenCLIP-H text encoder, 23 layers): 512 base (epsilon), 768-v, and SD-Turbo (the 2.1
    # architecture, distilled for 1-4 steps without guidance; its kiln.json says so)
    "sd-v2": ("sd-v2", "sd-v2"),
    "sd-v2-768": ("sd-v2-768", "sd-v2"),
    "sd-turbo": ("sd-turbo", "sd-v2"),
    # SDXL: two text encoders (CLIP ViT-L, OpenCLIP bigG with projection), text_time added conditioning
    "tiny-sdxl": ("tiny-sdxl", "tiny-sdxl"),
    "sdxl": ("sdxl", "sdxl"),
    "tiny-sdxl-inpainting": ("tiny-sdxl-inpainting", "tiny-sdxl"),
    "sdxl-inpainting": ("sdxl-inpainting", "sdxl"),
    # SDXL-Turbo: the SDXL design at 512 (sample_size 64), distilled for 1-4 steps without guidance
    "sdxl-turbo": ("sdxl-turbo", "sdxl"),
}
TRAINED_ARCHS = ("shapes",)
"""Models Kiln trained itself and ships (fp16 safetensors in `pretrained/NAME/`, tokenizer added on init)."""
ARCHS = (*RANDOM_ARCHS, *TRAINED_ARCHS)

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def init_model(out_dir: str | Path, arch: str, seed: int = 0, progress: bool = True) -> Path:
    """Write a diffusers folder for `arch`: the shipped trained weights (`shapes`), or weights drawn from
    `torch.manual_seed(seed)` (`tiny`, `sd-v1`, `sd-v2`, ...).

    The same (arch, seed) always gives the same weights, so tests and benchmarks can rebuild
    a model instead of downloading one.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not one of: {', '.join(sorted(ARCHS))}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    if arch in TRAINED_ARCHS:
        return _copy_pretrained(arch, out)

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_dir, rest_dir = (CONFIGS / name for name in RANDOM_ARCHS[arch])
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    parts = [
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**_clean(_read(rest_dir / "text_encoder/config.json"))))),
        ("vae", lambda: AutoencoderKL.from_config(_read(rest_dir / "vae/config.json"))),
        ("unet", lambda: UNet2DConditionModel.from_config(_read(unet_dir / "unet/config.json"))),
    ]
    sdxl = (rest_dir / "text_encoder_2").is_dir()
    if sdxl:  # drawn last, so the other parts keep the seeds they would have without it
        parts.append(("text_encoder_2", lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**_clean(_read(rest_dir / "text_encoder_2/config.json"))))))
    for i, (name, build) in enumerate(parts):
        if progress:
            print(f"[{i + 1}/{len(parts)}] {name}: random weights (seed {seed + i})", flush=True)
        torch.manual_seed(seed + i)
        model = build().eval()
        model.save_pretrained(tmp / name, safe_serialization=True)
        del model

    shutil.copytree(TOKENIZER_DIR, tmp / "tokenizer")
    if (rest_dir / "tokenizer").is_dir():  # the family's own settings over CLIP's shared vocabulary
        shutil.copytree(rest_dir / "tokenizer", tmp / "tokenizer", dirs_exist_ok=True)
    if sdxl:  # the second tokenizer: CLIP's vocabulary with OpenCLIP's "!" padding
        shutil.copytree(TOKENIZER_DIR, tmp / "tokenizer_2")
        shutil.copytree(rest_dir / "tokenizer_2", tmp / "tokenizer_2", dirs_exist_ok=True)
    (tmp / "scheduler").mkdir()
    scheduler_dir = unet_dir if (unet_dir / "scheduler").is_dir() else rest_dir
    shutil.copy(scheduler_dir / "scheduler/scheduler_config.json", tmp / "scheduler/scheduler_config.json")
    if (unet_dir / "kiln.json").exists():
        shutil.copy(unet_dir / "kiln.json", tmp / "kiln.json")
    import diffusers

    index = {**(SDXL_MODEL_INDEX if sdxl else MODEL_INDEX), "_diffusers_version": diffusers.__version__}
    if arch.endswith("-inpainting"):
        index["_class_name"] = "StableDiffusionXLInpaintPipeline" if sdxl else "StableDiffusionInpaintPipeline"
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def _copy_pretrained(arch: str, out: Path) -> Path:
    src = PRETRAINED / arch
    if not (src / "model_index.json").exists():
        raise FileNotFoundError(f"the trained {arch!r} weights are not in this checkout ({src})")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.copytree(TOKENIZER_DIR, tmp / "tokenizer")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}
