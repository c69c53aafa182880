"""`kiln train dreambooth` on the tiny model, a few steps at 64x64: class images drawn by the base model and
cached, the prior loss in the total with its weight, resume == uninterrupted bit for bit, the full output
compiled and served, the LoRA output compiled with --lora and equal to diffusers loading the same file, and
bad inputs refused naming what is wrong."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train.dreambooth.class_images import MADE, class_images
from train.dreambooth.config import DreamboothConfig
from train.dreambooth.data import image_files, load_images
from train.dreambooth.trainer import Trainer, train

FULL = DreamboothConfig(instance_prompt="a sks square", class_prompt="a square", prior_preservation=True,
                        num_class_images=2, class_image_steps=3, prior_loss_weight=0.5, steps=4, checkpoint_every=2,
                        learning_rate=1e-3, train_text_encoder=True)
"""Full fine-tune (UNet + text encoder) with prior preservation."""
LORA = dataclasses.replace(FULL, lora=True, rank=4, learning_rate=5e-2)
"""LoRA on the UNet and text encoder; a large learning rate so 4 steps visibly change the picture."""
PROMPT = "a sks square"


def _square(colour: tuple[int, int, int], x: int, size: int = 64) -> Image.Image:
    a = np.full((size, size, 3), 200, np.uint8)
    a[20:44, x:x + 24] = colour
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("instances")
    for i, (colour, x) in enumerate([((220, 40, 40), 8), ((40, 80, 220), 20), ((40, 160, 60), 32)]):
        _square(colour, x).save(d / f"{i}.png")
    (d / "notes.txt").write_text("not an image: ignored")
    return d


@pytest.fixture(scope="module")
def full_run(tiny_source: Path, instances: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FULL, uninterrupted, through the CLI as a user runs it (the flags come from the dataclass)."""
    from tests.conftest import kiln

    out = tmp_path_factory.mktemp("full") / "run"
    r = kiln("train", "dreambooth", str(tiny_source), str(out), "--instance-images", str(instances),
             "--instance-prompt", FULL.instance_prompt, "--class-prompt", FULL.class_prompt, "--prior-preservation",
             "--num-class-images", "2", "--class-image-steps", "3", "--prior-loss-weight", "0.5", "--steps", "4",
             "--checkpoint-every", "2", "--learning-rate", "1e-3", "--train-text-encoder", "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"written to {out / 'model'}" in r.stdout
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_source: Path, instances: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    path = train(tiny_source, out, instances, LORA, progress=False)
    assert path == out / "lora.safetensors"
    return out


def _rows(out: Path) -> list[dict[str, float]]:
    with open(out / "losses.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    files = [out / "lora.safetensors"] if (out / "lora.safetensors").exists() else \
        sorted((out / "model").rglob("*.safetensors"))
    return {f"{f.parent.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


def test_class_images_are_drawn_by_the_base_model_cached_and_redrawn_when_the_recipe_changes(
        full_run: Path, tiny_source: Path, instances: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    folder = full_run / "class-images"
    files = sorted(folder.glob("*.png"))
    assert len(files) == FULL.num_class_images
    made = json.loads((folder / MADE).read_text())
    assert made["prompts"] == ["a square"] and made["count"] == 2 and made["steps"] == 3
    # the base model's own picture for the class prompt, at the file's seed
    pipe = StableDiffusionPipeline.from_pretrained(tiny_source, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(FULL.class_prompt, width=64, height=64, num_inference_steps=3, guidance_scale=FULL.class_guidance,
                generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert np.array_equal(np.asarray(Image.open(files[1]).convert("RGB")), np.asarray(want))

    # a resume of the finished run reuses them (and writes the same model again)
    before = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    weights = _weights(full_run)
    train(tiny_source, full_run, instances, FULL, resume=True, progress=False)
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == before
    after = _weights(full_run)
    assert all(torch.equal(weights[k], after[k]) for k in weights)

    # another prompt or count: drawn again
    copy = tmp_path / "class-images"
    shutil.copytree(folder, copy)
    copied = {f.name: f.stat().st_mtime_ns for f in copy.iterdir()}
    again, prompts = class_images(tiny_source, copy, FULL, (64, 64), progress=False)
    assert {f.name: f.stat().st_mtime_ns for f in copy.iterdir()} == copied  # same recipe: nothing touched
    assert [f.name for f in again] == ["0000.png", "0001.png"] and prompts == ["a square"] * 2
    t0 = (copy / "0000.png").stat().st_mtime_ns
    redrawn, _ = class_images(tiny_source, copy, dataclasses.replace(FULL, class_prompt="a circle"), (64, 64),
                              progress=False)
    assert len(redrawn) == 2 and json.loads((copy / MADE).read_text())["prompts"] == ["a circle"]
    assert (copy / "0000.png").stat().st_mtime_ns != t0
    assert not np.array_equal(np.asarray(Image.open(copy / "0001.png")), np.asarray(Image.open(files[1])))


def test_caption_files_and_a_class_prompt_file_give_each_image_its_prompt(tiny_source: Path, instances: Path,
                                                                         tmp_path: Path) -> None:
    captioned = tmp_path / "captioned"
    shutil.copytree(instances, captioned)
    (captioned / "0.txt").write_text("a red sks square\non the left\n")  # whitespace folds to one line
    (captioned / "2.txt").write_text("a green sks square")
    prompts_file = tmp_path / "class.txt"
    prompts_file.write_text("a square\n\na circle\n")  # blank lines skipped
    shared = tmp_path / "shared-class-images"
    config = dataclasses.replace(FULL, class_prompt="", class_prompts_file=str(prompts_file), num_class_images=3,
                                 class_data_dir=str(shared))
    trainer = Trainer(tiny_source, tmp_path / "run", captioned, config, progress=False)
    assert trainer.instance_prompts == ["a red sks square on the left", FULL.instance_prompt, "a green sks square"]
    trainer.prepare()
    assert [f.name for f in trainer.class_files] == ["0000.png", "0001.png", "0002.png"]
    assert json.loads((shared / MADE).read_text())["prompts"] == ["a square", "a circle"]
    tok = trainer.tokenizer
    def ids(p: str) -> torch.Tensor:
        return tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids[0]
    # every example trains with its own prompt: instance captions, class prompts cycling through the file
    for row, p in zip(trainer.ids["instance"], trainer.instance_prompts, strict=True):
        assert torch.equal(row, ids(p))
    for row, p in zip(trainer.ids["class"], ["a square", "a circle", "a square"], strict=True):
        assert torch.equal(row, ids(p))
    total, instance, prior = trainer.losses()
    assert math.isfinite(total.item()) and prior is not None
    assert trainer.instance_weights is None

    # a mask beside an image (not itself an instance image) weighs the latent pixels it touches, and their
    # neighbours, 1 + mask_weight
    mask = np.zeros((64, 64), np.uint8)
    mask[20:44, 8:32] = 255  # image 0's square: latent rows/columns 2..5 of 8 (8x downsampling), +- 1
    Image.fromarray(mask).save(captioned / "0.mask.png")
    masked = Trainer(tiny_source, tmp_path / "run3", captioned, dataclasses.replace(config, mask_weight=4.0),
                     progress=False)
    assert [f.name for f in masked.instance_files] == ["0.png", "1.png", "2.png"]
    masked.prepare()
    weights = masked.instance_weights
    want = np.ones((3, 8, 8), np.float32)
    want[0, 1:7, 0:5] = 5.0
    assert np.array_equal(weights.numpy(), want)
    assert math.isfinite(masked.losses()[0].item())
    # another run with the same recipe and --class-data-dir reuses the drawn images
    stamps = {f.name: f.stat().st_mtime_ns for f in shared.iterdir()}
    again = Trainer(tiny_source, tmp_path / "run2", captioned, config, progress=False)
    again.prepare()
    assert {f.name: f.stat().st_mtime_ns for f in shared.iterdir()} == stamps
    assert not (tmp_path / "run2" / "class-images").exists()

    # refusals name the file and the problem
    (captioned / "2.txt").write_text("a green square")
    with pytest.raises(ValueError, match=r"2\.txt: caption='a green square' does not contain the token 'sks'"):
        Trainer(tiny_source, tmp_path / "x", captioned, config, progress=False)
    (captioned / "2.txt").unlink()
    with pytest.raises(ValueError, match=r"1\.png has no caption file \(1\.txt\) and no --instance-prompt"):
        Trainer(tiny_source, tmp_path / "x", captioned, dataclasses.replace(config, instance_prompt=""),
                progress=False)
    (captioned / "0.mask.png").unlink()
    with pytest.raises(ValueError, match=r"mask_weight is set but no instance image has a mask \(0\.mask\.png"):
        Trainer(tiny_source, tmp_path / "x", captioned, dataclasses.replace(config, mask_weight=1.0),
                progress=False)
    prompts_file.write_text("a sks square\n")
    with pytest.raises(ValueError, match=r"class\.txt prompt 1='a sks square' contains the token 'sks'"):
        Trainer(tiny_source, tmp_path / "x", captioned, config, progress=False)
    prompts_file.write_text("\n\n")
    with pytest.raises(ValueError, match=r"class\.txt' has no prompts"):
        Trainer(tiny_source, tmp_path / "x", captioned, config, progress=False)
    with pytest.raises(ValueError, match="not both"):
        dataclasses.replace(config, class_prompt="a square")


def test_mask_and_min_snr_weights_enter_each_example_loss() -> None:
    from train.dreambooth.trainer import example_losses

    pred = torch.zeros(2, 4, 2, 2)
    target = torch.zeros(2, 4, 2, 2)
    target[0, :, 0, 0] = 2.0  # example 0: squared error 4 on one of its 4 latent pixels, 0 elsewhere
    target[1] = 1.0  # example 1: squared error 1 everywhere
    snr = torch.tensor([9.0, 0.5])
    assert torch.allclose(example_losses(pred, target, None, snr, 0.0, True), torch.tensor([1.0, 1.0]))
    weights = torch.ones(2, 2, 2)
    weights[0, 0, 0] = 5.0  # the erring pixel weighs 5: (5 x 4) / (5 + 3)
    assert torch.allclose(example_losses(pred, target, weights, snr, 0.0, True), torch.tensor([2.5, 1.0]))
    # Min-SNR, gamma 5: v -> min(SNR, 5) / (SNR + 1), epsilon -> min(SNR, 5) / SNR
    assert torch.allclose(example_losses(pred, target, None, snr, 5.0, True), torch.tensor([0.5, 0.5 / 1.5]))
    assert torch.allclose(example_losses(pred, target, None, snr, 5.0, False), torch.tensor([5 / 9, 1.0]))


def test_the_prior_loss_is_in_the_total_with_its_weight(full_run: Path, tiny_source: Path, instances: Path,
                                                         tmp_path: Path) -> None:
    rows = {}
    for w in (0.0, 2.0):
        out = tmp_path / f"w{w}"
        out.mkdir()
        shutil.copytree(full_run / "class-images", out / "class-images")  # same recipe: reused, not redrawn
        train(tiny_source, out, instances, dataclasses.replace(FULL, prior_loss_weight=w, steps=2), progress=False)
        rows[w] = _rows(out)
    rows[0.5] = _rows(full_run)
    for w, r in rows.items():
        for row in r:
            assert row["prior_loss"] > 0 and math.isclose(row["loss"], row["instance_loss"] + w * row["prior_loss"],
                                                          rel_tol=1e-6), (w, row)
    # step 1: the same weights and draws, so the same two terms, weighted as asked
    first = [r[0] for r in rows.values()]
    assert len({(r["instance_loss"], r["prior_loss"]) for r in first}) == 1
    assert rows[2.0][0]["loss"] > rows[0.5][0]["loss"] > rows[0.0][0]["loss"]
    # the weight changes what is learned: step 2 differs
    assert rows[2.0][1]["instance_loss"] != rows[0.0][1]["instance_loss"]
    # without prior preservation there is no class term
    out = tmp_path / "no-prior"
    train(tiny_source, out, instances, dataclasses.replace(FULL, prior_preservation=False, steps=1), progress=False)
    (row,) = _rows(out)
    assert math.isnan(row["prior_loss"]) and row["loss"] == row["instance_loss"]
    assert not (out / "class-images").exists()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_resume_continues_bit_for_bit(kind: str, full_run: Path, lora_run: Path, tiny_source: Path,
                                      instances: Path, tmp_path: Path) -> None:
    straight, config = (full_run, FULL) if kind == "full" else (lora_run, LORA)
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(straight / "class-images", out / "class-images")  # same recipe: reused (saves drawing them)
    assert train(tiny_source, out, instances, config, progress=False, stop_after=2) is None  # "killed" at step 2
    with open(out / "losses.csv", "a") as f:  # ... after logging a step the checkpoint does not hold
        f.write("3,9.0,9.0,9.0,0.05\n")
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(tiny_source, out, instances, config, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(tiny_source, tmp_path / "elsewhere", instances, config, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"another run config \(differs in: steps\)"):
        train(tiny_source, out, instances, dataclasses.replace(config, steps=5), resume=True, progress=False)
    train(tiny_source, out, instances, config, resume=True, progress=False)
    a, b = _weights(straight), _weights(out)
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _rows(out) == _rows(straight) and len(_rows(out)) == 4
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["state"]["step"] == 4 and ck["optimizer"]["state"] and ck["lr_scheduler"]["last_epoch"] == 4
    if kind == "lora":  # only the adapters train and are checkpointed
        assert all(".lora_" in k for m in ck["weights"].values() for k in m)


def test_full_output_compiles_and_serves(full_run: Path, tiny_source: Path, tmp_path: Path) -> None:
    import io

    import grpc

    from compiler.compile import compile_model
    from compiler.config import CompileConfig
    from proto.kiln.v1 import kiln_pb2 as pb
    from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
    from tests.conftest import start_server

    trained = load_file(str(full_run / "model/unet/diffusion_pytorch_model.safetensors"))
    base = load_file(str(tiny_source / "unet/diffusion_pytorch_model.safetensors"))
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k].float()) for k in base)
    store = tmp_path / "store"
    compile_model(full_run / "model", store, CompileConfig(name="sks"), progress=False)
    server = start_server(store, tmp_path / "serve.log")
    try:
        with grpc.insecure_channel(server.target) as ch:
            events = list(pb_grpc.KilnStub(ch).Generate(
                pb.GenerateRequest(model="sks", prompt=PROMPT, steps=4, seed=3, width=64, height=64), timeout=60))
    finally:
        server.stop()
    image = Image.open(io.BytesIO(events[-1].artifact.data))
    assert image.size == (64, 64) and np.asarray(image).std() > 1


def test_lora_output_compiles_with_lora_and_matches_diffusers_loading_it(lora_run: Path, tiny_source: Path,
                                                                         tmp_path: Path) -> None:
    from compiler.compile import compile_model
    from compiler.config import CompileConfig
    from compiler.source.options import LoraSpec, SourceOptions
    from tests.compiler.byom import assert_images_match, diffusers_image, diffusers_pipe, kiln_image

    path = lora_run / "lora.safetensors"
    sd = load_file(str(path))
    assert sd and all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_")) for k in sd)
    assert {k.rsplit(".", 1)[0].rsplit(".", 1)[-1] for k in sd} >= {"lora_down", "lora_up"}
    assert all(float(v) == LORA.rank for k, v in sd.items() if k.endswith(".alpha"))
    assert any(k.startswith("lora_te_") for k in sd) and any("attn2_to_k" in k for k in sd)
    bundle = compile_model(tiny_source, tmp_path, CompileConfig(name="sks-lora"), progress=False,
                           options=SourceOptions(loras=[LoraSpec(str(path), 1.0)])).path
    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)
    pipe = diffusers_pipe(tiny_source)
    base = diffusers_image(pipe, latents, PROMPT)
    pipe.load_lora_weights(str(path))
    got = kiln_image(bundle, latents, PROMPT)
    assert_images_match(got, diffusers_image(pipe, latents, PROMPT))
    assert np.abs(got.astype(int) - base.astype(int)).mean() > 2  # the trained LoRA changed the picture


def test_bad_inputs_are_refused_naming_the_problem(tiny_source: Path, instances: Path, tmp_path: Path) -> None:
    from tests.conftest import kiln

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty: no images \(files ending in .png"):
        image_files(empty)
    broken = tmp_path / "broken"
    shutil.copytree(instances, broken)
    (broken / "3.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"3\.png: unreadable image"):
        load_images(image_files(broken), 0)
    mixed = tmp_path / "mixed"
    shutil.copytree(instances, mixed)
    _square((0, 0, 0), 4, size=48).save(mixed / "small.png")
    with pytest.raises(ValueError, match=r"different sizes: 48x48 \(small\.png\), 64x64 \(0\.png\); pass "
                                         r"--resolution"):
        load_images(image_files(mixed), 0)
    resized = load_images(image_files(mixed), 32)  # with --resolution every image is resized
    assert resized.shape == (4, 32, 32, 3)
    small = np.asarray(_square((0, 0, 0), 4, size=48).resize((32, 32), Image.Resampling.BICUBIC))
    assert np.array_equal(resized[3], small)

    cases = {
        "instance_prompt without the token": (dict(instance_prompt="a photo of a square"),
                                              r"does not contain the token 'sks'"),
        "another token": (dict(instance_prompt="a sks square", token="zwx"), r"does not contain the token 'zwx'"),
        "prior without class prompt": (dict(class_prompt=""), r"prior_preservation needs a class prompt"),
        "rank 0": (dict(rank=0), r"rank=0 is out of range: allowed 1 to 256"),
        "rank too big": (dict(rank=300), r"rank=300 is out of range: allowed 1 to 256"),
        "resolution": (dict(resolution=60), r"resolution=60 must be 0"),
    }
    for change, message in cases.values():
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(FULL, **change)
    with pytest.raises(ValueError, match=r"rank=64 is out of range for this model: its narrowest UNet attention "
                                         r"projection is 32 wide, so allowed 1 to 32"):
        Trainer(tiny_source, tmp_path / "x", instances, dataclasses.replace(LORA, rank=64), progress=False)
    with pytest.raises(ValueError, match="no images"):
        Trainer(tiny_source, tmp_path / "x", empty, FULL, progress=False)
    with pytest.raises(ValueError, match=r"instances\d*: not a diffusers folder \(no model_index.json\)"):
        Trainer(instances, tmp_path / "x", instances, FULL, progress=False)
    # the CLI says the same, with a non-zero exit and nothing trained
    r = kiln("train", "dreambooth", str(tiny_source), str(tmp_path / "cli"), "--instance-images", str(instances),
             "--instance-prompt", "a photo of a square", "--quiet")
    assert r.returncode == 2 and "does not contain the token 'sks'" in r.stderr, r.stderr
    assert not (tmp_path / "cli").exists()
