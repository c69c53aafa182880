"""Which precision each component gets: `--precision int8` or per component, `unet=int8,vae_decoder=fp32`.

A bundle-wide precision is a plan (below); an explicit `component=precision` is a requirement. The plan's
VAE entries are `int8?`: int8 where the fidelity gate passes, else fp32 (the VAE is small and decides the
final pixels, so the compiler tries int8 and keeps it only if it holds up).
"""

from __future__ import annotations

COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
FOLLOWERS = {"text_encoder_2": "text_encoder"}
"""Components that take another's plan entry unless given their own: SDXL's second text encoder follows the
first (the bundle-wide plans below name only the components every bundle has)."""
PRECISIONS = ("fp32", "int8", "nf4", "int4", "fp16")
TRY_INT8 = "int8?"
"""Plan entry: int8 if the fidelity gate passes for this component, else fp32."""

_EVERY = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
PLANS: dict[str, dict[str, str]] = {
    "fp32": dict.fromkeys(_EVERY, "fp32"),
    # text encoder: dynamic int8; UNet: static QDQ int8 calibrated on the fp32 pipeline
    "int8": {"text_encoder": "int8", "unet": "int8", "vae_decoder": TRY_INT8, "vae_encoder": TRY_INT8},
    # MatMul/Gemm weights 4-bit; the UNet's convolutions int8 (see quantize/int8.py)
    "nf4": {"text_encoder": "nf4", "unet": "nf4", "vae_decoder": TRY_INT8, "vae_encoder": TRY_INT8},
    "int4": {"text_encoder": "int4", "unet": "int4", "vae_decoder": TRY_INT8, "vae_encoder": TRY_INT8},
    "fp16": dict.fromkeys(_EVERY, "fp16"),
}


def parse(spec: str) -> dict[str, str]:
    """`int8` -> the int8 plan; `unet=int8,text_encoder=int8` -> those, the rest fp32; `nf4,vae_decoder=fp32`
    -> the nf4 plan with one override. Raises ValueError naming the bad part."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"precision={spec!r} is empty; use one of {', '.join(PRECISIONS)} or component=precision")
    plan = dict(PLANS["fp32"])
    seen: set[str] = set()
    for i, part in enumerate(parts):
        if "=" not in part:
            if i != 0:
                raise ValueError(f"precision={spec!r}: a bundle-wide precision ({part!r}) must come first")
            if part not in PLANS:
                raise ValueError(f"precision={part!r} is not one of: {', '.join(PRECISIONS)}")
            plan = dict(PLANS[part])
            continue
        component, _, value = (s.strip() for s in part.partition("="))
        if component not in COMPONENTS:
            raise ValueError(f"precision: component={component!r} is not one of: {', '.join(COMPONENTS)}")
        if value not in PRECISIONS:
            raise ValueError(f"precision: {component}={value!r} is not one of: {', '.join(PRECISIONS)}")
        if component in seen:
            raise ValueError(f"precision: {component} is given twice in {spec!r}")
        seen.add(component)
        plan[component] = value
    return plan


def for_components(plan: dict[str, str], components) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Each of `components`' plan entry: its own, else the one it follows (FOLLOWERS), else fp32."""
    return {c: plan.get(c) or plan.get(FOLLOWERS.get(c, ""), "fp32") for c in components}


def resolved(value: str) -> str:
    """The precision a plan entry asks for first (`int8?` -> `int8`)."""
    return value.rstrip("?")
