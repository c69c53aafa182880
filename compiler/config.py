"""Typed compile configuration; its hash over graph-changing fields is part of a bundle's identity."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

from compiler.passes import attention_slicing, tome
from quantize import precision as precision_plan
from quantize.config import QuantizeConfig

COMPONENT_NAMES = precision_plan.COMPONENTS
PRECISIONS = precision_plan.PRECISIONS
SAMPLER_NAMES = ("ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "lcm", "turbo")
"""The runtime's sampler names (runtime.samplers.SAMPLERS; a test keeps the two equal)."""
BUILTIN_DEFAULTS = {"steps": 20, "guidance_scale": 7.5, "sampler": "dpmpp_2m_karras"}
MIN_DEFAULT_SIZE = 64
"""The smallest default size a config may name (a bundle's min_size is 8 latent pixels: 64 for SD's VAE)."""
PRESETS: dict[str, dict[str, object]] = {
    # SD-Turbo, SDXL-Turbo: adversarially distilled for 1-4 steps at 512x512, without classifier-free guidance
    "turbo": {"default_steps": 1, "default_guidance_scale": 0.0, "default_sampler": "turbo", "default_size": 512},
}
"""Named sets of request defaults (`kiln compile --preset NAME`); a field given explicitly wins over its preset."""
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass
class CompileConfig:
    name: str
    """Bundle name clients ask for: lowercase letters, digits, `.`, `_`, `-`; at most 64 characters."""
    precision: str = "fp32"
    """`fp32`, `int8`, `nf4`, `int4` or `fp16` for the whole bundle (see quantize/precision.py for what each
    means per component), optionally followed by per-component overrides: `int8,vae_decoder=fp32`, or only
    overrides: `unet=int8,text_encoder=int8` (the rest fp32)."""
    opset: int = 17
    """ONNX opset of the exported graphs (17 to 21)."""
    fusions: bool = True
    """Apply ONNX Runtime's transformer fusions valid on the CPU execution provider."""
    tome: float = 0.0
    """Token merging ratio (ToMe for SD) baked into the UNet's highest-resolution self-attention: the share of
    tokens merged into their most similar neighbour before self-attention and copied back after, at least 0
    (off) and below 1 (compiler/passes/tome.py). Trades prompt adherence for UNet speed at large sizes."""
    attention_slicing: str = "off"
    """`off`, `auto`, or a slice count N (2 to 64): compute the UNet's self-attention without holding the whole
    queries x keys score matrix, to lower peak memory at large sizes (compiler/passes/attention_slicing.py)."""
    lora_inputs: bool = False
    """Export the UNet and text encoder with a low-rank delta per LoRA-targetable layer fed as graph inputs, so
    requests can select LoRA adapters (`kiln lora add`) without recompiling (compiler/lora_inputs.py). Needs
    fp32 UNet and text encoder; excludes token merging and attention slicing."""
    max_loras: int = 4
    """With lora_inputs: most adapters one request may select, 1 to 16."""
    parity_threshold: dict[str, float] = field(
        default_factory=lambda: {"text_encoder": 1e-3, "unet": 1e-3, "vae_decoder": 1e-3, "vae_encoder": 1e-3}
    )
    """Largest allowed max-abs difference between ONNX Runtime and PyTorch fp32 outputs, per component."""
    default_steps: int | None = None
    """Steps when a request leaves `steps` unset (1 to max_steps). None: the source folder's `kiln.json`
    recommendation, else 20."""
    default_guidance_scale: float | None = None
    """Guidance when a request leaves it unset (0 to 30). None: `kiln.json`'s, else 7.5."""
    default_sampler: str | None = None
    """Sampler when a request leaves it unset. None: `kiln.json`'s, else dpmpp_2m_karras."""
    default_size: int | None = None
    """Width and height when a request leaves them unset (a multiple of 8, 64 to max_size). None: `kiln.json`'s
    `defaults.size`, else the UNet's sample_size times the VAE's factor (SD 2.1's UNet says 768: SD-Turbo, its
    distillation, is meant for 512)."""
    preset: str | None = None
    """Request defaults for a kind of model (PRESETS): `turbo` is steps 1, guidance 0, sampler turbo, size 512.
    It fills the default_* fields left None; the manifest's compile_config keeps both."""
    reuse_exports: bool = True
    """Copy fp32 graphs already exported from the same source by the same exporter from a bundle in the
    store instead of exporting them again (compiler/reuse.py); their parity figures come along unless a pass
    changes the graph, which is then verified again."""
    max_size: int = 1024
    """Largest width or height a client may ask for (multiple of 8, at least the default size)."""
    max_steps: int = 150
    """Largest number of denoising steps a request may ask for."""
    max_images: int = 4
    """Largest num_images per request."""
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    """Calibration, 4-bit block sizes and the fidelity gate (used when a component is not fp32)."""
    plan: dict[str, str] = field(init=False)
    """Per-component precision parsed from `precision` (`int8?`: int8 if the fidelity gate passes)."""

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(
                f"name={self.name!r} must be 1-64 characters of lowercase letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        self.plan = precision_plan.parse(self.precision)
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"preset={self.preset!r} is not one of: {', '.join(PRESETS)}")
            for key, value in PRESETS[self.preset].items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        tome.check_args(self.tome)
        if self.attention_slicing != "off":
            self.attention_slicing = str(attention_slicing.parse(self.attention_slicing))
        if not 17 <= self.opset <= 21:
            raise ValueError(f"opset={self.opset} must be between 17 and 21")
        if self.max_size % 8 or self.max_size < 64:
            raise ValueError(f"max_size={self.max_size} must be a multiple of 8 and at least 64")
        if not 1 <= self.max_steps <= 1000:
            raise ValueError(f"max_steps={self.max_steps} must be between 1 and 1000")
        if self.default_steps is not None and not 1 <= self.default_steps <= self.max_steps:
            raise ValueError(f"default_steps={self.default_steps} must be between 1 and max_steps={self.max_steps}")
        if self.default_guidance_scale is not None and not 0 <= self.default_guidance_scale <= 30:
            raise ValueError(f"default_guidance_scale={self.default_guidance_scale} must be between 0 and 30")
        if self.default_sampler is not None and self.default_sampler not in SAMPLER_NAMES:
            raise ValueError(f"default_sampler={self.default_sampler!r} is not one of: {', '.join(SAMPLER_NAMES)}")
        if self.default_size is not None and (self.default_size % 8 or
                                              not MIN_DEFAULT_SIZE <= self.default_size <= self.max_size):
            raise ValueError(f"default_size={self.default_size} must be a multiple of 8 between {MIN_DEFAULT_SIZE} "
                             f"and max_size={self.max_size}")
        if not 1 <= self.max_images <= 16:
            raise ValueError(f"max_images={self.max_images} must be between 1 and 16")
        if not 1 <= self.max_loras <= 16:
            raise ValueError(f"max_loras={self.max_loras} must be between 1 and 16")
        if self.lora_inputs:
            from compiler import lora_inputs

            lora_inputs.check_config(self.plan, self.tome, self.attention_slicing)
        unknown = set(self.parity_threshold) - set(COMPONENT_NAMES)
        if unknown:
            raise ValueError(f"parity_threshold names {sorted(unknown)}; components are {COMPONENT_NAMES}")

    def resolve_defaults(self, recommended: dict[str, object], native_size: int) -> dict[str, object]:
        """Request defaults (steps, guidance_scale, sampler, size): explicit config or preset first, then the
        source's recommendation (`kiln.json`), then Kiln's; the size last from the model (`native_size`)."""
        explicit = {"steps": self.default_steps, "guidance_scale": self.default_guidance_scale,
                    "sampler": self.default_sampler, "size": self.default_size}
        builtin = {**BUILTIN_DEFAULTS, "size": native_size}
        out = {k: explicit[k] if explicit[k] is not None else recommended.get(k, v) for k, v in builtin.items()}
        size = out["size"]
        if not isinstance(size, int) or isinstance(size, bool):  # kiln.json may say 512.0 or "512"
            raise ValueError(f"default size={size!r} must be a whole number of pixels")
        CompileConfig(name=self.name, default_steps=int(out["steps"]),  # type: ignore[call-overload]
                      default_guidance_scale=float(out["guidance_scale"]),  # type: ignore[arg-type]
                      default_sampler=str(out["sampler"]), max_steps=self.max_steps,
                      default_size=size if size != native_size else None,  # the model's own may pass max_size
                      max_size=self.max_size)  # validates them
        return out

    def graph_fields(self) -> dict[str, object]:
        """The fields that change the exported graphs (defaults and limits do not)."""
        out: dict[str, object] = {"precision": self.plan, "opset": self.opset, "fusions": self.fusions}
        if self.tome:  # only when on: bundles compiled before these switches keep their hash
            out["tome"] = self.tome
        if self.attention_slicing != "off":
            out["attention_slicing"] = self.attention_slicing
        if self.lora_inputs:
            out["lora_inputs"] = True
        if self.quantized:
            out["quantize"] = self.quantize.graph_fields()
        return out

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.graph_fields(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def unet_passes(self) -> bool:
        """Token merging or attention slicing changes the UNet's graph (it is exported afresh, not reused)."""
        return bool(self.tome) or self.attention_slicing != "off"

    @property
    def quantized(self) -> bool:
        """Some component is planned at a precision other than fp32."""
        return any(p != "fp32" for p in self.plan.values())

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
