"""The Dreambooth recipe: one dataclass, one flag per field (cli/flags.py `add_flags`)."""

from __future__ import annotations

from dataclasses import dataclass

RANK_RANGE = (1, 256)
"""LoRA ranks a run may ask for (the model's narrowest targeted layer may cap it further: see lora.py)."""
PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class DreamboothConfig:
    instance_prompt: str = ""
    """The prompt of every instance image; must contain --token (e.g. "a photo of sks dog")."""
    token: str = "sks"
    """The rare token that names the subject; it must appear (as a word) in the instance prompt."""
    class_prompt: str = ""
    """The subject's class without the token (e.g. "a photo of a dog"): the prompt of the class images."""
    prior_preservation: bool = False
    """Train on class images the base model made for --class-prompt alongside the instance images, so the model
    keeps what it knew of the class (Ruiz et al. 2022; diffusers' train_dreambooth.py)."""
    num_class_images: int = 8
    """Class images to generate with the base model (cached in OUT/class-images/, reused on a rerun)."""
    prior_loss_weight: float = 1.0
    """loss = instance MSE + this x class MSE."""
    class_image_steps: int = 25
    """Inference steps of the base model's pipeline when it draws the class images."""
    class_guidance: float = 7.5
    """Guidance scale of the base model's pipeline when it draws the class images."""
    lora: bool = False
    """Train a LoRA (PEFT) on the UNet's attention projections instead of the whole UNet; the output is one
    kohya / AUTOMATIC1111 .safetensors file (OUT/lora.safetensors)."""
    rank: int = 4
    """LoRA rank (alpha is the rank: scale 1, which the kohya file's alpha says)."""
    train_text_encoder: bool = False
    """Train the text encoder too (full: all its weights; LoRA: its q/k/v/out_proj projections)."""
    steps: int = 400
    """Optimizer steps."""
    learning_rate: float = 5e-6
    """AdamW learning rate (diffusers suggests 5e-6 for a full fine-tune, 1e-4 for a LoRA)."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps, then the learning rate stays constant."""
    batch_size: int = 1
    """Instance images per step; with prior preservation the same number of class images joins each batch."""
    resolution: int = 0
    """Training size in pixels (a multiple of 8): every image is resized to it (bicubic, squashed to a square).
    0: the images' own size, which must then be the same for all (width and height multiples of 8)."""
    seed: int = 0
    """Seeds the data order, the noise, the timesteps and the class images."""
    checkpoint_every: int = 100
    """Optimizer steps between checkpoints (OUT/checkpoint.pt; the last step always writes one)."""
    offset_noise: float = 0.0
    """Std of a per-image, per-channel constant added to the training noise (0: none). A base trained with
    offset noise (Kiln's shapes model: 0.25, train/shapes/trainer.py) should be fine-tuned with the same."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this norm."""
    mixed_precision: str = "auto"
    """auto: bf16 autocast on a CUDA GPU that has it, else fp16 with a gradient scaler; fp32 on CPU. no: fp32."""

    def __post_init__(self) -> None:
        if not self.token.strip() or len(self.token.split()) != 1:
            raise ValueError(f"token={self.token!r} must be one word")
        if not self.instance_prompt.strip():
            raise ValueError("instance_prompt is empty: give one that contains the token, e.g. "
                             f"'a photo of {self.token} dog'")
        if self.token not in self.instance_prompt.replace(",", " ").split():
            raise ValueError(f"instance_prompt={self.instance_prompt!r} does not contain the token {self.token!r} "
                             "as a word: the subject is learned under that token")
        if self.prior_preservation and not self.class_prompt.strip():
            raise ValueError("prior_preservation needs a class prompt (--class-prompt, e.g. 'a photo of a dog')")
        if self.class_prompt and self.token in self.class_prompt.replace(",", " ").split():
            raise ValueError(f"class_prompt={self.class_prompt!r} contains the token {self.token!r}: the class "
                             "prompt describes the class without the subject")
        lo, hi = RANK_RANGE
        if not lo <= self.rank <= hi:
            raise ValueError(f"rank={self.rank} is out of range: allowed {lo} to {hi}")
        for name in ("steps", "batch_size", "checkpoint_every", "num_class_images", "class_image_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.resolution < 0 or self.resolution % 8:
            raise ValueError(f"resolution={self.resolution} must be 0 (the images' size) or a positive multiple "
                             "of 8")
        if self.offset_noise < 0:
            raise ValueError(f"offset_noise={self.offset_noise} must be at least 0")
        if self.prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight={self.prior_loss_weight} must be at least 0")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be above 0")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps={self.lr_warmup_steps} must be at least 0")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of {', '.join(PRECISIONS)}")
