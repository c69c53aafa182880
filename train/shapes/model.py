"""Component configs of the shapes model: the SD v1 block types at a size two CPU cores can train."""

from __future__ import annotations

import json
from pathlib import Path

SCHEDULER_CONFIG = {
    **json.loads(
        (Path(__file__).parents[2] / "compiler/source/configs/sd-v1/scheduler/scheduler_config.json").read_text()
    ),
    # DDPM's linear betas instead of SD v1's scaled-linear 0.00085-0.012: at the last training step SD v1 keeps
    # sqrt(alpha_bar) = 0.068 of the signal, and on 16x16 latents that is enough for the UNet to read where
    # the shape is from the noisy latent at every training step. Linear betas end at sqrt(alpha_bar) = 0.0064.
    "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
    # v-prediction (as SD 2.x): near pure noise, an epsilon-predicting UNet only has to echo its input, and
    # what it knows about the image moves its output by sqrt(alpha_bar), so the loss there cannot teach it the
    # layout the prompt asks for. A v-predicting UNet has to output the expected image itself. See train/README.md.
    "prediction_type": "v_prediction",
}

TEXT_ENCODER = {
    "vocab_size": 49408, "hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 96, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
}

VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 16,
    "block_out_channels": [32, 64, 64], "sample_size": 64, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
}
"""4x downsampling: 64x64 images <-> 16x16x4 latents."""

UNET = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [64, 128, 128], "norm_num_groups": 32, "cross_attention_dim": 96, "attention_head_dim": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
}


def build():  # type: ignore[no-untyped-def]
    """Fresh (text_encoder, vae, unet) torch modules with these configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return (CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)), AutoencoderKL(**VAE), UNet2DConditionModel(**UNET))
