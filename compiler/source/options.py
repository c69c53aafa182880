"""What a compile adds to or reads beside its source model: LoRAs, embeddings, a VAE, single-file settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from runtime.samplers.schedule import PREDICTION_TYPES  # what the samplers can run

LORA_SCALE_RANGE = (-4.0, 4.0)


@dataclass(frozen=True)
class LoraSpec:
    path: str
    """A LoRA file: kohya / AUTOMATIC1111 (`lora_unet_*`, `lora_te_*`, LoCon included) or diffusers / PEFT."""
    scale: float = 1.0
    """Strength it is fused at, -4 to 4 (`FILE:SCALE` on the command line)."""

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`FILE` or `FILE:SCALE` (a Windows drive letter or a colon inside the name stays part of FILE)."""
        path, scale = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                scale = float(tail)
                path = head
            except ValueError:
                pass
        lo, hi = LORA_SCALE_RANGE
        if not lo <= scale <= hi:
            raise ValueError(f"--lora {text!r}: scale={scale} must be between {lo} and {hi}")
        return cls(path, scale)


@dataclass(frozen=True)
class EmbeddingSpec:
    path: str
    """A textual-inversion embedding: AUTOMATIC1111 `.pt` / `.safetensors` (`string_to_param` or `emb_params`)
    or diffusers `learned_embeds.safetensors`."""
    token: str | None = None
    """The token prompts use (`FILE:TOKEN`); None: a diffusers file's own token (its one key), else the file
    name's stem, as AUTOMATIC1111 names its embeddings (an AUTOMATIC1111 file's `name` field is not used)."""

    @classmethod
    def parse(cls, text: str) -> EmbeddingSpec:
        head, sep, tail = text.rpartition(":")
        if sep and head and tail and "/" not in tail and "\\" not in tail:
            return cls(head, tail)
        return cls(text, None)


@dataclass
class SourceOptions:
    """Everything a compile takes besides the source model itself (compiler/source/prepare.py applies it)."""

    loras: list[LoraSpec] = field(default_factory=list)
    """LoRAs fused into the UNet and text encoder weights before export, in order."""
    embeddings: list[EmbeddingSpec] = field(default_factory=list)
    """Textual-inversion embeddings added to the tokenizer and the text encoder's embedding table."""
    vae: str | None = None
    """A VAE replacing the model's own: a diffusers folder (AutoencoderKL or AutoencoderTiny) or a single
    `.safetensors` VAE in the original layout."""
    tiny_decoder: str | None = None
    """A diffusers AutoencoderTiny folder (TAESD) compiled as an extra decoder beside the full VAE, for requests
    that ask for `decoder: "tiny"` (fast drafts); the model's weights are left as they are."""
    prediction_type: str | None = None
    """Single-file checkpoints: `epsilon` or `v_prediction` when neither the tensors nor a `NAME.yaml` beside
    the file tell (SD 2.x 768 models predict v)."""
    model_config: str | None = None
    """Single-file checkpoints: a diffusers folder whose configs describe the checkpoint, instead of the
    family detected from its tensors (for architectures Kiln does not ship configs for)."""

    def __post_init__(self) -> None:
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r} is not one of: {', '.join(PREDICTION_TYPES)}")
        for spec in [*self.loras, *self.embeddings]:
            if not Path(spec.path).is_file():
                raise FileNotFoundError(f"{spec.path}: no such file")
        if self.vae is not None and not Path(self.vae).exists():
            raise FileNotFoundError(f"--vae {self.vae}: no such file or folder")
        if self.tiny_decoder is not None and not Path(self.tiny_decoder).exists():
            raise FileNotFoundError(f"--tiny-decoder {self.tiny_decoder}: no such folder")

    @property
    def changes_weights(self) -> bool:
        """The source must be rebuilt (LoRAs fused, rows added, a VAE swapped) before export."""
        return bool(self.loras or self.embeddings or self.vae)
