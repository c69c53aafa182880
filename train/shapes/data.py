"""Procedural, seeded 64x64 shape images (anti-aliased: drawn at 4x and box-downsampled)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from train.shapes.spec import CENTRE_X, CENTRE_Y, COLORS, IMAGE_SIZE, SIZE_PX, Scene, random_scene

SUPERSAMPLE = 4


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 [64, 64, 3]. With `rng`, position jitters by up to 2 px and size by up to 2 px."""
    jx, jy, js = (rng.integers(-2, 3, size=3) if rng is not None else (0, 0, 0))
    s = SUPERSAMPLE
    img = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    w = (SIZE_PX[scene.size] + js) * s
    cx, cy = (CENTRE_X[scene.position] + jx) * s, (CENTRE_Y + jy) * s
    box = (cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2)
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upward equilateral-ish triangle filling the box's width and height
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))


def dataset(n: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """`n` random scenes and their images; the same (n, seed) always gives the same data."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(sc, rng) for sc in scenes])
    return images, scenes
