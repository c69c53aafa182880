"""Real VAE files for the VAE-swap tests: a tiny AutoencoderTiny (TAESD design) folder, and AutoencoderKL weights
written in the original (CompVis / AUTOMATIC1111) single-file layout.

The diffusers -> original key map below is the test's own (product code reads such files with diffusers' loader
only); it follows diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, for today's attention
names (to_q/to_k/to_v/to_out.0), and any number of blocks and resnets.
"""

from __future__ import annotations

import json
import re
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
    n = len(config["block_out_channels"])
    per = int(config.get("layers_per_block", 2))
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(n):
        for j in range(per):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(per + 1):
            pairs.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
    for i in range(2):
        pairs.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in state.items():
        new = key
        for orig, ours in pairs:
            new = new.replace(ours, orig)
        if "attn_1" in new:
            for orig, ours in attn:
                new = re.sub(rf"attn_1\.{re.escape(ours)}", f"attn_1.{orig}", new)
            if new.endswith("weight") and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        out[new] = value.contiguous()
    return out


def write_single_file(out: Path, vae: Any, prefix: str = "", dtype: Any = None) -> Path:
    """`vae`'s weights as one .safetensors file in the original layout (optionally under a prefix, e.g.
    `first_stage_model.`, and in another dtype, e.g. torch.float16 as most shared files are)."""
    from safetensors.torch import save_file

    state = to_original(vae.state_dict(), dict(vae.config))
    save_file({prefix + k: (v.to(dtype) if dtype is not None else v) for k, v in state.items()}, str(out))
    return out


def tiny_vae_config(source: Path) -> dict[str, Any]:
    return json.loads((source / "vae" / "config.json").read_text())
