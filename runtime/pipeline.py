"""Text-to-image in named, timed stages, as numpy over model sessions.

1. validate (runtime.validate)  2. tokenize  3. text encode  4. prepare timesteps and latents
5. denoise (one UNet call per step, guidance in the same batch)  6. VAE decode  7. encode PNG

A `Generation` holds one request's state between stages, so the engine can interleave requests
step by step; `Pipeline.run` chains the stages for callers that want one image directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from runtime.model import LoadedModel
from runtime.png import encode_png, parameters_text
from runtime.samplers import Sampler, make_sampler
from runtime.tokenizer import Tokenized
from runtime.validate import GenerationParams

NoiseFn = Callable[[int, tuple[int, ...]], np.ndarray]
"""(image index, shape) -> standard-normal float32 noise for that image."""


@dataclass(frozen=True)
class Truncation:
    field: str
    kept_tokens: int
    dropped_tokens: int
    dropped_text: str


@dataclass
class Generation:
    """One request's state as it moves through the stages."""

    params: GenerationParams
    model: LoadedModel
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    tokens: list[Tokenized] = field(default_factory=list)
    """[negative, positive] when guided, else [positive]."""
    embeddings: np.ndarray | None = None
    sampler: Sampler | None = None
    latents: np.ndarray | None = None
    noise_fn: NoiseFn | None = None
    step: int = 0
    """Denoising steps done."""

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    @property
    def denoised(self) -> bool:
        return self.sampler is not None and self.step >= self.sampler.num_steps

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class Pipeline:
    def __init__(self, model: LoadedModel):
        self.model = model
        self.m = model.manifest.model

    # 2. tokenize
    def tokenize(self, gen: Generation) -> list[Truncation]:
        p = gen.params
        with gen.timed("tokenize"):
            fields = [("negative_prompt", p.negative_prompt)] if p.guided else []
            fields.append(("prompt", p.prompt))
            gen.tokens = [self.model.tokenizer(text) for _, text in fields]
        return [
            Truncation(name, t.kept_tokens, t.dropped_tokens, t.dropped_text)
            for (name, _), t in zip(fields, gen.tokens, strict=False)
            if t.dropped_tokens
        ]

    # 3. text encode: negative and positive prompt in one batch
    def encode_text(self, gen: Generation) -> None:
        with gen.timed("text_encode"):
            ids = np.stack([t.ids for t in gen.tokens])
            hidden = self.model.sessions["text_encoder"].run({"input_ids": ids})["last_hidden_state"]
            n = gen.params.num_images
            # [uncond x n, cond x n]: the UNet batch layout, images in order within each half
            gen.embeddings = np.repeat(hidden, n, axis=0).astype(np.float32)

    # 4. prepare timesteps and initial latents
    def prepare(self, gen: Generation, latents: np.ndarray | None = None, noise_fn: NoiseFn | None = None) -> None:
        p = gen.params
        with gen.timed("prepare"):
            gen.sampler = make_sampler(p.sampler, self.model.schedule, p.steps)
            f = self.m["vae_scale_factor"]
            shape = (1, self.m["latent_channels"], p.height // f, p.width // f)
            if noise_fn is None:
                rngs = [np.random.Generator(np.random.PCG64(p.image_seed(k))) for k in range(p.num_images)]

                def noise_fn(k: int, s: tuple[int, ...]) -> np.ndarray:
                    return rngs[k].standard_normal(s, dtype=np.float32)

            gen.noise_fn = noise_fn
            if latents is None:
                latents = np.concatenate([noise_fn(k, shape) for k in range(p.num_images)])
            gen.latents = (latents * np.float32(gen.sampler.init_noise_sigma)).astype(np.float32)

    # 5. denoise: one UNet call for this request's images (and their unconditional twins)
    def unet_inputs(self, gen: Generation) -> dict[str, np.ndarray]:
        assert gen.sampler is not None and gen.latents is not None and gen.embeddings is not None
        x = gen.sampler.scale_model_input(gen.latents, gen.step)
        if gen.params.guided:
            x = np.concatenate([x, x])
        t = np.full((x.shape[0],), gen.sampler.timesteps[gen.step], dtype=np.float32)
        return {"sample": x.astype(np.float32), "timestep": t, "encoder_hidden_states": gen.embeddings}

    def apply_unet_output(self, gen: Generation, out: np.ndarray) -> None:
        assert gen.sampler is not None and gen.latents is not None and gen.noise_fn is not None
        if gen.params.guided:
            uncond, cond = np.split(out, 2)
            out = uncond + np.float32(gen.params.guidance_scale) * (cond - uncond)
        noise = None
        if gen.sampler.needs_noise:
            shape = (1, *gen.latents.shape[1:])
            noise = np.concatenate([gen.noise_fn(k, shape) for k in range(gen.params.num_images)])
        gen.latents = gen.sampler.step(out, gen.step, gen.latents, noise)
        gen.step += 1

    def denoise_step(self, gen: Generation) -> None:
        out = unet_batch(self.model, [gen])[0]
        with gen.timed("denoise"):
            self.apply_unet_output(gen, out)

    def preview(self, gen: Generation) -> bytes:
        """A PNG of the latents through the bundle's linear latent-to-RGB map (no VAE): at latent resolution,
        every `preview_every` steps when the request asked for previews, else b""."""
        k = gen.params.preview_every
        if not k or gen.step % k or gen.latents is None:
            return b""
        with gen.timed("preview"):
            return encode_png(latent_preview(gen.latents[0], self.m["latent_rgb"]), "")

    # 6. VAE decode, one image at a time (peak memory stays that of one image)
    def decode(self, gen: Generation, index: int) -> np.ndarray:
        assert gen.latents is not None
        with gen.timed("decode"):
            z = gen.latents[index : index + 1] / np.float32(self.m["vae_scaling_factor"])
            x = self.model.sessions["vae_decoder"].run({"latent_sample": z})["sample"][0]
            x = np.clip(x / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)
            return (x * 255).round().astype(np.uint8)

    # 7. PNG with the parameters chunk
    def encode_png(self, gen: Generation, index: int, image: np.ndarray) -> bytes:
        p = gen.params
        with gen.timed("png"):
            text = parameters_text(
                p.prompt, p.negative_prompt, p.steps, p.sampler, p.guidance_scale, p.image_seed(index),
                p.width, p.height, self.model.name, self.model.version,
            )
            return encode_png(image, text)

    def run(self, params: GenerationParams, latents: np.ndarray | None = None,
            noise_fn: NoiseFn | None = None) -> tuple[list[np.ndarray], Generation]:
        """All stages in order for one request; returns the decoded uint8 images."""
        gen = Generation(params, self.model)
        self.tokenize(gen)
        self.encode_text(gen)
        self.prepare(gen, latents, noise_fn)
        while not gen.denoised:
            self.denoise_step(gen)
        return [self.decode(gen, k) for k in range(params.num_images)], gen


def unet_batch(model: LoadedModel, gens: list[Generation]) -> list[np.ndarray]:
    """One UNet call over several requests' rows (each with its own timestep and text embeddings); returns each
    request's slice of the output. The call's wall time counts as `denoise` time for every request in it."""
    pipe = Pipeline(model)
    inputs = [pipe.unet_inputs(g) for g in gens]
    feed = inputs[0] if len(inputs) == 1 else {k: np.concatenate([i[k] for i in inputs]) for k in inputs[0]}
    t0 = time.perf_counter()
    out = model.sessions["unet"].run(feed)["out_sample"]
    took = time.perf_counter() - t0
    bounds = np.cumsum([len(i["sample"]) for i in inputs])[:-1]
    for g in gens:
        g.timings["denoise"] = g.timings.get("denoise", 0.0) + took
    return np.split(out, bounds)


def latent_preview(latent: np.ndarray, latent_rgb: dict) -> np.ndarray:
    """uint8 [H, W, 3] from one [C, H, W] latent: rgb = latent^T W + b (fitted by the compiler), clipped to [0, 1]."""
    w = np.asarray(latent_rgb["weights"], np.float32)
    b = np.asarray(latent_rgb["bias"], np.float32)
    rgb = np.tensordot(latent.astype(np.float32), w, axes=([0], [0])) + b
    return (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)
