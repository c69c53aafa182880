"""Load a local diffusers-format Stable Diffusion folder into PyTorch modules for export."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_store import sha256_file

REQUIRED = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_REQUIRED = ("text_encoder_2", "tokenizer_2")
"""SDXL's second text encoder (OpenCLIP bigG with projection) and its tokenizer, beside the parts above."""
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json")


@dataclass
class SourceModel:
    """A diffusers folder, checked for the parts a bundle needs; modules load on first use."""

    path: Path
    scheduler_config: dict[str, Any]
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    tiny_decoder: Path | None = None
    """A diffusers AutoencoderTiny folder compiled as the optional `vae_decoder_tiny` (`--tiny-decoder`)."""
    _modules: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def sdxl(self) -> bool:
        """An SDXL-design model: two text encoders and the UNet's `text_time` added conditioning."""
        return self.unet_config.get("addition_embed_type") == "text_time"

    @property
    def architecture(self) -> str:
        """`sdxl`, or `sd` (SD 1.x/2.x: one text encoder)."""
        return "sdxl" if self.sdxl else "sd"

    @property
    def model_index(self) -> dict[str, Any]:
        path = self.path / "model_index.json"
        return json.loads(path.read_text()) if path.exists() else {}

    @property
    def vae_scale_factor(self) -> int:
        # AutoencoderTiny: its encoder's blocks (each after the first halves the size; vae.py checks the decoder)
        cfg = self.vae_config
        return 2 ** (len(cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels") or (64,) * 4) - 1)

    @property
    def default_size(self) -> int:
        return int(self.unet_config["sample_size"]) * self.vae_scale_factor

    @property
    def tiny_decoder_config(self) -> dict[str, Any]:
        assert self.tiny_decoder is not None
        return json.loads((self.tiny_decoder / "config.json").read_text())

    def module(self, name: str) -> Any:
        """`unet`, `vae`, `text_encoder`, `text_encoder_2` (SDXL) or `vae_tiny` (the tiny decoder's AutoencoderTiny) as an fp32 torch
        module in eval mode. The VAE's class is its config's `_class_name`: AutoencoderKL or AutoencoderTiny."""
        if name not in self._modules:
            import torch

            folder = self.path / name
            if name == "unet":
                from diffusers import UNet2DConditionModel as cls
            elif name == "vae":
                import diffusers

                cls = getattr(diffusers, vae_class(self.vae_config))
            elif name == "vae_tiny" and self.tiny_decoder is not None:
                from diffusers import AutoencoderTiny as cls

                folder = self.tiny_decoder
            elif name == "text_encoder":
                from transformers import CLIPTextModel as cls
            elif name == "text_encoder_2":
                from transformers import CLIPTextModelWithProjection as cls
            else:
                raise KeyError(name)
            from transformers.utils import logging as hf_logging

            # transformers draws a "Loading weights" bar per load, which would cut into the compile's own display
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                self._modules[name] = cls.from_pretrained(folder, torch_dtype=torch.float32).eval()
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
        return self._modules[name]

    def release(self, name: str) -> None:
        self._modules.pop(name, None)

    def release_all(self) -> None:
        """Drop every loaded PyTorch module (before the quantize stage needs the memory)."""
        self._modules.clear()

    def recommended_defaults(self) -> dict[str, Any]:
        """`kiln.json` beside `model_index.json` may recommend request defaults (steps, guidance_scale, sampler,
        and size: the width and height, e.g. 512 for SD-Turbo, whose SD 2.1 UNet says 768)."""
        path = self.path / "kiln.json"
        if not path.exists():
            return {}
        data = json.loads(path.read_text()).get("defaults", {})
        unknown = set(data) - {"steps", "guidance_scale", "sampler", "size"}
        if unknown:
            raise ValueError(f"{path}: unknown defaults {sorted(unknown)}; allowed: steps, guidance_scale, sampler, "
                             "size")
        return data

    def content_hash(self) -> str:
        """sha256 over every file's relative path and bytes: the source identity in the manifest."""
        h = hashlib.sha256()
        for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(self.path)).encode() + b"\0")
            h.update(sha256_file(f).encode())
        return h.hexdigest()




VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def vae_class(config: dict[str, Any]) -> str:
    """The diffusers class of a VAE config: AutoencoderKL (SD's own) or AutoencoderTiny (TAESD)."""
    cls = config.get("_class_name", "AutoencoderKL")
    if cls not in VAE_CLASSES:
        raise ValueError(f"vae/config.json: _class_name={cls!r} is not one of: {', '.join(VAE_CLASSES)}")
    return str(cls)


def load_source(path: str | Path) -> SourceModel:
    """Check that `path` is a diffusers SD folder and read its configs (no weights yet)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"source model {root} is not a folder; pass a local diffusers folder "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    missing = [p for p in REQUIRED if not (root / p).exists()]
    if not (root / "tokenizer/tokenizer.json").exists():  # transformers 5 saves only tokenizer.json
        missing += [f"tokenizer/{f}" for f in TOKENIZER_FILES[:2] if not (root / "tokenizer" / f).exists()]
    if missing:
        raise FileNotFoundError(f"source model {root} lacks {', '.join(missing)}")
    unet_config = json.loads((root / "unet/config.json").read_text())
    if unet_config.get("addition_embed_type") == "text_time":
        lacking = [p for p in SDXL_REQUIRED if not (root / p).exists()]
        if lacking:
            raise FileNotFoundError(f"source model {root} is an SDXL design (unet addition_embed_type=text_time) "
                                    f"and lacks {', '.join(lacking)}")
    elif unet_config.get("addition_embed_type") is not None:
        raise ValueError(f"source model {root}: unet addition_embed_type={unet_config['addition_embed_type']!r} "
                         "is not supported; Kiln compiles SD 1.x/2.x (none) and SDXL (text_time) UNets")
    if int(unet_config.get("in_channels", 4)) not in (4, 9):
        raise ValueError(f"source model {root}: unet in_channels={unet_config.get('in_channels')} must be 4 "
                         "(text-to-image) or 9 (inpainting: latents, mask, masked-image latents)")
    return SourceModel(
        path=root,
        scheduler_config=json.loads((root / "scheduler/scheduler_config.json").read_text()),
        unet_config=unet_config,
        vae_config=json.loads((root / "vae/config.json").read_text()),
    )
