"""LoRA adapters (PEFT) on the UNet's attention projections and, optionally, the text encoder's; exported as
one kohya / AUTOMATIC1111 .safetensors file with diffusers' own converters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
"""The UNet's attention projections (self- and cross-attention), as diffusers' Dreambooth LoRA script."""
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
"""The CLIP text encoder's attention projections."""
KOHYA_SD1_TEXT_PREFIX = "lora_te_text_model_encoder_"
"""SD 1.x kohya files name the text encoder `lora_te_text_model_*`. diffusers' converter writes SDXL's first
text encoder prefix `lora_te1_` and, with transformers 5 (no `text_model` level in CLIPTextModel), no
`text_model_`: the one prefix is set to SD 1.x's (tests/lora_files.py does the same)."""


def narrowest(model: Any, targets: list[str]) -> int:
    """The smallest in/out width among the modules a LoRA on `targets` changes."""
    import torch

    widths = [min(m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]
    if not widths:
        raise ValueError(f"the model has no layer named {', '.join(targets)}: not an SD attention design")
    return min(widths)


def add(model: Any, targets: list[str], rank: int, what: str) -> None:
    """A PEFT LoRA (alpha = rank, B zero-initialised as PEFT does) on `targets` of `model`; only its weights
    train."""
    from peft import LoraConfig, inject_adapter_in_model

    cap = narrowest(model, targets)
    if rank > cap:
        raise ValueError(f"rank={rank} is out of range for this model: its narrowest {what} attention projection "
                         f"is {cap} wide, so allowed 1 to {cap}")
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=targets)
    if hasattr(model, "add_adapter") and what == "UNet":
        model.add_adapter(config)
    else:
        inject_adapter_in_model(config, model)


def export(unet: Any, text_encoder: Any | None, path: Path) -> Path:
    """One kohya-format file: `lora_unet_*` (and `lora_te_*`) down/up weights and alpha, fp32."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    # PEFT's names (lora_A / lora_B), prefixed by the pipeline part, are what the kohya converter reads
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    if text_encoder is not None:
        state.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(text_encoder).items()})
    kohya = {}
    for k, v in convert_state_dict_to_kohya(state).items():
        if k.startswith("lora_te1_"):
            k = KOHYA_SD1_TEXT_PREFIX + k.removeprefix("lora_te1_").removeprefix("text_model_").removeprefix(
                "encoder_")
        kohya[k] = v.detach().float().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(kohya, str(tmp), metadata={"format": "pt", "ss_network_module": "networks.lora"})
    tmp.chmod(0o644)  # safetensors writes 0600; a server reading it may run as another user
    tmp.replace(path)
    return path
