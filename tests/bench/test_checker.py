"""The quality checker reads the data generator's own images (with jitter) at >= 99%."""

from __future__ import annotations

import numpy as np
import pytest

from bench.checker import read
from train.shapes.data import dataset, render
from train.shapes.spec import ATTRIBUTES, Scene, all_scenes


def test_checker_reads_generated_images() -> None:
    images, scenes = dataset(1500, seed=2024)
    right = {a: 0 for a in ATTRIBUTES}
    for image, scene in zip(images, scenes, strict=True):
        got = read(image)
        for a in ATTRIBUTES:
            right[a] += got[a] == getattr(scene, a)
    for a in ATTRIBUTES:
        assert right[a] / len(scenes) >= 0.99, (a, right[a])


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
