"""Shapes training: reproducible data, checkpoints that hold optimizer state, and resume == uninterrupted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from train.shapes.data import dataset, render
from train.shapes.spec import Scene, caption
from train.shapes.trainer import TrainConfig, Trainer, train

SMALL = TrainConfig(dataset_size=48, vae_steps=4, vae_batch=4, unet_steps=4, unet_batch=4, decoder_steps=4, checkpoint_every=2,
                    warmup_steps=2)


def test_data_is_seeded_and_captions_say_everything() -> None:
    a, sa = dataset(20, seed=3)
    b, sb = dataset(20, seed=3)
    c, _ = dataset(20, seed=4)
    assert np.array_equal(a, b) and sa == sb and not np.array_equal(a, c)
    assert a.shape == (20, 64, 64, 3) and a.dtype == np.uint8
    scene = Scene("red", "blue", "circle", "large", "left")
    assert caption(scene) == "a large red circle on a blue background, on the left"
    assert caption(scene, with_position=False) == "a large red circle on a blue background"
    img = render(scene)
    assert tuple(img[0, 0]) == (40, 80, 220) and tuple(img[32, 17]) == (220, 40, 40)
    with pytest.raises(ValueError, match="must differ"):
        Scene("red", "red", "circle", "large", "left")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.parent.name}.{k}": v for k, v in load_file(f).items()})
    return out


def _assert_same_weights(a: Path, b: Path) -> dict[str, torch.Tensor]:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    return wa


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted SMALL run's model folder (shared: every resume test compares against it)."""
    return train(tmp_path_factory.mktemp("straight") / "run", SMALL, progress=False)


def test_resume_continues_exactly_where_it_stopped(tmp_path: Path, straight: Path) -> None:

    interrupted = Trainer(tmp_path / "resumed", SMALL, progress=False)
    interrupted.out.mkdir()
    interrupted.train_vae()  # then the process "dies"; the checkpoint from the last save remains
    del interrupted
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(tmp_path / "resumed", SMALL, progress=False)
    resumed = train(tmp_path / "resumed", SMALL, resume=True, progress=False)

    a = _assert_same_weights(straight, resumed)
    assert len(a) > 50 and all(v.dtype == torch.float16 for v in a.values())
    shipped = Path(__file__).parents[2] / "compiler/source/pretrained/shapes/kiln.json"
    assert json.loads((straight / "kiln.json").read_text()) == json.loads(shipped.read_text())
    ck = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert ck["state"]["phase"] == "done" and ck["opt_unet"]["state"]  # optimizer state is in the checkpoint
    assert set(ck["state"]["losses"]) == {"vae", "vae_decoder", "unet"}


def test_resume_inside_the_unet_phase(tmp_path: Path, straight: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    class Killed(Exception):
        pass

    save = Trainer.save_checkpoint

    def save_then_die(self: Trainer) -> None:  # the process dies right after the UNet phase's step-2 checkpoint
        save(self)
        if self.state["phase"] == "unet" and self.state["step"] == 2:
            raise Killed

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(tmp_path / "resumed", SMALL, progress=False)
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    resumed = train(tmp_path / "resumed", SMALL, resume=True, progress=False)
    _assert_same_weights(straight, resumed)


def test_unet_phase_weighs_the_shape_pixels() -> None:
    trainer = Trainer(Path("unused"), SMALL, progress=False)
    trainer.cache_latents()
    w = trainer.object_weights()
    assert w.shape == (48, 1, 16, 16)  # 4x VAE: one weight per latent pixel
    assert set(w.unique().tolist()) == {1.0, 1.0 + SMALL.object_weight}
    for k, scene in enumerate(trainer.scenes):
        on = (w[k, 0] > 1).nonzero()
        ys, xs = on[:, 0], on[:, 1]
        # the shape's box in latent pixels (nominal size + 2 px jitter, anti-aliasing), plus the one-pixel border
        half = ({"small": 16, "large": 30}[scene.size] / 2 + 3) / 4 + 1
        cx = {"left": 17, "centre": 32, "right": 47}[scene.position] / 4
        assert (xs.float() + 0.5 - cx).abs().max() <= half + 0.5 and (ys.float() + 0.5 - 8).abs().max() <= half + 0.5
    small = [k for k, s in enumerate(trainer.scenes) if s.size == "small"]
    large = [k for k, s in enumerate(trainer.scenes) if s.size == "large"]
    assert (w[small] > 1).sum() / len(small) < (w[large] > 1).sum() / len(large)


def test_resume_refuses_another_config(straight: Path) -> None:
    other = TrainConfig(**{**SMALL.__dict__, "unet_lr": 1e-3})
    with pytest.raises(ValueError, match="made with another config"):
        train(straight.parent, other, resume=True, progress=False)  # refused before anything is written


def test_phase_3_runs_under_bf16_autocast_close_to_fp32() -> None:
    """TrainConfig.bf16: the loss is computed in bf16 (so it differs from fp32) but stays within bf16's error."""
    trainer = Trainer(Path("unused"), dataclasses.replace(SMALL), progress=False)  # a copy: the test flips bf16
    trainer.cache_latents()
    idx = np.arange(8)
    losses = {}
    for bf16 in (True, False):
        trainer.config.bf16 = bf16
        with torch.no_grad():
            losses[bf16] = trainer._diffusion_loss(idx, np.random.default_rng(3)).item()
    assert losses[True] != losses[False]
    assert losses[True] == pytest.approx(losses[False], rel=3e-2)
