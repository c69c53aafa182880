"""Test helper: write a diffusers SD model as a single-file checkpoint in the original (LDM) key layout, and an
SDXL model in Stability's SGM layout (`conditioner.embedders.0/1.*` for its two text encoders).

Product code never maps keys by hand (diffusers' converters do it); tests need the opposite direction to build
real-format files from tiny models, and a round trip through diffusers' converter checks this map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def unet_map(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(ldm prefix, diffusers prefix) pairs for a UNet2DConditionModel config."""
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("middle_block.1.", "mid_block.attentions.0."), ("middle_block.0.", "mid_block.resnets.0."),
             ("middle_block.2.", "mid_block.resnets.1.")]
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text + size/crop embeddings -> time embedding
        pairs += [("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
    for i in range(n):
        down_attn = cfg["down_block_types"][i].startswith("CrossAttn")
        up_attn = cfg["up_block_types"][i].startswith("CrossAttn")
        for j in range(per):
            k = (per + 1) * i + j + 1
            pairs.append((f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn:
                pairs.append((f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(per + 1):
            k = (per + 1) * i + j
            pairs.append((f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn:
                pairs.append((f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            pairs.append((f"input_blocks.{(per + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            k = (per + 1) * i + per
            pairs.append((f"output_blocks.{k}.{2 if up_attn else 1}.", f"up_blocks.{i}.upsamplers.0."))
    return pairs


RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
          ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
VAE_RESNET = [("nin_shortcut.", "conv_shortcut.")]
VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]


def vae_map(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    pairs = [("encoder.norm_out.", "encoder.conv_norm_out."), ("decoder.norm_out.", "decoder.conv_norm_out."),
             ("encoder.mid.attn_1.", "encoder.mid_block.attentions.0."),
             ("decoder.mid.attn_1.", "decoder.mid_block.attentions.0.")]
    for part in ("encoder", "decoder"):
        for j in range(2):
            pairs.append((f"{part}.mid.block_{j + 1}.", f"{part}.mid_block.resnets.{j}."))
    for i in range(n):
        for j in range(per):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(per + 1):
            pairs.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{n - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    return pairs


def vae_to_ldm(state: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """An AutoencoderKL state dict under the original layout's names (no prefix); attention weights as 1x1 convs."""
    pairs = vae_map(cfg)
    out = {}
    for key, t in state.items():
        new = _rename(key, pairs) or key
        for ldm, hf in VAE_RESNET:
            new = new.replace(f".{hf}", f".{ldm}")
        if ".attn_1." in new:
            for ldm, hf in VAE_ATTN:
                new = new.replace(f".attn_1.{hf}", f".attn_1.{ldm}")
            if t.ndim == 2:
                t = t[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        out[new] = t
    return out


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for ldm, hf in sorted(pairs, key=lambda p: -len(p[1])):
        if key.startswith(hf):
            return ldm + key[len(hf):]
    return None


OPEN_CLIP = [("embeddings.token_embedding.weight", "token_embedding.weight"),
             ("embeddings.position_embedding.weight", "positional_embedding"),
             ("final_layer_norm.", "ln_final."), ("encoder.layers.", "transformer.resblocks."),
             (".self_attn.out_proj.", ".attn.out_proj."), (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."),
             (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj.")]


def open_clip(text: dict[str, Any], prefix: str = "cond_stage_model.model.") -> dict[str, Any]:
    """A CLIP text encoder's tensors in SD 2.x's OpenCLIP layout (q, k, v packed as `in_proj`); SDXL's second
    encoder's projection as OpenCLIP stores it (`text_projection`, applied as x @ P: the transpose)."""
    import torch

    out: dict[str, Any] = {}
    for key, t in text.items():
        key = key.removeprefix("text_model.")
        if "_proj." in key and ".self_attn." in key and "out_proj" not in key:
            if ".q_proj." not in key:
                continue
            parts = [text.get(key.replace(".q_proj.", f".{x}_proj."), text.get("text_model." + key.replace(
                ".q_proj.", f".{x}_proj."))) for x in "qkv"]
            kind = key.rsplit(".", 1)[1]
            key = key.replace(".self_attn.q_proj." + kind, f".attn.in_proj_{kind}")
            t = torch.cat(parts)
        if key == "text_projection.weight":
            key, t = "text_projection", t.T
        for hf, ldm in OPEN_CLIP:
            key = key.replace(hf, ldm)
        out[prefix + key] = t
    return out


def to_ldm(folder: Path, dtype: Any = None) -> dict[str, Any]:
    """The diffusers folder's UNet, VAE and CLIP text encoder as one original-layout state dict (SDXL: with its
    second text encoder, in the SGM layout)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2") \
        if (folder / "text_encoder_2").is_dir() else None
    out = modules_to_ldm(UNet2DConditionModel.from_pretrained(folder / "unet"),
                         AutoencoderKL.from_pretrained(folder / "vae"),
                         CLIPTextModel.from_pretrained(folder / "text_encoder"), text_2)
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}


def modules_to_ldm(unet: Any, vae: Any, text: Any, text_2: Any = None) -> dict[str, Any]:
    """The modules' tensors under the original layout's names (meta tensors stay meta: shapes of real-size
    models without their weights)."""
    out: dict[str, Any] = {}
    pairs = unet_map(dict(unet.config))
    for key, t in unet.state_dict().items():
        new = _rename(key, pairs)
        if new is None:
            new = key
        if ".resnets." in key or "mid_block.resnets" in key:
            for ldm, hf in RESNET:
                new = new.replace(f".{hf}", f".{ldm}")
        out["model.diffusion_model." + new] = t
    vae_sd = vae_to_ldm(vae.state_dict(), dict(vae.config))
    out.update({"first_stage_model." + k: t for k, t in vae_sd.items()})
    if text_2 is not None:
        out.update(open_clip(text_2.state_dict(), prefix="conditioner.embedders.1.model."))
    if text_2 is None and text.config.hidden_act == "gelu":
        out.update(open_clip(text.state_dict()))  # SD 2.x
    else:
        clip = "conditioner.embedders.0.transformer." if text_2 is not None else "cond_stage_model.transformer."
        for key, t in text.state_dict().items():  # transformers 5 names them without the `text_model.` level
            out[clip + "text_model." + key.removeprefix("text_model.")] = t
    return out
