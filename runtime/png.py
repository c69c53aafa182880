"""PNG encoding with the generation parameters in a `parameters` text chunk (the A1111 convention)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

SAMPLER_LABELS = {"euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras",
                  "ddim": "DDIM", "lcm": "LCM", "turbo": "Turbo"}


def parameters_text(
    prompt: str, negative_prompt: str, steps: int, sampler: str, guidance_scale: float, seed: int,
    width: int, height: int, model: str, model_version: str, strength: float | None = None,
    guidance_end: float = 1.0, decoder: str = "full",
) -> str:
    """`prompt\\nNegative prompt: ...\\nSteps: ..., Sampler: ..., CFG scale: ..., Seed: ..., Size: WxH, ...`, with
    `Denoising strength: S` after the size for img2img and inpainting, `CFG end: F` after the CFG scale when
    guidance stopped before the last step (GenerateRequest.guidance_end < 1), and `Decoder: tiny` when the tiny
    decoder drew the image (both are off by default, so written only when set)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(
        f"Steps: {steps}, Sampler: {SAMPLER_LABELS.get(sampler, sampler)}, CFG scale: {guidance_scale:g}, "
        + (f"CFG end: {guidance_end:g}, " if guidance_end < 1.0 else "")
        + f"Seed: {seed}, Size: {width}x{height}, "
        + (f"Denoising strength: {strength:g}, " if strength is not None else "")
        + (f"Decoder: {decoder}, " if decoder != "full" else "")
        + f"Model: {model}, Model version: {model_version}, Generator: kiln"
    )
    return "\n".join(lines)


def encode_png(image: np.ndarray, parameters: str) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes; deterministic (no timestamps)."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info, compress_level=6)
    return buf.getvalue()
