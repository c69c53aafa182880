"""The quality checker reads the data generator's own images (with jitter) at >= 99%, rings and stars (Dreambooth
subjects the shapes model never saw) included."""

from __future__ import annotations

import numpy as np
import pytest

from bench.checker import read
from train.shapes.data import dataset, render
from train.shapes.spec import ATTRIBUTES, NEW_SHAPES, SHAPES, Scene, all_scenes, random_scene


def test_checker_reads_generated_images() -> None:
    images, scenes = dataset(1500, seed=2024)
    right = {a: 0 for a in ATTRIBUTES}
    for image, scene in zip(images, scenes, strict=True):
        got = read(image)
        for a in ATTRIBUTES:
            right[a] += got[a] == getattr(scene, a)
    for a in ATTRIBUTES:
        assert right[a] / len(scenes) >= 0.99, (a, right[a])


def test_checker_reads_new_shapes_and_tells_them_from_the_trained_shapes() -> None:
    rng = np.random.default_rng(7)
    right = {a: 0 for a in ATTRIBUTES}
    kinds = SHAPES + NEW_SHAPES
    n = 2000
    for i in range(n):  # every kind equally often, the new ones included, with jitter
        base = random_scene(rng)
        scene = Scene(base.color, base.background, kinds[i % len(kinds)], base.size, base.position)
        got = read(render(scene, rng))
        for a in ATTRIBUTES:
            right[a] += got[a] == getattr(scene, a)
    for a in ATTRIBUTES:
        assert right[a] / n >= 0.99, (a, right[a])
    for scene in all_scenes(NEW_SHAPES)[::5]:
        assert read(render(scene)) == scene.as_dict()


def test_every_scene_without_jitter_reads_exactly() -> None:
    for scene in all_scenes()[::7]:
        assert read(render(scene)) == scene.as_dict()


def test_blank_and_wrong_size_images() -> None:
    blank = np.full((64, 64, 3), (40, 80, 220), np.uint8)
    assert read(blank) == {"background": "blue", "color": None, "shape": None, "size": None, "position": None}
    with pytest.raises(ValueError, match="the checker reads 64x64"):
        read(np.zeros((32, 32, 3), np.uint8))
    # the checker is not fooled into reading a circle as a square
    circle = render(Scene("white", "black", "circle", "large", "centre"))
    assert read(circle)["shape"] == "circle"
