"""`kiln train shapes OUT [--resume]`: VAE first, then the VAE decoder alone, then UNet + text encoder
(v-prediction, caption dropout, EMA, SNR-capped weighting, offset noise, an object-weighted loss with small
shapes oversampled); checkpoints hold optimizer state; a diffusers folder at the end."""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.samplers.schedule import NoiseSchedule
from train.shapes import model as shapes_model
from train.shapes.data import dataset
from train.shapes.spec import COLORS, caption

TOKENIZER_DIR = Path(__file__).parents[2] / "compiler/source/configs/sd-v1/tokenizer"


@dataclass
class TrainConfig:
    seed: int = 0
    """Seeds the data, the weights and every random draw of training."""
    dataset_size: int = 12000
    """Procedural images made once (with jitter); their latents are cached after the VAE phase."""
    vae_steps: int = 700
    """VAE optimizer steps (phase 1)."""
    vae_batch: int = 32
    vae_lr: float = 1e-3
    """Phase 1 peak learning rate (20 warm-up steps, cosine decay to 0; gradients clipped to norm 1). At a
    constant 1e-3 an unclipped run spiked at step ~450 and ended at loss 0.0625; clipped and scheduled: 0.0333."""
    vae_kl_weight: float = 1e-6
    """KL term weight: small, so latents keep detail; the latent scale is normalised afterwards."""
    unet_steps: int = 5500
    """UNet + text encoder optimizer steps (phase 3)."""
    unet_batch: int = 32
    unet_lr: float = 5e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    """Share of captions replaced by "" so the model also learns the unconditional prediction (for CFG)."""
    no_position_captions: float = 0.2
    """Share of captions that leave the position out (the model then picks one)."""
    decoder_steps: int = 1000
    """Phase 2: VAE decoder alone, fine-tuned on the cached latents (sharper edges; the encoder, and so the
    UNet's latent space, stay fixed)."""
    decoder_lr: float = 5e-4
    """Phase 2 peak learning rate (20 warm-up steps, cosine decay to 0)."""
    bf16: bool = True
    """Phase 3's forward passes run under bfloat16 autocast (weights, optimizer and EMA stay fp32), with the
    plain matmul-softmax attention in the UNet (PyTorch's CPU flash attention is slow at this model's 16-wide
    heads): 0.62 s per step against 0.84 s in fp32 with SDPA, in two full runs on one 2-core AVX-512 host
    (train/README.md). Serving is unaffected: the export is the same fp16 diffusers folder."""
    ema_decay: float = 0.998
    """EMA of UNet and text encoder weights (with the usual warm-up); the EMA weights are exported."""
    offset_noise: float = 0.25
    """Std of a per-image, per-channel constant added to the training noise. Without it the SD schedule's
    last step still leaks the latents' mean (the background colour) through the noise, and the model learns
    to read colour from the starting noise instead of from the prompt."""
    min_snr_gamma: float = 5.0
    """Caps the loss weight of low-noise steps: the v-MSE weight is (min(SNR, gamma) + 1) / (SNR + 1), i.e. an
    image-space (x0) MSE weighted min(SNR, gamma) + 1. Like Min-SNR (Hang et al. 2023) it stops nearly clean
    steps from dominating; unlike Min-SNR's min(SNR, gamma) it keeps weight 1 on nearly pure noise, where the
    layout is decided."""
    object_weight: float = 8.0
    """Phase 3: latent pixels on or next to the shape weigh 1 + this in the loss, the background 1 (0 gives the
    plain mean). With the plain loss a small square and a small circle differ in a few corner pixels of a 64x64
    image, a tiny share of the loss, and the model drew both as the same blob."""
    small_share: float = 0.5
    """Phase 3: expected share of each batch drawn from small-shape scenes (half the data are small anyway, but
    they are the hard half; the draw is binomial per batch)."""
    checkpoint_every: int = 200
    """Optimizer steps between checkpoints (each phase)."""

    def __post_init__(self) -> None:
        for name in ("dataset_size", "vae_steps", "vae_batch", "unet_steps", "unet_batch", "checkpoint_every",
                     "decoder_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.object_weight < 0:
            raise ValueError(f"object_weight={self.object_weight} must be at least 0")
        if not 0 <= self.small_share <= 1:
            raise ValueError(f"small_share={self.small_share} must be in [0, 1]")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout={self.caption_dropout} must be in [0, 1)")


class Trainer:
    def __init__(self, out: Path, config: TrainConfig, progress: bool = True):
        import torch

        self.torch = torch
        self.out = out
        self.config = config
        self.progress = progress
        torch.manual_seed(config.seed)
        self.text_encoder, self.vae, self.unet = shapes_model.build()
        if config.bf16:  # see TrainConfig.bf16; the processor holds no weights, the export is unaffected
            from diffusers.models.attention_processor import AttnProcessor

            self.unet.set_attn_processor(AttnProcessor())
        self.ema: dict[str, dict] = {}
        self.state = {"phase": "vae", "step": 0, "losses": {}}
        self.opt_vae = torch.optim.AdamW(self.vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
        params = self.denoiser_params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        """What phase 3 trains (and clips): the UNet's and the text encoder's parameters."""
        self.opt_unet = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
        decoder = list(self.vae.decoder.parameters()) + list(self.vae.post_quant_conv.parameters())
        self.opt_decoder = torch.optim.AdamW(decoder, lr=config.decoder_lr, weight_decay=0.0)
        from transformers import CLIPTokenizerFast

        self.tokenizer = CLIPTokenizerFast.from_pretrained(str(TOKENIZER_DIR))
        # the runtime's own schedule (tested bit-for-bit against diffusers): training and serving agree
        ac = NoiseSchedule.from_config(shapes_model.SCHEDULER_CONFIG).alphas_cumprod()
        self.alphas_cumprod = torch.from_numpy(np.asarray(ac, dtype=np.float32))
        self.rng = np.random.default_rng(config.seed + 1)
        self.decoder_rng = np.random.default_rng(config.seed + 2)
        self.images, self.scenes = dataset(config.dataset_size, config.seed)
        self.latents: torch.Tensor | None = None
        self.scaling_factor = 1.0

    # checkpoints ------------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        tmp = self.checkpoint_path.with_suffix(".tmp")
        self.torch.save({
            "config": asdict(self.config), "scheduler": shapes_model.SCHEDULER_CONFIG, "state": self.state, "rng": self.rng.bit_generator.state,
            "decoder_rng": self.decoder_rng.bit_generator.state, "opt_decoder": self.opt_decoder.state_dict(),
            "torch_rng": self.torch.get_rng_state(),
            "text_encoder": self.text_encoder.state_dict(), "vae": self.vae.state_dict(), "unet": self.unet.state_dict(),
            "ema": self.ema, "opt_vae": self.opt_vae.state_dict(), "opt_unet": self.opt_unet.state_dict(),
            "scaling_factor": self.scaling_factor,
        }, tmp)
        tmp.replace(self.checkpoint_path)

    def load_checkpoint(self) -> None:
        ck = self.torch.load(self.checkpoint_path, weights_only=False)
        if ck["config"] != asdict(self.config):
            raise ValueError(f"{self.checkpoint_path} was made with another config: {ck['config']}")
        if ck.get("scheduler") != shapes_model.SCHEDULER_CONFIG:
            raise ValueError(f"{self.checkpoint_path} was made with another noise schedule: {ck.get('scheduler')}")
        self.state, self.ema, self.scaling_factor = ck["state"], ck["ema"], ck["scaling_factor"]
        self.rng.bit_generator.state = ck["rng"]
        self.decoder_rng.bit_generator.state = ck["decoder_rng"]
        self.opt_decoder.load_state_dict(ck["opt_decoder"])
        self.torch.set_rng_state(ck["torch_rng"])
        for name in ("text_encoder", "vae", "unet"):
            getattr(self, name).load_state_dict(ck[name])
        self.opt_vae.load_state_dict(ck["opt_vae"])
        self.opt_unet.load_state_dict(ck["opt_unet"])

    # phases -------------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        if self.state["phase"] == "vae":
            self.train_vae()
            self.state.update(phase="decoder", step=0)
            self.save_checkpoint()
        self.cache_latents()
        if self.state["phase"] == "decoder":
            self.train_decoder()
            self.state.update(phase="unet", step=0)
            self.save_checkpoint()
        if self.state["phase"] == "unet":
            self.train_unet()
            self.state.update(phase="done", step=0)
            self.save_checkpoint()
        return self.export(self.out / "model")

    def _bar(self, total: int, start: int, desc: str):  # type: ignore[no-untyped-def]
        from tqdm import tqdm

        return tqdm(total=total, initial=start, desc=desc, disable=not self.progress, dynamic_ncols=True)

    def _log(self, phase: str, step: int, loss: float) -> None:
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps({"phase": phase, "step": step, "loss": loss, "time": time.time()}) + "\n")

    def _run_phase(self, key: str, total: int, optimizer, loss_fn, smoothing: float = 0.95,  # type: ignore[no-untyped-def]
                   clip: list | None = None, before_step=None, after_step=None) -> None:  # type: ignore[no-untyped-def]
        """The loop every phase shares: optimizer step, smoothed loss on the bar and in the log, checkpoints."""
        bar = self._bar(total, self.state["step"], key)
        smooth = None
        while self.state["step"] < total:
            step = self.state["step"]
            extra = before_step(step) if before_step else {}
            loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                self.torch.nn.utils.clip_grad_norm_(clip, 1.0, foreach=True)
            optimizer.step()
            if after_step:
                after_step(step)
            self.state["step"] += 1
            smooth = loss.item() if smooth is None else smoothing * smooth + (1 - smoothing) * loss.item()
            self.state["losses"][key] = smooth
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}", **extra)
            if self.state["step"] % 20 == 0:
                self._log(key, self.state["step"], smooth)
            if self.state["step"] % self.config.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()

    def _pixels(self, idx: np.ndarray):  # type: ignore[no-untyped-def]
        return self.torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1

    def train_vae(self) -> None:
        c = self.config
        self.vae.train()

        def loss_fn():  # type: ignore[no-untyped-def]
            x = self._pixels(self.rng.integers(0, len(self.images), c.vae_batch))
            post = self.vae.encode(x).latent_dist
            rec = self.vae.decode(post.sample()).sample
            return (rec - x).abs().mean() + (rec - x).pow(2).mean() + c.vae_kl_weight * post.kl().mean()

        self._run_phase("vae", c.vae_steps, self.opt_vae, loss_fn, clip=list(self.vae.parameters()),
                        before_step=self._cosine(self.opt_vae, c.vae_lr, 20, c.vae_steps))

    def train_decoder(self) -> None:
        c = self.config
        assert self.latents is not None
        self.vae.train()

        def loss_fn():  # type: ignore[no-untyped-def]
            idx = self.decoder_rng.integers(0, len(self.images), c.vae_batch)
            x = self._pixels(idx)
            rec = self.vae.decode(self.latents[self.torch.from_numpy(idx)] / self.scaling_factor).sample
            return (rec - x).abs().mean() + (rec - x).pow(2).mean()

        self._run_phase("vae_decoder", c.decoder_steps, self.opt_decoder, loss_fn,
                        before_step=self._cosine(self.opt_decoder, c.decoder_lr, 20, c.decoder_steps))

    def cache_latents(self) -> None:
        """Encode the dataset once (posterior means) and set the latent scaling factor to 1/std."""
        torch = self.torch
        self.vae.eval()
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(self.images), 256):
                x = torch.from_numpy(self.images[i : i + 256]).permute(0, 3, 1, 2).float() / 127.5 - 1
                chunks.append(self.vae.encode(x).latent_dist.mean)
        latents = torch.cat(chunks)
        self.scaling_factor = float(1.0 / latents.std())
        self.latents = latents * self.scaling_factor

    def _captions(self, idx: np.ndarray, rng: np.random.Generator) -> list[str]:
        c = self.config
        out = []
        for i in idx:
            r = rng.random()
            if r < c.caption_dropout:
                out.append("")
            else:
                with_pos = rng.random() >= c.no_position_captions
                out.append(caption(self.scenes[i], int(rng.integers(4)), with_position=with_pos))
        return out

    def _diffusion_loss(self, idx: np.ndarray, rng: np.random.Generator, pixel_weight=None):  # type: ignore[no-untyped-def]
        """The phase 3 loss on scenes `idx`: v-prediction MSE, weighted per image by (min(SNR, gamma) + 1) /
        (SNR + 1) and, with `pixel_weight` ([B, 1, h, w]), per latent pixel (a weighted mean over the latent)."""
        torch, c = self.torch, self.config
        assert self.latents is not None
        ids = self.tokenizer(self._captions(idx, rng), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        x0 = self.latents[torch.from_numpy(idx)]
        t = torch.from_numpy(rng.integers(0, len(self.alphas_cumprod), len(idx)))
        noise = torch.from_numpy(rng.standard_normal(x0.shape, dtype=np.float32))
        offset = rng.standard_normal((x0.shape[0], x0.shape[1], 1, 1), dtype=np.float32)
        noise = noise + c.offset_noise * torch.from_numpy(offset)
        ac = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
        xt = alpha * x0 + sigma * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.bf16):
            pred = self.unet(xt, t, self.text_encoder(ids).last_hidden_state).sample.float()
        target = alpha * noise - sigma * x0  # v
        snr = ac.view(-1) / (1 - ac.view(-1))
        weight = (torch.clamp(snr, max=c.min_snr_gamma) + 1) / (snr + 1)
        err = (pred - target).pow(2)
        if pixel_weight is None:
            per_image = err.mean(dim=(1, 2, 3))
        else:
            per_image = (err * pixel_weight).sum(dim=(1, 2, 3)) / (pixel_weight.sum(dim=(1, 2, 3)) * err.shape[1])
        return (weight * per_image).mean()

    def _start_ema(self) -> None:
        if not self.ema:
            self.ema = {n: copy.deepcopy(getattr(self, n).state_dict()) for n in ("unet", "text_encoder")}
        self.unet.train()
        self.text_encoder.train()

    def _cosine(self, optimizer, peak: float, warmup: int, total: int):  # type: ignore[no-untyped-def]
        def schedule(step: int) -> dict[str, str]:
            lr = peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
            for g in optimizer.param_groups:
                g["lr"] = lr
            return {"lr": f"{lr:.1e}"}

        return schedule

    def train_unet(self) -> None:
        """Phase 3: the UNet and text encoder from scratch, with shape pixels weighted up and small shapes
        oversampled."""
        c = self.config
        self._start_ema()
        weights = self.object_weights()
        small = np.array([i for i, s in enumerate(self.scenes) if s.size == "small"])

        def loss_fn():  # type: ignore[no-untyped-def]
            n_small = int(self.rng.binomial(c.unet_batch, c.small_share)) if len(small) else 0
            idx = np.concatenate([self.rng.choice(small, n_small),
                                  self.rng.integers(0, len(self.scenes), c.unet_batch - n_small)])
            return self._diffusion_loss(idx, self.rng, weights[self.torch.from_numpy(idx)])

        self._run_phase("unet", c.unet_steps, self.opt_unet, loss_fn, smoothing=0.98, clip=self.denoiser_params,
                        before_step=self._cosine(self.opt_unet, c.unet_lr, c.warmup_steps, c.unet_steps),
                        after_step=self._update_ema)

    def object_weights(self):  # type: ignore[no-untyped-def]
        """[N, 1, h, w] latent-pixel loss weights: 1 + object_weight on latent pixels that hold part of the
        shape or touch one that does, 1 elsewhere. The shape's pixels are those away from the scene's background
        colour (anti-aliased edges included)."""
        torch = self.torch
        assert self.latents is not None
        bg = np.array([COLORS[s.background] for s in self.scenes], dtype=np.int16)[:, None, None, :]
        shape_px = (np.abs(self.images.astype(np.int16) - bg).max(axis=-1) > 24).astype(np.float32)
        factor = self.images.shape[1] // self.latents.shape[-1]
        mask = torch.nn.functional.max_pool2d(torch.from_numpy(shape_px)[:, None], factor)
        mask = torch.nn.functional.max_pool2d(mask, 3, stride=1, padding=1)
        return 1 + self.config.object_weight * mask

    def _update_ema(self, step: int) -> None:
        decay = min(self.config.ema_decay, (1 + step) / (10 + step))
        with self.torch.no_grad():
            for name in ("unet", "text_encoder"):
                live = getattr(self, name).state_dict()
                for k, v in self.ema[name].items():
                    if v.dtype.is_floating_point:
                        v.mul_(decay).add_(live[k], alpha=1 - decay)
                    else:
                        v.copy_(live[k])

    # export -------------------------------------------------------------------------------------------------------
    def export(self, folder: Path, dtype: str = "float16") -> Path:
        """A diffusers folder with EMA weights (fp16 by default), the CLIP tokenizer, the scheduler and `kiln.json`
        (the request defaults the model reads best with)."""
        from compiler.source.init import MODEL_INDEX, PRETRAINED

        torch = self.torch
        if folder.exists():
            shutil.rmtree(folder)
        te, vae, unet = shapes_model.build()
        te.load_state_dict(self.ema.get("text_encoder") or self.text_encoder.state_dict())
        unet.load_state_dict(self.ema.get("unet") or self.unet.state_dict())
        vae.load_state_dict(self.vae.state_dict())
        vae.register_to_config(scaling_factor=self.scaling_factor)
        for name, m in (("text_encoder", te), ("vae", vae), ("unet", unet)):
            m.to(getattr(torch, dtype)).save_pretrained(folder / name, safe_serialization=True)
        shutil.copytree(TOKENIZER_DIR, folder / "tokenizer")
        (folder / "scheduler").mkdir()
        (folder / "scheduler/scheduler_config.json").write_text(json.dumps(shapes_model.SCHEDULER_CONFIG, indent=2))
        (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
        shutil.copy(PRETRAINED / "shapes/kiln.json", folder / "kiln.json")  # the recipe's request defaults
        (folder / "training.json").write_text(json.dumps(
            {"config": asdict(self.config), "final_losses": self.state["losses"]}, indent=2) + "\n")
        return folder


def train(out: str | Path, config: TrainConfig | None = None, resume: bool = False, progress: bool = True) -> Path:
    out = Path(out)
    trainer = Trainer(out, config or TrainConfig(), progress)
    if resume:
        if not trainer.checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {trainer.checkpoint_path}")
        trainer.load_checkpoint()
    elif trainer.checkpoint_path.exists():
        raise FileExistsError(f"{trainer.checkpoint_path} exists: pass --resume to continue, or choose a new folder")
    return trainer.run()
