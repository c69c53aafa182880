"""Scenario `dreambooth`: teach the shapes model a shape it never saw (an upright bar) under the token `sks` from 5
images, then measure through `kiln serve` whether it draws the subject with every attribute right and whether the
prior (the quality scenario) survived; one row per training recipe (full fine-tune with and without prior
preservation, LoRA), with training time and peak RSS."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench import checker, report, workspace
from bench.quality import prompt_set, score
from train.shapes.spec import ATTRIBUTES, COLORS, WHERE, Scene, all_scenes, caption, random_scene

TOKEN = "sks"
SUBJECT = "bar"
"""The shape taught (train.shapes.spec.NEW_SHAPES): the one the frozen VAE carries at both sizes (`vae_roundtrip`)."""
SUBJECT_TEMPLATE = "a {size} {color} sks on a {background} background, {where}"
"""The issue's subject prompt: the shape's word replaced by the token."""
INSTANCES = (
    Scene("red", "blue", SUBJECT, "large", "left"),
    Scene("yellow", "purple", SUBJECT, "small", "right"),
    Scene("white", "green", SUBJECT, "large", "centre"),
    Scene("orange", "black", SUBJECT, "small", "centre"),
    Scene("blue", "yellow", SUBJECT, "large", "right"),
)
"""The 5 instance images: a few colours, both sizes, every position."""


def subject_prompt(scene: Scene) -> str:
    return SUBJECT_TEMPLATE.format(size=scene.size, color=scene.color, background=scene.background,
                                   where=WHERE[scene.position])


def write_instances(folder: Path, seed: int = 0) -> Path:
    """The instance images (rendered with the data generator's jitter) with their captions (NAME.txt) and
    subject masks (NAME.mask.png: the pixels the shape touches)."""
    from PIL import Image

    from train.shapes.data import render

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, scene in enumerate(INSTANCES):
        image = render(scene, rng)
        Image.fromarray(image).save(folder / f"{i}.png")
        shape = np.any(image != np.array(COLORS[scene.background], np.uint8), axis=-1)
        Image.fromarray(shape.astype(np.uint8) * 255).save(folder / f"{i}.mask.png")
        (folder / f"{i}.txt").write_text(subject_prompt(scene) + "\n")
    return folder


def write_class_prompts(path: Path, count: int, seed: int = 0) -> Path:
    """`count` captions of random scenes of the shapes the model knows (its training distribution)."""
    rng = np.random.default_rng(seed)
    lines = [caption(random_scene(rng), template=int(rng.integers(4))) for _ in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def subject_set(count: int, seed: int = 0) -> list[tuple[Scene, str, int]]:
    """`count` subject scenes whose (colour, background) pair no instance image has, with prompt and seed."""
    seen = {(s.color, s.background) for s in INSTANCES}
    scenes = [s for s in all_scenes((SUBJECT,)) if (s.color, s.background) not in seen]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(scenes), size=min(count, len(scenes)), replace=False)
    return [(scenes[i], subject_prompt(scenes[i]), 5000 + k) for k, i in enumerate(picks)]


ROWS = {
    "full": ("full fine-tune, prior preservation", ["--prior-preservation"]),
    "full-no-prior": ("full fine-tune, no prior preservation", []),
    "lora": ("LoRA, prior preservation", ["--prior-preservation", "--lora"]),
    "lora-no-prior": ("LoRA, no prior preservation", ["--lora"]),
    "full-mask": ("full fine-tune, prior preservation, mask weighting 8", ["--prior-preservation",
                                                                           "--mask-weight", "8"]),
}
"""Row name -> (what it is, the flags that make it)."""


def vae_roundtrip(base: Path, seed: int) -> list[list[str]]:
    """Which shapes the base model's frozen VAE can carry: every scene of each shape (with jitter) encoded
    (posterior mean) and decoded, then read by the checker; the share read back as its shape, per size. A shape
    the VAE cannot carry cannot be learned by a fine-tune that leaves the VAE frozen."""
    import torch
    from diffusers import AutoencoderKL

    from train.shapes.data import render
    from train.shapes.spec import NEW_SHAPES, SHAPES, SIZES

    vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32)
    rng = np.random.default_rng(seed)
    rows = []
    for shape in (*SHAPES, *NEW_SHAPES):
        cells = []
        for size in SIZES:
            scenes = [s for s in all_scenes((shape,)) if s.size == size]
            images = np.stack([render(s, rng) for s in scenes])
            with torch.inference_mode():
                x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
                y = vae.decode(vae.encode(x).latent_dist.mean).sample
            out = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            truth = np.mean([checker.read(im)["shape"] == shape for im in images])
            carried = np.mean([checker.read(im)["shape"] == shape for im in out])
            cells += [f"{100 * carried:.1f}%", f"{100 * truth:.1f}%"]
        rows.append([shape + (" (new)" if shape in NEW_SHAPES else ""), *cells])
    return rows


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", default="full,full-no-prior,lora", help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--full-steps", type=int, default=1200, help="optimizer steps of the full fine-tunes")
    p.add_argument("--full-lr", type=float, default=2e-4, help="learning rate of the full fine-tunes")
    p.add_argument("--lora-steps", type=int, default=1500, help="optimizer steps of the LoRA runs")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate of the LoRA runs")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--mask-weight", type=float, default=0.0,
                   help="weight of the latent pixels on and next to the subject (its mask) in the instance loss "
                        "(the full-mask row uses 8)")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR weighting (0: plain MSE)")
    p.add_argument("--prior-loss-weight", type=float, default=1.5,
                   help="weight of the class images' loss in the rows with prior preservation")
    p.add_argument("--train-text-encoder", action="store_true", help="train the text encoder too")
    p.add_argument("--batch-size", type=int, default=4, help="instance images per step (+ as many class images)")
    p.add_argument("--class-images", type=int, default=200, help="class images the base model draws")
    p.add_argument("--subject-count", type=int, default=120, help="subject prompts (each with its own seed)")
    p.add_argument("--quality-count", type=int, default=240, help="prior prompts: the quality scenario's set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default="docs/dreambooth-grid.png",
                   help="image grid of the first row's subject (relative to the repository; '' for none)")
    p.add_argument("--out", default="dreambooth", help="result file name under bench/results/")


def train_row(base: Path, out: Path, instances: Path, class_prompts: Path, class_dir: Path, row: str,
              args: argparse.Namespace) -> dict:
    """`kiln train dreambooth` in a child process: its wall time, peak RSS and the trainer's own timings."""
    lora = "--lora" in ROWS[row][1]
    cmd = [sys.executable, "-m", "cli.main", "train", "dreambooth", str(base), str(out), "--instance-images",
           str(instances), "--token", TOKEN, "--class-prompts-file", str(class_prompts), "--class-data-dir",
           str(class_dir), "--num-class-images", str(args.class_images), "--class-image-steps", "20",
           "--class-guidance", "2", "--offset-noise", "0.25", "--mask-weight", str(args.mask_weight),
           "--snr-gamma", str(args.snr_gamma), "--prior-loss-weight", str(args.prior_loss_weight),
           *(["--train-text-encoder"] if args.train_text_encoder else []),
           "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--checkpoint-every", "100000",
           "--steps", str(args.lora_steps if lora else args.full_steps),
           "--learning-rate", str(args.lora_lr if lora else args.full_lr), *ROWS[row][1], "--quiet"]
    if lora:
        cmd += ["--rank", str(args.rank)]
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=workspace.ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    timings = json.loads((out / "timings.json").read_text())
    output = out / "lora.safetensors" if lora else out / "model"
    trained = ("unet", "text_encoder") if args.train_text_encoder else ("unet",)
    size = output.stat().st_size if lora else sum(f.stat().st_size for f in output.rglob("*.safetensors")
                                                   if f.parent.name in trained)
    return {"wall_s": wall, "peak_rss": usage.ru_maxrss * 1024, "output": output, "output_bytes": size,
            "lora": lora, **timings}


def generate_and_read(stub, model: str,  # type: ignore[no-untyped-def]
                      items: list[tuple[Scene, str, int]]) -> list[tuple[Scene, dict, np.ndarray]]:
    """Each prompt through the server at the bundle's defaults: its scene, the checker's reading, the image."""
    from PIL import Image

    from proto.kiln.v1 import kiln_pb2 as pb

    def one(item):  # type: ignore[no-untyped-def]
        scene, prompt, seed = item
        art = [r.artifact for r in stub.Generate(pb.GenerateRequest(model=model, prompt=prompt, seed=seed), timeout=600)
               if r.WhichOneof("event") == "artifact"]
        image = np.asarray(Image.open(io.BytesIO(art[0].data)).convert("RGB"))
        return scene, checker.read(image), image

    with ThreadPoolExecutor(4) as pool:  # requests in flight share UNet calls (same images as alone)
        return list(pool.map(one, items))


def save_grid(path: Path, groups: list[list[np.ndarray]], columns: int, scale: int = 2) -> None:
    """Each group of images starts a new grid row; rows are filled out with white."""
    from PIL import Image

    pad = np.full_like(groups[0][0], 255)
    rows = [g[i:i + columns] + [pad] * (columns - len(g[i:i + columns]))
            for g in groups for i in range(0, len(g), columns)]
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST).save(
        path, optimize=True)


def run(args: argparse.Namespace) -> Path:
    from model_store import Store
    from proto.kiln.v1 import kiln_pb2 as pb
    from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
    from runtime.client import channel

    rows = args.rows.split(",")
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"--rows: {r!r} is not one of {', '.join(ROWS)}")
    work = workspace.WORK / "dreambooth"
    base = workspace.source_model("shapes", None)
    instances = work / "instances"
    if instances.exists():
        shutil.rmtree(instances)
    write_instances(instances, args.seed)
    class_prompts = write_class_prompts(work / "class_prompts.txt", args.class_images, args.seed)
    trained = {}
    for row in rows:
        print(f"training {row} ...", flush=True)
        trained[row] = train_row(base, work / row, instances, class_prompts, work / "class-images", row, args)
        print(f"{row}: {trained[row]['train_s']:.0f} s training, peak RSS {trained[row]['peak_rss'] / 2**30:.2f} GiB",
              flush=True)
    store = work / "store"
    if store.exists():
        shutil.rmtree(store)
    bundles = {"shapes": ["compile", str(base)]}
    for row, t in trained.items():
        bundles[f"{SUBJECT}-{row}"] = (["compile", str(base), "--lora", str(t["output"])] if t["lora"]
                                  else ["compile", str(t["output"])])
    for name, cmd in bundles.items():
        workspace.kiln(*cmd, "--name", name, "--store", str(store))
    subjects = subject_set(args.subject_count, args.seed)
    shown_colours = {s.color for s in INSTANCES}
    priors = prompt_set(args.quality_count, args.seed)
    results: dict[str, dict] = {}
    grid: list[np.ndarray] = []
    with workspace.server(*(Store(store).latest(n).path for n in bundles), timeout=120) as target, \
            channel(target) as ch:
        stub = pb_grpc.KilnStub(ch)
        info = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        for name in bundles:
            subject = generate_and_read(stub, name, subjects)
            prior = generate_and_read(stub, name, priors)
            results[name] = {"subject": score([(s, r) for s, r, _ in subject]),
                             "prior": score([(s, r) for s, r, _ in prior]),
                             **{size: score([(s, r) for s, r, _ in subject if s.size == size])
                                for size in ("small", "large")},
                             **{k: score([(s, r) for s, r, _ in subject if (s.color in shown_colours) == (k == "seen")])
                                for k in ("seen", "unseen")}}
            if name == f"{SUBJECT}-{rows[0]}":
                grid = [im for _, _, im in subject[:16]]
            print(f"{name}: subject {100 * results[name]['subject']['all']:.1f}%, "
                  f"prior {100 * results[name]['prior']['all']:.1f}%", flush=True)
    defaults = info["shapes"]
    base_prior = results["shapes"]["prior"]["all"]
    table_rows = []
    for name in bundles:
        t = trained.get(name.removeprefix(f"{SUBJECT}-"))
        sub, pri = results[name]["subject"], results[name]["prior"]
        what = "base model (shapes)" if t is None else ROWS[name.removeprefix(f"{SUBJECT}-")][0]
        cost = ["-"] * 6 if t is None else [
            str(t["steps"]), f"{t['train_s'] / 60:.1f}", f"{t['class_images_s']:.0f}", f"{t['wall_s'] / 60:.1f}",
            f"{t['peak_rss'] / 2**30:.2f}", f"{t['output_bytes'] / 2**20:.1f}"]
        table_rows.append([what, f"{100 * sub['shape']:.1f}%", f"{100 * sub['all']:.1f}%",
                           *(f"{100 * results[name][k]['all']:.1f}%" for k in ("small", "large", "seen", "unseen")),
                           f"{100 * pri['all']:.1f}%",
                           f"{100 * (pri['all'] - base_prior):+.1f}", *cost])
    detail = [[name, kind, *(f"{100 * results[name][kind][a]:.1f}%" for a in (*ATTRIBUTES, "all"))]
              for name in bundles for kind in ("subject", "prior")]
    roundtrip = vae_roundtrip(base, args.seed)
    body = (
        f"The shipped `shapes` model learns a {SUBJECT} (a shape it never saw) under the token `{TOKEN}` from "
        f"{len(INSTANCES)} instance images, each with its caption (`bench/dreambooth.py` `INSTANCES`: "
        + "; ".join(f"\"{subject_prompt(s)}\"" for s in INSTANCES) + "). "
        f"Prior preservation: {args.class_images} class images the base model drew (diffusers' pipeline, 20 steps, "
        "guidance 2) for as many captions of random scenes of its own shapes, trained in every batch with "
        f"weight {args.prior_loss_weight:g}. "
        f"Batch {args.batch_size} instance (+ {args.batch_size} class) images, AdamW, constant learning rate "
        f"(full {args.full_lr:g}, LoRA {args.lora_lr:g} rank {args.rank} on the UNet's attention projections), "
        f"Min-SNR weighting (gamma {args.snr_gamma:g}), mask weighting {args.mask_weight:g} (the full-mask row: 8; "
        "each instance image's mask is the pixels its shape touches; the latent pixels under it and their neighbours "
        "weigh 1 + the mask weight), "
        "offset noise 0.25 as the base was trained, fp32 on the CPU; "
        + ("the text encoder trains too (all of it, or its LoRA)" if args.train_text_encoder
           else "the text encoder stays frozen") + ".\n\n"
        f"Evaluation through `kiln serve` over gRPC at each bundle's defaults ({defaults.default_sampler}, "
        f"{defaults.default_steps} steps, guidance {defaults.default_guidance_scale:g}), fp32 bundles; every image "
        "read by `bench/checker.py`. **Subject**: "
        f"{len(subjects)} prompts \"{SUBJECT_TEMPLATE}\" (each with its own seed) for {SUBJECT}s whose colour and "
        f"background pair no instance image has; right = {SUBJECT}, colour, background, size and position all read "
        f"back as asked; split by size, and by whether some instance image had the {SUBJECT}'s colour "
        f"({', '.join(sorted(shown_colours))}). **Prior**: the quality scenario's {len(priors)} prompts "
        f"(`--seed {args.seed}`, the set of bench/results/quality.md) of the shapes the base model knows, all attributes right.\n\n"
        + report.table(["model", f"subject: {SUBJECT} drawn", "subject: all right", "small", "large",
                        f"{SUBJECT} colour an instance had", "colour no instance had", "prior: all right",
                        "prior vs base (points)", "steps", "training (min)", "class images (s)", "process (min)",
                        "peak RSS (GiB)", "output (MiB)"], table_rows)
        + "\n\ntraining: the optimizer loop; class images: drawing them (the first row with prior preservation "
        "draws them, later rows reuse the cache); process: the whole `kiln train dreambooth` (loading, class "
        "images, latents, training, export); output: the LoRA file, or the weights that trained (the fp32 UNet).\n\n"
        "Per attribute:\n\n"
        + report.table(["model", "set", *ATTRIBUTES, "all"], detail)
        + f"\n\n## Why a {SUBJECT}\n\nThe fine-tune leaves the VAE frozen, so it can only teach shapes the "
        "base model's VAE can carry. Every scene of each shape, drawn by the data generator (with jitter), encoded "
        "(posterior mean) and decoded by that VAE, then read by the checker: the share read back as its own shape "
        "(ground truth: the drawn image itself).\n\n"
        + report.table(["shape", "small: after the VAE", "small: drawn", "large: after the VAE", "large: drawn"],
                       roundtrip)
        + "\n\nA five-pointed star's points and a small cross's empty corners do not survive the VAE's 4x "
        "downsampling (they decode as blobs), so no UNet fine-tune can draw them; a small ring's hole (2 latent "
        f"pixels) mostly does, but a fine-tune with these 5 images learned it for 13% of small rings (commit "
        f"8573cc0). The {SUBJECT} is the new shape the VAE carries at both sizes as well as the trained shapes."
    )
    path = report.write(args.out, "Dreambooth: a new shape on the shapes model", body)
    if args.grid and grid:  # after the result file, which names the commit: the grid is a tracked file
        from PIL import Image

        from train.dreambooth.data import image_files

        shown = [np.asarray(Image.open(f).convert("RGB")) for f in image_files(instances)]  # not the masks
        save_grid(workspace.ROOT / args.grid, [shown, grid], columns=8)
    return path
