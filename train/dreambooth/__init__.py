"""`kiln train dreambooth`: teach a Stable Diffusion model a subject from a few images under a rare token, with
class-prior preservation, as a full UNet fine-tune (a diffusers folder) or a LoRA (one kohya-format file)."""
