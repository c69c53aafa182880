"""Stage 1, validate: a GenerateRequest checked against the model's limits -> resolved GenerationParams."""

from __future__ import annotations

import math
import re
import secrets
import uuid
from dataclasses import dataclass

from runtime.errors import FieldViolation, InvalidArgument
from runtime.samplers import SAMPLERS, NoiseSchedule

MAX_PROMPT_CHARS = 2000
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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

    def image_seed(self, index: int) -> int:
        return (self.seed + index) % 2**32

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs only when the scale is above 1 (as in diffusers)."""
        return self.guidance_scale > 1.0


def new_request_id() -> str:
    return uuid.uuid4().hex


def validate(request, defaults: dict, limits: dict, request_id: str = "",  # type: ignore[no-untyped-def]
             previews: bool = True, schedule: NoiseSchedule | None = None) -> GenerationParams:
    """Check every field of a kiln.v1.GenerateRequest; raises InvalidArgument listing all violations.

    `request_id` is used when the request carries none (the server passes the RPC's id). `previews`: whether
    the model can make latent previews (its manifest has a latent-to-RGB map). `schedule`: the model's noise
    schedule, for the step limits of samplers that have their own (turbo, lcm).
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
    for field, value in (("width", width), ("height", height)):
        check(value % 8 == 0 and lo <= value <= hi, field,
              f"{field}={value} must be a multiple of 8 between {lo} and {hi}")

    steps = request.steps or defaults["steps"]
    check(1 <= steps <= limits["max_steps"], "steps", f"steps={steps} must be between 1 and {limits['max_steps']}")

    guidance = request.guidance_scale if request.HasField("guidance_scale") else defaults["guidance_scale"]
    max_g = limits["max_guidance_scale"]
    check(math.isfinite(guidance) and 0.0 <= guidance <= max_g, "guidance_scale",
          f"guidance_scale={guidance} must be between 0 and {max_g:g}")

    sampler = request.sampler or defaults["sampler"]
    check(sampler in SAMPLERS, "sampler", f"sampler={sampler!r} is not one of: {', '.join(SAMPLERS)}")
    if sampler in SAMPLERS and schedule is not None and steps > (most := SAMPLERS[sampler].max_steps(schedule)):
        check(False, "steps", f"steps={steps} must be between 1 and {most} for sampler {sampler!r}")

    num_images = request.num_images or 1
    check(1 <= num_images <= limits["max_images"], "num_images",
          f"num_images={num_images} must be between 1 and {limits['max_images']}")

    preview_every = request.preview_every
    if preview_every:
        check(previews, "preview_every", f"model {request.model!r} has no latent preview map (compiled before Kiln "
                                         "made one); recompile it, or leave preview_every at 0")
        check(preview_every <= steps, "preview_every",
              f"preview_every={preview_every} must be between 0 (off) and steps={steps}")

    request_id = request.request_id or request_id or new_request_id()
    check(bool(REQUEST_ID_RE.match(request_id)), "request_id",
          "request_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'")

    if bad:
        raise InvalidArgument(bad)
    return GenerationParams(
        request_id=request_id,
        model=request.model,
        prompt=prompt,
        negative_prompt=request.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=float(guidance),
        sampler=sampler,
        seed=request.seed if request.HasField("seed") else secrets.randbits(32),
        num_images=num_images,
        preview_every=preview_every,
    )
