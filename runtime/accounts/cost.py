"""What a request costs, in credits: the one place the price is decided."""

from __future__ import annotations

import math

BASE_PIXELS = 512 * 512
"""Pixels one credit covers per image."""
BASE_STEPS = 10
"""Sampler steps one credit covers per image."""


def request_cost(width: int, height: int, steps: int, images: int = 1) -> int:
    """Credits for `images` images of `width` x `height` at `steps` steps: one per image up to 512x512 pixels
    and 10 steps, scaled by ceil(pixels / 512²) x ceil(steps / 10).

    >>> request_cost(512, 512, 4), request_cost(768, 768, 20), request_cost(256, 256, 30, images=2)
    (1, 6, 6)
    """
    for name, value in (("width", width), ("height", height), ("steps", steps), ("images", images)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    return images * math.ceil(width * height / BASE_PIXELS) * math.ceil(steps / BASE_STEPS)
