"""The Dreambooth measured case's fixed inputs: instance images that show what their captions and masks say,
a subject set of unseen colour pairs, and the class prompts (the training itself: tests/train/test_dreambooth.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bench import checker
from bench import dreambooth as db
from train.dreambooth.data import captions, image_files
from train.shapes.spec import SHAPES


def test_instance_images_captions_and_masks(tmp_path: Path) -> None:
    folder = db.write_instances(tmp_path / "instances")
    files = image_files(folder)  # the masks are not instance images
    assert [f.name for f in files] == [f"{i}.png" for i in range(len(db.INSTANCES))]
    prompts = captions(files, "", db.TOKEN)
    for f, scene, prompt in zip(files, db.INSTANCES, prompts, strict=True):
        image = np.asarray(Image.open(f).convert("RGB"))
        assert checker.read(image) == scene.as_dict()  # the picture is the scene its caption names
        assert prompt == db.subject_prompt(scene) and f"{scene.color} {db.TOKEN} on a {scene.background}" in prompt
        mask = np.asarray(Image.open(f.with_name(f.stem + ".mask.png"))) > 127
        background = np.all(image == np.array(db.COLORS[scene.background], np.uint8), axis=-1)
        assert np.array_equal(mask, ~background) and 0 < mask.sum() < 64 * 64 // 4


def test_subject_set_holds_only_unseen_colour_pairs_and_is_fixed() -> None:
    items = db.subject_set(120)
    assert len(items) == 120 == len({p for _, p, _ in items}) == len({s for *_, s in items})
    seen = {(s.color, s.background) for s in db.INSTANCES}
    assert all(s.shape == db.SUBJECT and (s.color, s.background) not in seen for s, _, _ in items)
    assert {s.size for s, _, _ in items} == {"small", "large"}
    assert {s.position for s, _, _ in items} == {"left", "centre", "right"}
    assert items == db.subject_set(120)


def test_class_prompts_describe_known_shapes_without_the_token(tmp_path: Path) -> None:
    lines = db.write_class_prompts(tmp_path / "class.txt", 50).read_text().splitlines()
    assert len(lines) == 50 and len(set(lines)) > 40
    assert all(db.TOKEN not in ln.split() and any(s in ln for s in SHAPES) for ln in lines)
