"""What a shapes image can show, and how captions say it. Shared by the data generator and the quality checker."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 50),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
"""The shapes the shapes model is trained on."""
NEW_SHAPES = ("ring", "star", "cross", "bar")
"""Shapes drawn and read (bench/checker.py) but never in the shapes model's training data: subjects for a
fine-tune (Dreambooth) to teach it. The bar is the one the frozen VAE carries at both sizes (a star's points, a
small cross's corners and, less so, a small ring's hole do not survive its encode/decode: `python -m bench
dreambooth` measures each)."""
SIZES = ("small", "large")
POSITIONS = ("left", "centre", "right")

IMAGE_SIZE = 64
SIZE_PX = {"small": 16, "large": 30}
"""Nominal width of the shape in pixels (before jitter)."""
CENTRE_X = {"left": 17, "centre": 32, "right": 47}
CENTRE_Y = 32
ATTRIBUTES = ("background", "color", "shape", "size", "position")


@dataclass(frozen=True)
class Scene:
    color: str
    background: str
    shape: str
    size: str
    position: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES + NEW_SHAPES:
            raise ValueError(f"shape={self.shape!r} is not one of {', '.join(SHAPES + NEW_SHAPES)}")
        if self.color == self.background:
            raise ValueError(f"color={self.color!r} must differ from background")

    def as_dict(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


TEMPLATES = (
    "a {size} {color} {shape} on a {background} background, {where}",
    "a {size} {color} {shape} {where} on a {background} background",
    "{size} {color} {shape}, {background} background, {where}",
    "a {color} {shape}, {size}, {where}, on {background}",
)
NO_POSITION_TEMPLATES = (
    "a {size} {color} {shape} on a {background} background",
    "{size} {color} {shape}, {background} background",
)
WHERE = {"left": "on the left", "centre": "in the centre", "right": "on the right"}


def caption(scene: Scene, template: int = 0, with_position: bool = True) -> str:
    fields = {**scene.as_dict(), "where": WHERE[scene.position]}
    templates = TEMPLATES if with_position else NO_POSITION_TEMPLATES
    return templates[template % len(templates)].format(**fields)


def random_scene(rng: np.random.Generator) -> Scene:
    names = list(COLORS)
    color, background = rng.choice(len(names), size=2, replace=False)
    return Scene(
        color=names[color], background=names[background], shape=SHAPES[rng.integers(len(SHAPES))],
        size=SIZES[rng.integers(len(SIZES))], position=POSITIONS[rng.integers(len(POSITIONS))],
    )


def all_scenes(shapes: tuple[str, ...] = SHAPES) -> list[Scene]:
    return [
        Scene(c, b, s, z, p)
        for c in COLORS for b in COLORS if b != c for s in shapes for z in SIZES for p in POSITIONS
    ]
