"""Stage 1, validate: a GenerateRequest checked against the model's limits -> resolved GenerationParams.

Image inputs (img2img, inpainting) are decoded here too (runtime.images), so a bad image fails before any
model work, with INVALID_ARGUMENT naming the field. Size rule: without width/height the output takes the init
image's size, each side rounded down to a multiple of 8; with them, the init image (and mask) are resized
(Lanczos) to width x height, which must have the init image's aspect ratio within 1%. The mask must be the
init image's size; after resizing it is binarised at 0.5 (gray >= 128 = redraw).
"""

from __future__ import annotations

import math
import re
import secrets
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from runtime.adapters import SCALE_RANGE
from runtime.errors import FieldViolation, InvalidArgument, NotFound
from runtime.errors import quoted as _quoted
from runtime.images import ImageLimits, decode_image, decode_mask, resize
from runtime.samplers import SAMPLERS, NoiseSchedule

MAX_PROMPT_CHARS = 2000
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}
"""strength when the request leaves it unset (diffusers' pipeline defaults)."""
MAX_MASK_BLUR = 64
"""Largest mask_blur radius, pixels."""
ASPECT_TOLERANCE = 0.01
"""How far width/height's aspect ratio may be from the init image's before it is refused instead of resized."""
SIZE_CONDITIONING_RANGE = {"size": (8, 4096), "crop": (0, 4096)}
"""SDXL size conditioning (GenerateRequest.size_conditioning): pixel ranges of its sizes and crops when set."""
DECODERS = ("full", "tiny")
"""GenerateRequest.decoder's values: the bundle's VAE decoder, or its tiny (TAESD) one where it has one."""
# \Z, not $: $ also matches before a final newline, and an id ending in "\n" is no valid gRPC metadata value
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")


@dataclass(frozen=True)
class GenerationParams:
    """A request with every default filled in and every field in range."""

    request_id: str
    model: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    seed: int
    num_images: int
    preview_every: int = 0
    """Send a latent preview with every k-th denoising step's progress; 0: none."""
    init_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    """img2img/inpainting: uint8 [height, width, 3] RGB, already at the output size; None for text-to-image."""
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    """Inpainting: uint8 [height, width] of 0 (keep) and 1 (redraw); None otherwise."""
    strength: float = 1.0
    """How much of init_image is redrawn, (0, 1]; 1.0 for text-to-image."""
    mask_blur: int = 0
    """Inpainting: blur radius (pixels) of the mask used to blend and paste the result over init_image."""
    decoder: str = "full"
    """Which VAE decoder draws the final images: `full` or `tiny` (one of the model's, LoadedModel.decoders)."""
    loras: tuple[tuple[str, float], ...] = ()
    """LoRA adapters (name, scale) applied to this request only, sorted by name; () for the bundle as compiled."""
    size_conditioning: tuple[int, int, int, int, int, int] | None = None
    """SDXL: (original height, original width, crop top, crop left, target height, target width), the UNet's
    `time_ids` in diffusers' order, every default filled in; None for other models."""
    guidance_end: float = 1.0
    """The fraction of the denoising steps, the first ones, that run classifier-free guidance; 1: all of them."""

    @property
    def mode(self) -> str:
        """text_to_image | img2img | inpaint."""
        return "inpaint" if self.mask is not None else "img2img" if self.init_image is not None else "text_to_image"

    @property
    def denoising_steps(self) -> int:
        """The steps actually run: all of them for text-to-image, int(steps * strength) from an init image."""
        return denoising_steps(self.steps, self.strength) if self.init_image is not None else self.steps

    def image_seed(self, index: int) -> int:
        return (self.seed + index) % 2**32

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs only when the scale is above 1 (as in diffusers), on some step."""
        return self.guidance_scale > 1.0 and self.guided_steps > 0

    @property
    def guided_steps(self) -> int:
        """How many of the denoising steps, from the first one run, are guided: ceil(guidance_end x steps)."""
        if self.guidance_scale <= 1.0:
            return 0
        n = self.denoising_steps
        return min(n, math.ceil(self.guidance_end * n - 1e-6))

    def guided_at(self, done: int) -> bool:
        """Whether the denoising step after `done` steps runs guided (both rows)."""
        return done < self.guided_steps


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_mode(request) -> str:  # type: ignore[no-untyped-def]
    """The mode a GenerateRequest asks for, from which image fields it fills."""
    return "inpaint" if request.mask_image else "img2img" if request.init_image else "text_to_image"


def request_strength(request) -> float:  # type: ignore[no-untyped-def]
    """The strength a request runs at: its own (float32 on the wire, so rounded to 6 decimals: 0.7 stays 0.7),
    else the mode's default."""
    if request.HasField("strength"):
        return round(float(request.strength), 6)
    return DEFAULT_STRENGTH.get(request_mode(request), 1.0)


def denoising_steps(steps: int, strength: float) -> int:
    """diffusers' img2img arithmetic, int(steps * strength) capped at steps, without float round-off
    (0.29 * 100 = 28.999999999999996 counts 29)."""
    return min(math.floor(steps * strength + 1e-6), steps)


def validate(request, defaults: dict, limits: dict, request_id: str = "",  # type: ignore[no-untyped-def]
             previews: bool = True, schedule: NoiseSchedule | None = None, encoder: bool = True,
             image_limits: ImageLimits | None = None, decoders: tuple[str, ...] = ("full",),
             adapters: Collection[str] = (), max_loras: int = 0, sdxl: bool = False) -> GenerationParams:
    """Check every field of a kiln.v1.GenerateRequest; raises InvalidArgument listing all violations.

    `request_id` is used when the request carries none (the server passes the RPC's id). `previews`: whether
    the model can make latent previews (its manifest has a latent-to-RGB map). `schedule`: the model's noise
    schedule, for the step limits of samplers that have their own (turbo, lcm). `encoder`: whether the model
    has a VAE encoder (needed for init_image). `image_limits`: encoded-size and pixel limits of image fields.
    `decoders`: the decoders the model has (`full`, and `tiny` when compiled with a tiny decoder).
    `adapters`, `max_loras`: the LoRA adapters the model has and how many one request may select; an adapter
    it does not have raises NotFound (once every field is otherwise valid). `sdxl`: the model takes SDXL's size
    conditioning (else a request's size_conditioning is refused).
    """
    bad: list[FieldViolation] = []

    def check(ok: bool, field: str, message: str) -> None:
        if not ok:
            bad.append(FieldViolation(field, message))

    prompt = request.prompt
    check(bool(prompt.strip()), "prompt", "prompt must not be empty")
    check(len(prompt) <= MAX_PROMPT_CHARS, "prompt",
          f"prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    check(len(request.negative_prompt) <= MAX_PROMPT_CHARS, "negative_prompt",
          f"negative_prompt has {len(request.negative_prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")

    lo, hi = limits["min_size"], limits["max_size"]
    width = request.width or defaults["width"]
    height = request.height or defaults["height"]
    sizes_ok = True
    for name, value in (("width", width), ("height", height)):
        ok = value % 8 == 0 and lo <= value <= hi
        check(ok, name, f"{name}={value} must be a multiple of 8 between {lo} and {hi}")
        sizes_ok &= ok
    init_image, mask = None, None
    if request.init_image or request.mask_image:
        init_image, mask, width, height = _image_inputs(request, width, height, sizes_ok, lo, hi, bad, encoder,
                                                        image_limits)

    steps = request.steps or defaults["steps"]
    check(1 <= steps <= limits["max_steps"], "steps", f"steps={steps} must be between 1 and {limits['max_steps']}")

    guidance = request.guidance_scale if request.HasField("guidance_scale") else defaults["guidance_scale"]
    max_g = limits["max_guidance_scale"]
    check(math.isfinite(guidance) and 0.0 <= guidance <= max_g, "guidance_scale",
          f"guidance_scale={guidance} must be between 0 and {max_g:g}")
    guidance_end = round(float(request.guidance_end), 6) if request.HasField("guidance_end") else 1.0
    check(math.isfinite(guidance_end) and 0.0 <= guidance_end <= 1.0, "guidance_end",
          f"guidance_end={guidance_end} must be between 0 and 1 (the fraction of the steps that run guided)")

    sampler = request.sampler or defaults["sampler"]
    check(sampler in SAMPLERS, "sampler", f"sampler={_quoted(sampler)} is not one of: {', '.join(SAMPLERS)}")
    if sampler in SAMPLERS and schedule is not None and steps > (most := SAMPLERS[sampler].max_steps(schedule)):
        check(False, "steps", f"steps={steps} must be between 1 and {most} for sampler {sampler!r}")

    strength = request_strength(request)
    strength_ok = math.isfinite(strength) and 0.0 < strength <= 1.0  # (int(steps x NaN) raises: never computed)
    if request.HasField("strength") and not request.init_image:
        check(False, "strength", "strength applies only with init_image (img2img or inpainting)")
    elif not strength_ok:
        check(False, "strength", f"strength={strength:g} must be greater than 0 and at most 1")
    elif request.init_image and 1 <= steps <= limits["max_steps"] and denoising_steps(steps, strength) < 1:
        check(False, "strength", f"strength={strength:g} runs int(steps={steps} x {strength:g}) = 0 denoising steps; "
                                 f"raise strength to at least {1 / steps:.3g} or raise steps")
    run_steps: int | None = steps  # the steps run; None from an init image whose strength is refused above
    if request.init_image:
        run_steps = denoising_steps(steps, strength) if strength_ok else None
    check(request.mask_blur <= MAX_MASK_BLUR, "mask_blur",
          f"mask_blur={request.mask_blur} must be between 0 and {MAX_MASK_BLUR} pixels")
    check(not request.mask_blur or bool(request.mask_image), "mask_blur", "mask_blur applies only with mask_image")

    num_images = request.num_images or 1
    check(1 <= num_images <= limits["max_images"], "num_images",
          f"num_images={num_images} must be between 1 and {limits['max_images']}")

    preview_every = request.preview_every
    if preview_every:
        check(previews, "preview_every", f"model {request.model!r} has no latent preview map (compiled before Kiln "
                                         "made one); recompile it, or leave preview_every at 0")
        if run_steps is not None:
            bound = f"steps={steps}" if not request.init_image else f"the steps run, int(steps x strength) = {run_steps}"
            check(preview_every <= max(run_steps, 1), "preview_every",
                  f"preview_every={preview_every} must be between 0 (off) and {bound}")

    decoder = request.decoder or "full"
    if decoder not in DECODERS:
        check(False, "decoder", f"decoder={_quoted(decoder)} is not one of: {', '.join(DECODERS)}")
    elif decoder not in decoders:
        check(False, "decoder", f"decoder={decoder!r}: model {_quoted(request.model)} has no {decoder} decoder; its "
                                f"decoders: {', '.join(decoders)} (compile it with --tiny-decoder to add one)")

    request_id = request.request_id or request_id or new_request_id()
    check(bool(REQUEST_ID_RE.match(request_id)), "request_id",
          "request_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'")

    loras = _loras(request, max_loras, check)
    size_conditioning = _size_conditioning(request, sdxl, width, height, check)

    if bad:
        raise InvalidArgument(bad)
    unknown = [name for name, _ in loras if name not in adapters]
    if unknown:
        raise NotFound("adapter", unknown[0], sorted(adapters))
    return GenerationParams(
        request_id=request_id,
        model=request.model,
        prompt=prompt,
        negative_prompt=request.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=float(guidance), guidance_end=guidance_end,
        sampler=sampler,
        seed=request.seed if request.HasField("seed") else secrets.randbits(32),
        num_images=num_images,
        preview_every=preview_every,
        init_image=init_image,
        mask=mask,
        strength=strength if request.init_image else 1.0,
        mask_blur=request.mask_blur,
        decoder=decoder,
        loras=loras,
        size_conditioning=size_conditioning,
    )


def _size_conditioning(request, sdxl: bool, width: int, height: int,  # type: ignore[no-untyped-def]
                       check) -> tuple[int, int, int, int, int, int] | None:
    """SDXL's six size-conditioning numbers with the defaults filled in (None for other models); `check` records
    each violation."""
    given = request.HasField("size_conditioning")
    if not sdxl:
        check(not given, "size_conditioning", f"size_conditioning applies only to SDXL models; model "
                                              f"{_quoted(request.model)} is not one: leave it unset")
        return None
    c = request.size_conditioning
    values = {"original_height": c.original_height or height, "original_width": c.original_width or width,
              "crop_top": c.crop_top, "crop_left": c.crop_left,
              "target_height": c.target_height or height, "target_width": c.target_width or width}
    for name, value in values.items():
        lo, hi = SIZE_CONDITIONING_RANGE["crop" if name.startswith("crop") else "size"]
        check(lo <= value <= hi, f"size_conditioning.{name}",
              f"size_conditioning.{name}={value} must be between {lo} and {hi} pixels")
    return tuple(values.values())  # type: ignore[return-value]


def _loras(request, max_loras: int, check) -> tuple[tuple[str, float], ...]:  # type: ignore[no-untyped-def]
    """The request's LoRA selection as sorted (name, scale) pairs; `check` records each violation."""
    selections = list(request.loras)
    if not selections:
        return ()
    if not max_loras:
        check(False, "loras", f"model {_quoted(request.model)} takes no per-request LoRA adapters (compiled without "
                              "--lora-inputs); leave loras empty")
        return ()
    check(len(selections) <= max_loras, "loras",
          f"loras has {len(selections)} adapters; at most {max_loras} are allowed")
    lo, hi = SCALE_RANGE
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for i, sel in enumerate(selections):
        scale = float(sel.scale) if sel.HasField("scale") else 1.0
        if not sel.name:
            check(False, f"loras[{i}].name", f"loras[{i}].name must name an adapter")
        elif sel.name in seen:
            check(False, f"loras[{i}].name", f"loras[{i}].name={_quoted(sel.name)} is selected twice")
        seen.add(sel.name)
        if not (math.isfinite(scale) and lo <= scale <= hi):
            check(False, f"loras[{i}].scale", f"loras[{i}].scale={scale:g} must be between {lo:g} and {hi:g}")
        out.append((sel.name, round(scale, 6)))
    return tuple(sorted(out))


def _image_inputs(request, width: int, height: int, sizes_ok: bool, lo: int, hi: int,  # type: ignore[no-untyped-def]
                  bad: list[FieldViolation], encoder: bool, limits: ImageLimits | None
                  ) -> tuple[np.ndarray | None, np.ndarray | None, int, int]:
    """Decode init_image and mask_image and bring them to the output size; returns (image, mask, width, height),
    appending to `bad` for every problem found. `sizes_ok`: whether width and height are in range (else they are
    refused already, and nothing is resized to them)."""
    limits = limits or ImageLimits()
    if not request.init_image:
        bad.append(FieldViolation("mask_image", "mask_image needs init_image (the image to inpaint)"))
        return None, None, width, height
    if not encoder:
        bad.append(FieldViolation("init_image", f"model {request.model!r} has no VAE encoder; recompile it to "
                                                "serve img2img and inpainting"))
        return None, None, width, height
    try:
        image = decode_image(request.init_image, "init_image", limits)
    except InvalidArgument as e:
        bad.extend(e.violations)
        return None, None, width, height
    h0, w0 = image.shape[:2]
    if not request.width and not request.height:
        width, height = w0 // 8 * 8, h0 // 8 * 8
        if not (lo <= width <= hi and lo <= height <= hi):
            bad.append(FieldViolation("init_image", (
                f"init_image is {w0}x{h0}: without width/height the output takes that size rounded down to "
                f"multiples of 8 ({width}x{height}), which must be between {lo} and {hi} per side; resize it or "
                "send width and height")))
            return None, None, width, height
    elif not sizes_ok:  # refused above; resizing to, say, 2^32-8 x 2^32-8 would overflow Pillow or allocate GBs
        return None, None, width, height
    elif abs((w0 / h0) / (width / height) - 1.0) > ASPECT_TOLERANCE:
        bad.append(FieldViolation("init_image", (
            f"init_image is {w0}x{h0} (aspect {w0 / h0:.3f}) but the request asks for {width}x{height} (aspect "
            f"{width / height:.3f}); crop it to that aspect ratio, or leave width and height at 0 to use its size")))
        return None, None, width, height
    mask = None
    if request.mask_image:
        try:
            gray = decode_mask(request.mask_image, "mask_image", limits)
        except InvalidArgument as e:
            bad.extend(e.violations)
            return None, None, width, height
        if gray.shape != (h0, w0):
            bad.append(FieldViolation("mask_image", f"mask_image is {gray.shape[1]}x{gray.shape[0]}; it must be the "
                                                    f"size of init_image ({w0}x{h0})"))
            return None, None, width, height
        mask = (resize(gray, width, height) >= 128).astype(np.uint8)
    return np.ascontiguousarray(resize(image, width, height)), mask, width, height
