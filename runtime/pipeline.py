"""Text-to-image, img2img and inpainting in named, timed stages, as numpy over model sessions.

1. validate (runtime.validate)  2. tokenize  3. text encode  4. prepare timesteps and latents (img2img and
inpainting: VAE-encode the init image and noise it to the strength's step)  5. denoise (one UNet call per step,
guidance in the same batch; inpainting blends the known region back in after each step with an ordinary
UNet, or feeds mask and masked-image latents to a 9-channel one)  6. VAE decode (inpainting: paste over the
init image through the mask)  7. encode PNG

The arithmetic follows diffusers' StableDiffusion, Img2Img and Inpaint pipelines step for step.

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

LOGVAR_RANGE = (-30.0, 20.0)
"""The VAE posterior's log-variance is clipped to this, as diffusers' DiagonalGaussianDistribution does."""


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
    """Text embeddings per UNet row [uncond x n, cond x n] (SDXL: both encoders' concatenated)."""
    tokens_2: list[Tokenized] = field(default_factory=list)
    """SDXL: the same prompts through the second tokenizer."""
    pooled: np.ndarray | None = None
    """SDXL: the second text encoder's pooled, projected output per UNet row (the UNet's `text_embeds`)."""
    cond_rows: tuple[np.ndarray, np.ndarray | None] | None = None
    """`embeddings` and `pooled` of the conditional rows alone, for the steps after guidance_end."""
    sampler: Sampler | None = None
    latents: np.ndarray | None = None
    noise_fn: NoiseFn | None = None
    step: int = 0
    """Index of the next sampler step (after the last one: sampler.num_steps)."""
    first_step: int = 0
    """img2img and inpainting below strength 1 skip the first steps of the schedule: the index they start at."""
    image_latents: np.ndarray | None = None
    """Inpainting with an ordinary UNet: the init image's latents [n, C, h, w], blended back in after each step."""
    init_noise: np.ndarray | None = None
    """... and the starting noise, which re-noises them to each step's level."""
    blend_mask: np.ndarray | None = None
    """... and the mask at latent resolution [1, 1, h, w] (1 = redraw)."""
    unet_extra: np.ndarray | None = None
    """9-channel inpainting UNet: mask and masked-image latents [n, 1 + C, h, w], appended to its input."""

    @property
    def steps_done(self) -> int:
        return self.step - self.first_step

    @property
    def total_steps(self) -> int:
        return self.params.denoising_steps

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    @property
    def guided_now(self) -> bool:
        """Whether the next denoising step runs guided (both rows); `GenerateRequest.guidance_end`."""
        return self.params.guided_at(self.steps_done)

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
            if self.model.tokenizer_2 is not None:
                gen.tokens_2 = [self.model.tokenizer_2(text) for _, text in fields]
        return [
            Truncation(name, t.kept_tokens, t.dropped_tokens, t.dropped_text)
            for (name, _), t in zip(fields, gen.tokens, strict=False)
            if t.dropped_tokens
        ]

    # 3. text encode: negative and positive prompt in one batch
    def encode_text(self, gen: Generation) -> None:
        gen.embeddings, gen.pooled = encode_text_batch(self.model, [gen])[0]

    # 4. prepare timesteps and initial latents
    def prepare(self, gen: Generation, latents: np.ndarray | None = None, noise_fn: NoiseFn | None = None,
                encode_noise_fn: NoiseFn | None = None) -> None:
        """Sampler, starting latents and (inpainting) the mask inputs. `latents`: the starting noise instead of
        drawing it; `noise_fn`: the per-image noise stream (starting noise, then ancestral samplers' per-step
        noise); `encode_noise_fn`: the per-image stream that samples the VAE posterior of encoded images."""
        p = gen.params
        with gen.timed("prepare"):
            gen.sampler = make_sampler(p.sampler, self.model.schedule, p.steps)
            f = self.m["vae_scale_factor"]
            shape = (1, self.m["latent_channels"], p.height // f, p.width // f)
            gen.noise_fn = noise_fn = noise_fn or _seeded_noise(p, stream=0)
            noise = latents if latents is not None else np.concatenate([noise_fn(k, shape) for k in range(p.num_images)])
            noise = noise.astype(np.float32)
            if p.init_image is None and not self.model.inpainting:
                gen.latents = (noise * np.float32(gen.sampler.init_noise_sigma)).astype(np.float32)
                return
        with gen.timed("vae_encode"):
            self._prepare_from_image(gen, noise, encode_noise_fn or _seeded_noise(p, stream=1))

    def _prepare_from_image(self, gen: Generation, noise: np.ndarray, encode_noise: NoiseFn) -> None:
        """Starting latents from the init image, as diffusers' Img2Img pipeline (always noised to the start step)
        or Inpaint pipeline (pure noise at strength 1) does; then the inpainting inputs."""
        p, sampler = gen.params, gen.sampler
        assert sampler is not None
        n = p.num_images
        gen.first_step = gen.step = p.steps - p.denoising_steps
        height, width = p.height, p.width
        image = to_vae_input(p.init_image) if p.init_image is not None else np.zeros((1, 3, height, width), np.float32)
        inpainting = p.mode == "inpaint" or self.model.inpainting
        # the init image's own latents: to noise (strength < 1), or to blend back in (any ordinary UNet)
        x0 = self.vae_encode(image, encode_noise, n) if not self.model.inpainting or p.strength < 1.0 else None
        if not inpainting or p.strength < 1.0:
            assert x0 is not None
            gen.latents = sampler.add_noise(x0, noise, gen.first_step)
        else:
            gen.latents = (noise * np.float32(sampler.init_noise_sigma)).astype(np.float32)
        if not inpainting:
            return
        mask = p.mask if p.mask is not None else np.ones((height, width), np.uint8)
        f = self.m["vae_scale_factor"]
        if self.model.inpainting:
            masked = image * (mask < 0.5)[None, None].astype(np.float32)
            masked_latents = self.vae_encode(masked, encode_noise, n)
            small = np.broadcast_to(mask[None, None, ::f, ::f].astype(np.float32), (n, 1, *masked_latents.shape[2:]))
            gen.unet_extra = np.concatenate([small, masked_latents], axis=1)
        else:
            assert x0 is not None
            soft = soft_mask(mask, p.mask_blur)
            gen.blend_mask = np.ascontiguousarray(soft[None, None, ::f, ::f])
            gen.image_latents, gen.init_noise = x0, noise

    def vae_encode(self, image: np.ndarray, noise_fn: NoiseFn, n: int) -> np.ndarray:
        """[n, C, h, w] scaled latents of one [1, 3, H, W] image in [-1, 1]: the encoder's posterior sampled once
        per image k (mean + std * noise_fn(k)), times the VAE's scaling factor, as diffusers' retrieve_latents."""
        moments = self.model.sessions["vae_encoder"].run({"sample": image.astype(np.float32)})["latent_moments"]
        mean, logvar = np.split(moments.astype(np.float32), 2, axis=1)
        std = np.exp(np.float32(0.5) * np.clip(logvar, *LOGVAR_RANGE))
        scale = np.float32(self.m["vae_scaling_factor"])
        return np.concatenate([(mean + std * noise_fn(k, mean.shape)) * scale for k in range(n)]).astype(np.float32)

    # 5. denoise: one UNet call for this request's images (and their unconditional twins)
    def unet_inputs(self, gen: Generation) -> dict[str, np.ndarray]:
        assert gen.sampler is not None and gen.latents is not None and gen.embeddings is not None
        x = gen.sampler.scale_model_input(gen.latents, gen.step)
        if gen.unet_extra is not None:
            x = np.concatenate([x, gen.unet_extra], axis=1)
        embeddings, pooled = gen.embeddings, gen.pooled
        if gen.guided_now:
            x = np.concatenate([x, x])
        elif gen.params.guided:  # past guidance_end: the conditional rows alone ([uncond x n, cond x n])
            if gen.cond_rows is None:  # one array for every remaining step (a GPU session keeps it resident)
                n = gen.params.num_images
                gen.cond_rows = embeddings[n:].copy(), pooled[n:].copy() if pooled is not None else None
            embeddings, pooled = gen.cond_rows
        t = np.full((x.shape[0],), gen.sampler.timesteps[gen.step], dtype=np.float32)
        feed = {"sample": x.astype(np.float32), "timestep": t, "encoder_hidden_states": embeddings}
        if pooled is not None:  # SDXL's added conditioning: each row its own sizes
            feed["text_embeds"] = pooled
            feed["time_ids"] = np.repeat(time_ids(gen.params)[None], x.shape[0], axis=0)
        return feed

    def apply_unet_output(self, gen: Generation, out: np.ndarray) -> None:
        assert gen.sampler is not None and gen.latents is not None and gen.noise_fn is not None
        if gen.guided_now:
            uncond, cond = np.split(out, 2)
            out = uncond + np.float32(gen.params.guidance_scale) * (cond - uncond)
        noise = None
        if gen.sampler.needs_noise:
            shape = (1, *gen.latents.shape[1:])
            noise = np.concatenate([gen.noise_fn(k, shape) for k in range(gen.params.num_images)])
        gen.latents = gen.sampler.step(out, gen.step, gen.latents, noise)
        gen.step += 1
        if gen.blend_mask is not None:  # keep the known region: the init latents at this step's noise level
            assert gen.image_latents is not None and gen.init_noise is not None
            known = gen.image_latents
            if gen.step < gen.sampler.num_steps:
                known = gen.sampler.add_noise(known, gen.init_noise, gen.step)
            m = gen.blend_mask
            gen.latents = ((np.float32(1.0) - m) * known + m * gen.latents).astype(np.float32)

    def denoise_step(self, gen: Generation) -> None:
        out = unet_batch(self.model, [gen])[0]
        with gen.timed("denoise"):
            self.apply_unet_output(gen, out)

    def preview(self, gen: Generation) -> bytes:
        """A PNG of the latents through the bundle's linear latent-to-RGB map (no VAE): at latent resolution,
        every `preview_every` steps when the request asked for previews, else b""."""
        k = gen.params.preview_every
        if not k or gen.steps_done % k or gen.latents is None:
            return b""
        with gen.timed("preview"):
            return encode_png(latent_preview(gen.latents[0], self.m["latent_rgb"]), "")

    # 6. VAE decode, one image at a time (peak memory stays that of one image)
    def decode(self, gen: Generation, index: int) -> np.ndarray:
        """uint8 [H, W, 3]; inpainting pastes it over the init image through the (blurred) mask, so kept pixels
        stay the init image's exactly (the VAE round trip would change them)."""
        return self.finish_image(gen, decode_batch(self.model, [(gen, index)])[0])

    def finish_image(self, gen: Generation, image: np.ndarray) -> np.ndarray:
        """A decoded image as the request wants it: inpainting pastes it over the init image through the mask."""
        p = gen.params
        if p.mask is not None and p.init_image is not None:
            return paste(image, p.init_image, soft_mask(p.mask, p.mask_blur))
        return image

    def vae_decode(self, latents: np.ndarray, decoder: str = "full") -> np.ndarray:
        """uint8 [B, H, W, 3] from scaled latents [B, C, h, w], through the model's `decoder` (full or tiny)."""
        d = self.model.decoders[decoder]
        z = latents.astype(np.float32) / np.float32(d.scaling_factor)
        x = self.model.sessions[d.component].run({"latent_sample": z})["sample"]
        x = np.clip(x / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        return (x * 255).round().astype(np.uint8)

    # 7. PNG with the parameters chunk
    def encode_png(self, gen: Generation, index: int, image: np.ndarray) -> bytes:
        p = gen.params
        with gen.timed("png"):
            text = parameters_text(
                p.prompt, p.negative_prompt, p.steps, p.sampler, p.guidance_scale, p.image_seed(index),
                p.width, p.height, self.model.name, self.model.version,
                p.strength if p.init_image is not None else None, p.guidance_end, p.decoder,
            )
            return encode_png(image, text)

    def run(self, params: GenerationParams, latents: np.ndarray | None = None, noise_fn: NoiseFn | None = None,
            encode_noise_fn: NoiseFn | None = None) -> tuple[list[np.ndarray], Generation]:
        """All stages in order for one request; returns the decoded uint8 images."""
        gen = Generation(params, self.model)
        self.tokenize(gen)
        self.encode_text(gen)
        self.prepare(gen, latents, noise_fn, encode_noise_fn)
        while not gen.denoised:
            self.denoise_step(gen)
        return [self.decode(gen, k) for k in range(params.num_images)], gen


# The calls several requests share (the engine batches them). Each changes no request's state but its timings,
# and those only once the call has gone well: when one raises, the engine can rerun its requests one by one.
def encode_text_batch(model: LoadedModel, gens: list[Generation]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """One text-encoder call over several requests' prompts (each request's negative and positive rows); returns
    each one's (embeddings, pooled) in the UNet batch layout [uncond x n, cond x n] (images in order within each
    half). `pooled` is SDXL's (its second encoder's projected output), None for SD 1.x/2.x.

    SDXL as diffusers' pipelines: each encoder's penultimate hidden states, concatenated on features; an empty
    negative prompt is all zeros (embeddings and pooled) when the model says `force_zeros_for_empty_prompt`."""
    ids = np.stack([t.ids for g in gens for t in g.tokens])
    t0 = time.perf_counter()
    selection = _one_selection(gens)
    feed = {"input_ids": ids, **model.lora_feeds("text_encoder", selection)}
    pooled = None
    if model.sdxl:
        hidden = model.sessions["text_encoder"].run(feed)["hidden_states"]
        second = model.sessions["text_encoder_2"].run({"input_ids": np.stack([t.ids for g in gens for t in g.tokens_2]),
                                                       **model.lora_feeds("text_encoder_2", selection)})
        hidden = np.concatenate([hidden, second["hidden_states"]], axis=-1)
        pooled = second["text_embeds"]
    else:
        hidden = model.sessions["text_encoder"].run(feed)["last_hidden_state"]
    took = time.perf_counter() - t0
    rows = np.cumsum([len(g.tokens) for g in gens])[:-1]
    zeros = bool(model.manifest.model.get("sdxl", {}).get("force_zeros_for_empty_prompt"))
    out = []
    for g, h, p in zip(gens, np.split(hidden, rows), np.split(pooled, rows) if pooled is not None else [None] * len(gens),
                       strict=True):
        if p is not None and zeros and g.params.guided and not g.params.negative_prompt:
            h, p = h.copy(), p.copy()
            h[0], p[0] = 0.0, 0.0  # the negative row
        n = g.params.num_images
        out.append((np.repeat(h, n, axis=0).astype(np.float32),
                    None if p is None else np.repeat(p, n, axis=0).astype(np.float32)))
    for g in gens:
        g.timings["text_encode"] = g.timings.get("text_encode", 0.0) + took
    return out


def decode_batch(model: LoadedModel, items: list[tuple[Generation, int]]) -> list[np.ndarray]:
    """One VAE-decoder call over images of several requests with the same latent size and decoder ((request,
    image index) pairs); returns each as uint8 [H, W, 3] straight from the decoder (`Pipeline.finish_image` then
    makes it what the request asked for)."""
    decoder = items[0][0].params.decoder
    if any(g.params.decoder != decoder for g, _ in items):
        raise ValueError(f"one decode call takes one decoder; got {sorted({g.params.decoder for g, _ in items})}")
    t0 = time.perf_counter()
    z = np.concatenate([g.latents[k : k + 1] for g, k in items])  # type: ignore[index]
    images = Pipeline(model).vae_decode(z, decoder)
    took = time.perf_counter() - t0
    for g, _ in items:
        g.timings["decode"] = g.timings.get("decode", 0.0) + took
    return list(images)


def unet_batch(model: LoadedModel, gens: list[Generation]) -> list[np.ndarray]:
    """One UNet call over several requests' rows (each with its own timestep and text embeddings); returns each
    request's slice of the output. The call's wall time counts as `denoise` time for every request in it."""
    pipe = Pipeline(model)
    inputs = [pipe.unet_inputs(g) for g in gens]
    feed = inputs[0] if len(inputs) == 1 else {k: np.concatenate([i[k] for i in inputs]) for k in inputs[0]}
    feed = {**feed, **model.lora_feeds("unet", _one_selection(gens))}
    t0 = time.perf_counter()
    out = model.sessions["unet"].run(feed)["out_sample"]
    took = time.perf_counter() - t0
    bounds = np.cumsum([len(i["sample"]) for i in inputs])[:-1]
    for g in gens:
        g.timings["denoise"] = g.timings.get("denoise", 0.0) + took
    return np.split(out, bounds)


def _one_selection(gens: list[Generation]) -> tuple[tuple[str, float], ...]:
    """The LoRA adapters every request of a shared call selected (the engine batches only equal selections)."""
    selection = gens[0].params.loras
    if any(g.params.loras != selection for g in gens[1:]):
        raise ValueError("requests with different LoRA adapter selections cannot share a model call")
    return selection


def time_ids(p: GenerationParams) -> np.ndarray:
    """SDXL's size conditioning, float32 [6]: original size (h, w), crop top-left (top, left), target size (h, w);
    the request's (GenerateRequest.size_conditioning), by default as diffusers' SDXL pipelines default them
    (original = target = the requested size, no crop)."""
    return np.asarray(p.size_conditioning or (p.height, p.width, 0, 0, p.height, p.width), np.float32)


def latent_preview(latent: np.ndarray, latent_rgb: dict) -> np.ndarray:
    """uint8 [H, W, 3] from one [C, H, W] latent: rgb = latent^T W + b (fitted by the compiler), clipped to [0, 1]."""
    w = np.asarray(latent_rgb["weights"], np.float32)
    b = np.asarray(latent_rgb["bias"], np.float32)
    rgb = np.tensordot(latent.astype(np.float32), w, axes=([0], [0])) + b
    return (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)


def _seeded_noise(p: GenerationParams, stream: int) -> NoiseFn:
    """Image k's standard-normal draws from its own seed (seed + k), so an image is the same made alone or in a
    batch. Stream 0 is the starting and per-step noise, stream 1 the VAE posterior samples of encoded images."""
    rngs = [np.random.Generator(np.random.PCG64(p.image_seed(k) if stream == 0 else [p.image_seed(k), stream]))
            for k in range(p.num_images)]

    def draw(k: int, shape: tuple[int, ...]) -> np.ndarray:
        return rngs[k].standard_normal(shape, dtype=np.float32)

    return draw


def to_vae_input(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1], as diffusers' VaeImageProcessor normalises."""
    return (image.astype(np.float32).transpose(2, 0, 1)[None] / np.float32(255.0) * 2 - 1).astype(np.float32)


def soft_mask(mask: np.ndarray, blur: int) -> np.ndarray:
    """float32 [H, W] in [0, 1] from a 0/1 mask: itself, or Gaussian-blurred with radius `blur` pixels."""
    if not blur:
        return mask.astype(np.float32)
    from PIL import Image, ImageFilter

    blurred = Image.fromarray(mask * np.uint8(255)).filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(blurred, np.float32) / np.float32(255.0)


def paste(generated: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8: generated where mask is 1, original where it is 0, mixed in between."""
    m = mask[..., None]
    out = original.astype(np.float32) * (np.float32(1.0) - m) + generated.astype(np.float32) * m
    return np.clip(out.round(), 0, 255).astype(np.uint8)
