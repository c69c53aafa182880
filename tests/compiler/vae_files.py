"""Real VAE files for the VAE-swap tests: a tiny AutoencoderTiny (TAESD design) folder, and AutoencoderKL weights
written in the original (CompVis / AUTOMATIC1111) single-file layout.

The diffusers -> original key map is the tests' own (tests/compiler/ldm_layout.py; product code reads such files
with diffusers' loader only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_TAESD = {"encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8),
              "num_encoder_blocks": (1, 1, 1, 1), "num_decoder_blocks": (1, 1, 1, 1), "latent_channels": 4}
"""AutoencoderTiny with TAESD's structure (4 blocks: 8x down and up) and 8 channels instead of 64."""


def write_taesd(out: Path, seed: int, **overrides: Any) -> Path:
    """A diffusers AutoencoderTiny folder with weights from `seed`, scaled up so its random images are not flat."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(**{**TINY_TAESD, **overrides}).eval()
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.mul_(1.5)
    vae.save_pretrained(out, safe_serialization=True)
    return out


def write_kl(out: Path, config: dict[str, Any], seed: int) -> Any:
    """A diffusers AutoencoderKL folder with `config` and weights from `seed`; returns the module."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(config).eval()
    vae.save_pretrained(out, safe_serialization=True)
    return vae


def to_original(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """An AutoencoderKL state dict under the original layout's names (no prefix), attention weights as 1x1 convs."""
    from tests.compiler.ldm_layout import vae_to_ldm

    return {k: v.contiguous() for k, v in vae_to_ldm(state, config).items()}


def write_single_file(out: Path, vae: Any, prefix: str = "", dtype: Any = None) -> Path:
    """`vae`'s weights as one .safetensors file in the original layout (optionally under a prefix, e.g.
    `first_stage_model.`, and in another dtype, e.g. torch.float16 as most shared files are)."""
    from safetensors.torch import save_file

    state = to_original(vae.state_dict(), dict(vae.config))
    save_file({prefix + k: (v.to(dtype) if dtype is not None else v) for k, v in state.items()}, str(out))
    return out


def tiny_vae_config(source: Path) -> dict[str, Any]:
    return json.loads((source / "vae" / "config.json").read_text())
