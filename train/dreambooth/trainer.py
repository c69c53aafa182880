"""The Dreambooth loop: latents cached once (VAE frozen), instance and class examples in the same batch,
loss = instance MSE + prior_loss_weight x class MSE, checkpoints that resume bit-for-bit, a CSV of the losses,
and the output (a diffusers folder, or one kohya LoRA file)."""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from train.dreambooth import lora
from train.dreambooth.class_images import class_images
from train.dreambooth.config import DreamboothConfig
from train.dreambooth.data import captions, image_files, load_images, load_masks, to_pixels

CSV_FIELDS = ("step", "loss", "instance_loss", "prior_loss", "lr")


def run_config(base: Path, instance_files: list[Path], config: DreamboothConfig) -> dict:
    """What a checkpoint must have been made with to be resumed: the config, the base model, the image names."""
    return {**asdict(config), "base": str(Path(base).resolve()), "instance_images": [f.name for f in instance_files]}


def check_same_run(checkpoint: Path, made_with: dict, now: dict) -> None:
    if made_with != now:
        changed = sorted(k for k in {*made_with, *now} if made_with.get(k) != now.get(k))
        raise ValueError(f"{checkpoint} was made with another run config (differs in: {', '.join(changed)}); "
                         "resume with the same flags, or choose a new folder")


def example_losses(pred, target, pixel_weights, snr, snr_gamma: float, v_prediction: bool):  # type: ignore[no-untyped-def]
    """[B] losses: the squared error averaged over channels, then a mean over latent pixels weighted by
    `pixel_weights` ([B, h, w] or None: equal), then with `snr_gamma` times Min-SNR's min(SNR, gamma) / SNR
    (epsilon) or / (SNR + 1) (v)."""
    import torch

    se = torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=1)  # [B, h, w]
    if pixel_weights is None:
        out = se.mean(dim=(1, 2))
    else:
        out = (se * pixel_weights).sum(dim=(1, 2)) / pixel_weights.sum(dim=(1, 2))
    if snr_gamma:
        out = out * torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_prediction else snr)
    return out


class Trainer:
    def __init__(self, base: Path, out: Path, instance_images: Path, config: DreamboothConfig,
                 progress: bool = True, device: str | None = None):
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.torch = torch
        self.base, self.out, self.config, self.progress = Path(base), Path(out), config, progress
        if not (self.base / "model_index.json").is_file():
            raise ValueError(f"{base}: not a diffusers folder (no model_index.json); kiln train dreambooth takes "
                             "an SD 1.x / 2.x diffusers folder (kiln models init writes one)")
        if (self.base / "text_encoder_2").is_dir():
            raise ValueError(f"{base}: an SDXL model; kiln train dreambooth takes SD 1.x / 2.x diffusers folders")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.amp_dtype = self._amp_dtype()
        # the instance images are checked before anything slow happens
        self.instance_files = image_files(instance_images)
        self.instance_prompts = captions(self.instance_files, config.instance_prompt, config.token)
        self.instance_images = load_images(self.instance_files, config.resolution)
        if config.prior_preservation:
            config.class_prompts()  # a bad prompt file fails here, before anything slow
        if config.mask_weight:
            load_masks(self.instance_files, self.size)  # as does a missing or unreadable mask
        torch.manual_seed(config.seed)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.base / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(self.base / "text_encoder", torch_dtype=torch.float32)
        self.vae = AutoencoderKL.from_pretrained(self.base / "vae", torch_dtype=torch.float32)
        self.unet = UNet2DConditionModel.from_pretrained(self.base / "unet", torch_dtype=torch.float32)
        self.noise_scheduler = DDPMScheduler.from_pretrained(self.base / "scheduler")
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(config.train_text_encoder and not config.lora)
        self.unet.requires_grad_(not config.lora)
        if config.lora:
            lora.add(self.unet, lora.UNET_TARGETS, config.rank, "UNet")
            if config.train_text_encoder:
                lora.add(self.text_encoder, lora.TEXT_TARGETS, config.rank, "text encoder")
        self.modules = {"unet": self.unet}
        """The modules that train (their trainable parameters go to the optimizer and the checkpoints)."""
        if config.train_text_encoder:
            self.modules["text_encoder"] = self.text_encoder
        parts: list[Any] = [self.text_encoder, self.vae, self.unet]
        for m in parts:
            m.to(self.device)
        self.params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=1e-2)
        warmup = config.lr_warmup_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        """Draws the noise and the timesteps (on CPU, so a run is the same wherever it trains)."""
        self.rng = np.random.default_rng(config.seed)
        """Draws the data order."""
        self.state: dict[str, Any] = {"step": 0, "order": [], "class_order": []}
        """The step and what is left of the current epochs' image orders."""

    def _amp_dtype(self):  # type: ignore[no-untyped-def]
        torch, mode = self.torch, self.config.mixed_precision
        if mode == "bf16":
            return torch.bfloat16
        if mode == "fp16" and self.device.type != "cuda":
            raise ValueError("mixed_precision='fp16' needs a CUDA GPU (this run is on the CPU): use bf16 or no")
        if mode == "no" or self.device.type != "cuda":
            return None
        if mode == "auto" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16

    # data ---------------------------------------------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every training image."""
        return self.instance_images.shape[2], self.instance_images.shape[1]

    def prepare(self) -> None:
        """Class images (drawn or reused), latents (VAE posterior means x scaling factor) and prompt ids."""
        torch, c = self.torch, self.config
        F = torch.nn.functional
        self.class_files: list[Path] = []
        self.class_latents = None
        self.class_images_s = 0.0
        """Seconds spent drawing (or finding cached) class images."""
        prompts = {"instance": self.instance_prompts, "class": []}
        if c.prior_preservation:
            folder = Path(c.class_data_dir) if c.class_data_dir else self.out / "class-images"
            started = time.perf_counter()
            self.class_files, prompts["class"] = class_images(self.base, folder, c, self.size, self.progress)
            self.class_images_s = time.perf_counter() - started
            self.class_latents = self._encode(load_images(self.class_files, 0))
        self.instance_latents = self._encode(self.instance_images)
        self.instance_weights = None
        """[N, h, w] per latent pixel loss weights of the instance images (with --mask-weight)."""
        if c.mask_weight:
            masks = torch.from_numpy(load_masks(self.instance_files, self.size)).float()[:, None]
            h, w = self.instance_latents.shape[-2:]
            touched = F.adaptive_max_pool2d(masks, (h, w))  # a latent pixel any mask pixel falls in
            near = F.max_pool2d(touched, 3, stride=1, padding=1)  # and its neighbours
            self.instance_weights = (1 + c.mask_weight * near[:, 0]).to(self.device)
        self.ids = {kind: self.tokenizer(p, padding="max_length", max_length=self.tokenizer.model_max_length,
                                         truncation=True, return_tensors="pt").input_ids.to(self.device)
                    for kind, p in prompts.items() if p}
        """Token ids per example, [N, 77] for the instance images and the class images."""
        self.embeddings = {}
        if not c.train_text_encoder:  # a frozen text encoder: its outputs are cached too
            with torch.inference_mode():
                self.embeddings = {k: torch.cat([self.text_encoder(v[i:i + 64]).last_hidden_state
                                                 for i in range(0, len(v), 64)]).clone()
                                   for k, v in self.ids.items()}

    def _encode(self, images: np.ndarray):  # type: ignore[no-untyped-def]
        torch = self.torch
        scale = self.vae.config.scaling_factor
        with torch.inference_mode():
            chunks = [self.vae.encode(to_pixels(images[i:i + 16]).to(self.device)).latent_dist.mean * scale
                      for i in range(0, len(images), 16)]
        return torch.cat(chunks).clone()

    def _take(self, key: str, n: int, count: int) -> list[int]:
        """The next `count` indices of a shuffled pass over `n` items (a new permutation when one runs out)."""
        out: list[int] = []
        while len(out) < count:
            if not self.state[key]:
                self.state[key] = self.rng.permutation(n).tolist()
            out.append(self.state[key].pop(0))
        return out

    # the step -----------------------------------------------------------------------------------------------------
    def losses(self):  # type: ignore[no-untyped-def]
        """(total, instance MSE, class MSE or None) on the next batch."""
        torch, c = self.torch, self.config
        b = c.batch_size
        picks = {"instance": self._take("order", len(self.instance_latents), b)}
        latents = self.instance_latents[picks["instance"]]
        if self.class_latents is not None:
            picks["class"] = self._take("class_order", len(self.class_latents), b)
            latents = torch.cat([latents, self.class_latents[picks["class"]]])
        noise = torch.randn(latents.shape, generator=self.generator)
        if c.offset_noise:
            noise = noise + c.offset_noise * torch.randn(latents.shape[:2] + (1, 1), generator=self.generator)
        noise = noise.to(self.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),),
                          generator=self.generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.embeddings:
            states = torch.cat([self.embeddings[k][i] for k, i in picks.items()])
        else:
            ids = torch.cat([self.ids[k][i] for k, i in picks.items()])
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            if not self.embeddings:
                states = self.text_encoder(ids).last_hidden_state
            pred = self.unet(noisy, t, states).sample.float()
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"{self.base}/scheduler: prediction_type={kind!r}; allowed epsilon, v_prediction")
        weights = None
        if self.instance_weights is not None:  # class images weigh every latent pixel 1
            weights = self.instance_weights[picks["instance"]]
            weights = torch.cat([weights, torch.ones((len(latents) - b, *weights.shape[1:]), device=self.device)])
        ac = self.noise_scheduler.alphas_cumprod.to(self.device)[t]
        per_example = example_losses(pred, target, weights, ac / (1 - ac), c.snr_gamma, kind == "v_prediction")
        instance = per_example[:b].mean()
        prior = per_example[b:].mean() if "class" in picks else None
        total = instance + c.prior_loss_weight * prior if prior is not None else instance
        return total, instance, prior

    def step(self) -> dict[str, float]:
        torch, c = self.torch, self.config
        total, instance, prior = self.losses()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.lr_scheduler.get_last_lr()[0]
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
            self.optimizer.step()
        self.lr_scheduler.step()
        self.state["step"] += 1
        return {"step": self.state["step"], "loss": total.item(), "instance_loss": instance.item(),
                "prior_loss": prior.item() if prior is not None else float("nan"), "lr": lr}

    # checkpoints --------------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _run_config(self) -> dict:
        return run_config(self.base, self.instance_files, self.config)

    def save_checkpoint(self) -> None:
        torch = self.torch
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save({
            "config": self._run_config(), "state": self.state,
            "weights": {name: {k: p.detach().cpu().clone() for k, p in m.named_parameters() if p.requires_grad}
                        for name, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "generator": self.generator.get_state(), "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }, tmp)
        tmp.replace(self.checkpoint_path)

    def load_checkpoint(self) -> None:
        torch = self.torch
        ck = torch.load(self.checkpoint_path, weights_only=False)
        check_same_run(self.checkpoint_path, ck["config"], self._run_config())
        with torch.no_grad():
            for name, m in self.modules.items():
                params = dict(m.named_parameters())
                for k, v in ck["weights"][name].items():
                    params[k].copy_(v)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.lr_scheduler.load_state_dict(ck["lr_scheduler"])
        if self.scaler is not None and ck["scaler"] is not None:
            self.scaler.load_state_dict(ck["scaler"])
        self.generator.set_state(ck["generator"])
        self.rng.bit_generator.state = ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        if ck["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        self.state = ck["state"]

    # the run ------------------------------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> Path | None:
        """Train to `config.steps` (or stop after step `stop_after`, with a checkpoint there: how tests and
        impatient people interrupt a run), then export. Returns the output (None when stopped early)."""
        from tqdm import tqdm

        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(self._run_config(), indent=2) + "\n")
        started = time.perf_counter()
        self.prepare()
        prepared = time.perf_counter()
        first_step = self.state["step"]
        for m in self.modules.values():
            m.train()
        log = self.out / "losses.csv"
        if self.state["step"] == 0 or not log.exists():
            with open(log, "w", newline="") as f:
                csv.writer(f).writerow(CSV_FIELDS)
        else:  # resumed: drop rows logged after the checkpoint, so the log matches the weights
            with open(log, newline="") as f:
                rows = list(csv.reader(f))
            with open(log, "w", newline="") as f:
                csv.writer(f).writerows([rows[0], *[r for r in rows[1:] if int(r[0]) <= self.state["step"]]])
        bar = tqdm(total=c.steps, initial=self.state["step"], desc="dreambooth", disable=not self.progress,
                   dynamic_ncols=True)
        while self.state["step"] < c.steps:
            row = self.step()
            with open(log, "a", newline="") as f:
                csv.writer(f).writerow([row[k] for k in CSV_FIELDS])
            bar.update(1)
            shown = {"loss": f"{row['loss']:.4f}", "instance": f"{row['instance_loss']:.4f}"}
            if self.class_latents is not None:
                shown["prior"] = f"{row['prior_loss']:.4f}"
            bar.set_postfix(shown)
            step = self.state["step"]
            if step % c.checkpoint_every == 0 or step == c.steps or step == stop_after:
                self.save_checkpoint()
            if step == stop_after:
                bar.close()
                return None
        bar.close()
        looped = time.perf_counter()
        path = self.export()
        (self.out / "timings.json").write_text(json.dumps({
            "class_images_s": self.class_images_s, "prepare_s": prepared - started, "train_s": looped - prepared, "export_s": time.perf_counter() - looped,
            "steps": self.state["step"] - first_step, "device": self.device.type,
            "mixed_precision": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32",
        }, indent=2) + "\n")
        return path

    # output -------------------------------------------------------------------------------------------------------
    def export(self) -> Path:
        """LoRA: OUT/lora.safetensors (kohya format). Full: OUT/model, the base folder with the trained UNet (and
        text encoder) in fp32 safetensors, which `kiln compile` takes as it is."""
        if self.config.lora:
            te = self.text_encoder if self.config.train_text_encoder else None
            return lora.export(self.unet, te, self.out / "lora.safetensors")
        folder = self.out / "model"
        tmp = self.out / "model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(self.base, tmp, ignore=shutil.ignore_patterns(*self.modules))
        for name, m in self.modules.items():
            m.to("cpu").save_pretrained(tmp / name, safe_serialization=True)
            m.to(self.device)
        (tmp / "training.json").write_text(json.dumps(
            {"kind": "dreambooth", "config": self._run_config(), "steps": self.state["step"]}, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
        return folder


def train(base: str | Path, out: str | Path, instance_images: str | Path, config: DreamboothConfig,
          resume: bool = False, progress: bool = True, stop_after: int | None = None) -> Path | None:
    """Run (or with `resume` continue) a Dreambooth fine-tune; returns the output file or folder."""
    checkpoint = Path(out) / "checkpoint.pt"  # checked before the models load
    if resume and not checkpoint.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
    if not resume and checkpoint.exists():
        raise FileExistsError(f"{checkpoint} exists: pass --resume to continue, or choose a new folder")
    if resume:  # a checkpoint of another run is refused before the models load (load_checkpoint checks again)
        import torch

        made_with = torch.load(checkpoint, weights_only=False)["config"]
        check_same_run(checkpoint, made_with, run_config(Path(base), image_files(Path(instance_images)), config))
    trainer = Trainer(Path(base), Path(out), Path(instance_images), config, progress)
    if resume:
        trainer.load_checkpoint()
    return trainer.run(stop_after)
