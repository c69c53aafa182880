"""Real-format LoRA files for the tiny model, written the way trainers write them (tests only).

A PEFT LoRA is injected into the tiny UNet and text encoder with random (non-zero) weights and saved with
diffusers' `save_lora_weights` (the diffusers / PEFT format); the same pairs converted with diffusers'
`convert_state_dict_to_kohya` give the kohya / AUTOMATIC1111 format (`lora_unet_*`, `lora_te_*`, alpha). For an
SDXL folder (tiny-sdxl) both text encoders get pairs: `text_encoder_2.*` in the PEFT file, `lora_te1_*` and
`lora_te2_*` in the kohya one, as SDXL trainers write them.
"""

from __future__ import annotations

from pathlib import Path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
LOCON_TARGETS = ["conv1", "conv2"]
"""The resnets' 3x3 convolutions LoCon adds (fused at compile time; per-request LoRA refuses them)."""


def _sdxl(source: Path) -> bool:
    return (source / "text_encoder_2").is_dir()


def _lora_pairs(source: Path, seed: int, rank: int, unet_targets: list[str], text: bool,
                alpha: float | None = None) -> tuple[dict, dict, dict]:
    """(unet, text_encoder, text_encoder_2) pairs; the last is empty unless `source` is an SDXL design."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(source / "unet")
    torch.manual_seed(seed)
    cfg = dict(r=rank, lora_alpha=alpha or rank, init_lora_weights=False)
    unet.add_adapter(LoraConfig(target_modules=unet_targets, **cfg))
    u = get_peft_model_state_dict(unet)
    t: dict = {}
    t2: dict = {}
    if text:
        te = CLIPTextModel.from_pretrained(source / "text_encoder")
        inject_adapter_in_model(LoraConfig(target_modules=TEXT_TARGETS, **cfg), te)
        t = {k.replace(".default.", "."): v for k, v in te.state_dict().items() if "lora_" in k}
        if _sdxl(source):
            te2 = CLIPTextModelWithProjection.from_pretrained(source / "text_encoder_2")
            inject_adapter_in_model(LoraConfig(target_modules=TEXT_TARGETS, **cfg), te2)
            t2 = {k.replace(".default.", "."): v for k, v in te2.state_dict().items() if "lora_" in k}
    # PEFT's random init is the size of a trained LoRA's delta on a random model; scale it to change the image
    # clearly but not wildly
    return tuple({k: v * 0.5 for k, v in d.items()} for d in (u, t, t2))  # type: ignore[return-value]


def write_peft(source: Path, out_dir: Path, seed: int = 5, rank: int = 4) -> Path:
    """diffusers / PEFT format: `pytorch_lora_weights.safetensors` (unet.*, text_encoder.* and for SDXL
    text_encoder_2.* lora_A/lora_B)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    u, t, t2 = _lora_pairs(source, seed, rank, UNET_TARGETS, text=True)
    if _sdxl(source):
        StableDiffusionXLPipeline.save_lora_weights(out_dir, unet_lora_layers=u, text_encoder_lora_layers=t,
                                                    text_encoder_2_lora_layers=t2)
    else:
        StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=u, text_encoder_lora_layers=t)
    return out_dir / "pytorch_lora_weights.safetensors"


def write_kohya(source: Path, out: Path, seed: int = 6, rank: int = 2, unet_targets: list[str] | None = None,
                text: bool = True, alpha: float | None = None) -> Path:
    """kohya / AUTOMATIC1111 format (`lora_unet_*.lora_down.weight`, `.lora_up.weight`, `.alpha`; alpha = rank
    unless given)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    u, t, t2 = _lora_pairs(source, seed, rank, unet_targets or UNET_TARGETS, text=text, alpha=alpha)
    state = {**{f"unet.{k}": v for k, v in u.items()}, **{f"text_encoder.{k}": v for k, v in t.items()},
             **{f"text_encoder_2.{k}": v for k, v in t2.items()}}
    # SD 1.x kohya files name the text encoder `lora_te_text_model_*`, SDXL ones `lora_te1_text_model_*` and
    # `lora_te2_text_model_*` (the converter writes `lora_te1_` for the first, and transformers 5 dropped the
    # `text_model` level from CLIPTextModel's module names)
    te1 = "lora_te1_text_model_encoder_" if _sdxl(source) else "lora_te_text_model_encoder_"
    kohya = {k.replace("lora_te1_encoder_", te1): v.contiguous()
             for k, v in convert_state_dict_to_kohya(state).items()}
    save_file(kohya, str(out))
    return out


def write_foreign(good_kohya: Path, out: Path) -> Path:
    """A kohya file with one extra layer the tiny UNet does not have (SD v1's third down block): the shape of a
    LoRA made for another architecture."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(good_kohya))
    key = "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_to_q"
    state[f"{key}.lora_down.weight"] = torch.zeros(2, 640)
    state[f"{key}.lora_up.weight"] = torch.zeros(640, 2)
    state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, str(out))
    return out
