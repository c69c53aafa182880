"""Procedural, seeded 64x64 shape images (anti-aliased: drawn at 4x and box-downsampled)."""

from __future__ import annotations

import math

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
    elif scene.shape == "star":
        draw.polygon(star_points(cx, cy, w), fill=fill)
    elif scene.shape == "cross":
        a = w * CROSS_ARM / 2
        draw.rectangle((box[0], cy - a, box[2], cy + a), fill=fill)
        draw.rectangle((cx - a, box[1], cx + a, box[3]), fill=fill)
    elif scene.shape == "bar":
        draw.rectangle((cx - w * BAR_WIDTH / 2, cy - w * BAR_HEIGHT / 2, cx + w * BAR_WIDTH / 2,
                        cy + w * BAR_HEIGHT / 2), fill=fill)  # upright: a wide one would leave the image
    elif scene.shape == "ring":
        draw.ellipse(box, fill=fill)
        r = w / 2 * RING_INNER
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[scene.background])
    else:  # upward equilateral-ish triangle filling the box's width and height
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))


RING_INNER = 0.6
"""Hole / outer diameter of the ring (a band of 0.2 w: 3 px for a small ring, 6 px for a large one)."""
CROSS_ARM = 0.4
"""Arm width / span of the cross (a plus sign: arms 6.4 px wide for a small cross, 12 px for a large one)."""
BAR_WIDTH, BAR_HEIGHT = 0.5, 1.3
"""The upright bar's width and height as shares of the size's nominal width (a small bar is 8 x 21 px, a large one
15 x 39): its mean side is 0.9 of the nominal width, so it reads as the same size as a circle of that size."""
STAR_INNER = 0.382
"""Inner / outer radius of the five-pointed star (a regular pentagram's outline)."""


def star_points(cx: float, cy: float, w: float) -> list[tuple[float, float]]:
    """A five-pointed star, point up, whose bounding box is about w x w centred on (cx, cy): its width is
    1.902 R and its height 1.809 R (R the outer radius), so R = 1.1 w / 2 and the centre moves down 0.05 w."""
    outer = 1.1 * w / 2
    cy += 0.05 * w
    return [(cx + r * math.cos(a), cy + r * math.sin(a))
            for k in range(10)
            for a, r in [(-math.pi / 2 + k * math.pi / 5, outer if k % 2 == 0 else outer * STAR_INNER)]]


def dataset(n: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """`n` random scenes and their images; the same (n, seed) always gives the same data."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(sc, rng) for sc in scenes])
    return images, scenes
