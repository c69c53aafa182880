"""The Dreambooth recipe: one dataclass, one flag per field (cli/flags.py `add_flags`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RANK_RANGE = (1, 256)
"""LoRA ranks a run may ask for (the model's narrowest targeted layer may cap it further: see lora.py)."""
PRECISIONS = ("auto", "no", "bf16", "fp16")


def has_word(prompt: str, token: str) -> bool:
    return token in prompt.replace(",", " ").split()


def check_instance_prompt(prompt: str, token: str, where: str) -> None:
    if not has_word(prompt, token):
        raise ValueError(f"{where}={prompt!r} does not contain the token {token!r} as a word: the subject is "
                         "learned under that token")


def check_class_prompt(prompt: str, token: str, where: str) -> None:
    if has_word(prompt, token):
        raise ValueError(f"{where}={prompt!r} contains the token {token!r}: the class prompt describes the class "
                         "without the subject")


@dataclass
class DreamboothConfig:
    instance_prompt: str = ""
    """The prompt of the instance images; must contain --token (e.g. "a photo of sks dog"). An image NAME.png
    with a caption file NAME.txt beside it trains with that caption instead (kohya's convention; it must contain
    the token too), so images that differ in more than the subject can say how."""
    token: str = "sks"
    """The rare token that names the subject; it must appear (as a word) in the instance prompt."""
    class_prompt: str = ""
    """The subject's class without the token (e.g. "a photo of a dog"): the prompt of the class images."""
    class_prompts_file: str = ""
    """Instead of --class-prompt: a text file of class prompts, one per line; class image i is drawn for, and
    trains with, line i mod the line count (a class with many looks, e.g. every kind of shapes scene)."""
    prior_preservation: bool = False
    """Train on class images the base model made for --class-prompt alongside the instance images, so the model
    keeps what it knew of the class (Ruiz et al. 2022; diffusers' train_dreambooth.py)."""
    num_class_images: int = 8
    """Class images to generate with the base model (cached in --class-data-dir, reused on a rerun)."""
    class_data_dir: str = ""
    """Where the class images are cached (default OUT/class-images): runs that share the base model and the
    class recipe can share the folder, and draw the images once."""
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
    mask_weight: float = 0.0
    """An instance image NAME.png with a mask NAME.mask.png beside it (white: the subject) weighs the latent
    pixels the mask touches, and their neighbours, 1 + this in its loss, the rest 1 (a weighted mean per image).
    For small subjects whose details are a small share of the image: the base shapes model needed the same to
    tell small squares from circles (train/README.md). 0: masks are not used."""
    snr_gamma: float = 0.0
    """Min-SNR loss weighting (Hang et al. 2023; diffusers' --snr_gamma): each example's MSE is weighted
    min(SNR, gamma) / SNR for an epsilon model, min(SNR, gamma) / (SNR + 1) for a v model, so nearly clean steps
    stop dominating. 0: the plain MSE."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this norm."""
    mixed_precision: str = "auto"
    """auto: bf16 autocast on a CUDA GPU that has it, else fp16 with a gradient scaler; fp32 on CPU. no: fp32.
    bf16: bf16 autocast on the GPU or the CPU (fp32 weights and optimizer; fast on CPUs with AMX or AVX-512
    bf16). fp16: fp16 autocast with a gradient scaler (GPU only)."""

    def class_prompts(self) -> list[str]:
        """The class prompts: [class_prompt], or the lines of class_prompts_file (blank lines skipped)."""
        if not self.class_prompts_file:
            return [self.class_prompt]
        try:
            text = Path(self.class_prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"class_prompts_file={self.class_prompts_file!r}: unreadable ({e})") from None
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not prompts:
            raise ValueError(f"class_prompts_file={self.class_prompts_file!r} has no prompts (one per line)")
        for n, p in enumerate(prompts, 1):
            check_class_prompt(p, self.token, f"{self.class_prompts_file} prompt {n}")
        return prompts

    def __post_init__(self) -> None:
        if not self.token.strip() or len(self.token.split()) != 1:
            raise ValueError(f"token={self.token!r} must be one word")
        if self.instance_prompt.strip():  # empty: every image has its caption file (checked with the images)
            check_instance_prompt(self.instance_prompt, self.token, "instance_prompt")
        if self.class_prompt and self.class_prompts_file:
            raise ValueError("give class_prompt or class_prompts_file, not both")
        if self.prior_preservation and not (self.class_prompt.strip() or self.class_prompts_file):
            raise ValueError("prior_preservation needs a class prompt (--class-prompt, e.g. 'a photo of a dog', or "
                             "--class-prompts-file)")
        if self.class_prompt:
            check_class_prompt(self.class_prompt, self.token, "class_prompt")
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
        if self.mask_weight < 0:
            raise ValueError(f"mask_weight={self.mask_weight} must be at least 0 (0: masks not used)")
        if self.snr_gamma < 0:
            raise ValueError(f"snr_gamma={self.snr_gamma} must be at least 0 (0: plain MSE)")
        if self.prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight={self.prior_loss_weight} must be at least 0")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be above 0")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps={self.lr_warmup_steps} must be at least 0")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of {', '.join(PRECISIONS)}")
