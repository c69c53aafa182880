"""The error a source that cannot be compiled raises: it names the file and what does not fit."""


class SourceError(ValueError):
    """A checkpoint, LoRA, embedding or VAE file Kiln cannot use: unknown layout, truncated, wrong shapes,
    another architecture's, or a pickle that is not plain weights. The message names the file and the first
    tensor or key that does not fit."""
