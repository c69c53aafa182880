"""The `parameters` text chunk of a PNG (AUTOMATIC1111's infotext, which Kiln writes too): read and parse."""

from __future__ import annotations

import io
import re

from PIL import Image, UnidentifiedImageError

_PAIR = re.compile(r'\s*([\w \-/+]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)')


def png_text(data: bytes) -> dict[str, str]:
    """The PNG's (or other image's) text chunks; ValueError when the bytes are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image: {e}") from None


def parse(text: str) -> dict[str, str]:
    """`prompt\\nNegative prompt: n\\nSteps: 4, Sampler: Euler, ...` -> {"Prompt": ..., "Negative prompt": ...,
    "Steps": "4", "Sampler": "Euler", ..., "Size-1": "64", "Size-2": "64"} (AUTOMATIC1111's parse)."""
    lines = text.strip().split("\n")
    out: dict[str, str] = {}
    params = lines.pop() if lines and len(_PAIR.findall(lines[-1])) >= 3 else ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out["Prompt"] = "\n".join(prompt)
    out["Negative prompt"] = "\n".join(negative)
    for key, value in _PAIR.findall(params):
        key, value = key.strip(), value.strip()
        out[key] = value
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
    return out
