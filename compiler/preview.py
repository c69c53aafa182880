"""Fit the linear latent-to-RGB map the runtime uses for cheap progress previews (no VAE at run time).

The VAE encodes a fixed set of synthetic images (flat colours, gradients and rectangles: the colour content a
latent pixel carries); a least-squares fit then maps each scaled latent pixel (what the UNet denoises) to the
mean colour of the image patch it covers. Stored in the manifest as `model.latent_rgb`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SIZE_LATENT = 16
"""Synthetic images are SIZE_LATENT latent pixels square (16 * the VAE's scale factor in image pixels)."""
IMAGES = 24


def synthetic_images(size: int, count: int = IMAGES, seed: int = 0) -> np.ndarray:
    """float32 [count, 3, size, size] in [-1, 1]: a background (flat or a linear gradient) with 1-3 flat
    rectangles, all colours random."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    for i in range(count):
        a, b = rng.random(3), rng.random(3)
        ramp = (xx if i % 2 else yy) if i % 3 else np.zeros_like(xx)
        img = a[:, None, None] * (1 - ramp) + b[:, None, None] * ramp
        for _ in range(rng.integers(1, 4)):
            y0, x0 = rng.integers(0, size - size // 4, 2)
            h, w = rng.integers(size // 8, size // 2, 2)
            img[:, y0:y0 + h, x0:x0 + w] = rng.random(3)[:, None, None]
        out[i] = img * 2 - 1
    return out


def fit_latent_rgb(vae: Any, scaling_factor: float, scale_factor: int) -> dict[str, Any]:
    """{"weights": [C][3], "bias": [3], "rmse": float}: rgb in [0, 1] ~ latent (scaled) @ weights + bias."""
    import torch

    from compiler.export import vae_moments

    size = SIZE_LATENT * scale_factor
    images = synthetic_images(size)
    with torch.inference_mode():  # AutoencoderKL or AutoencoderTiny: the posterior's mean, as the encoder exports
        moments = vae_moments(vae, torch.from_numpy(images))
        mean = moments[:, : moments.shape[1] // 2].float().numpy() * np.float32(scaling_factor)
    n, c, h, w = mean.shape
    # the colour each latent pixel covers: the image average-pooled to the latent grid
    target = images.reshape(n, 3, h, size // h, w, size // w).mean(axis=(3, 5)) / 2 + 0.5
    x = np.concatenate([mean.transpose(0, 2, 3, 1).reshape(-1, c), np.ones((n * h * w, 1), np.float32)], axis=1)
    y = target.transpose(0, 2, 3, 1).reshape(-1, 3)
    coef, *_ = np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)
    rmse = float(np.sqrt(np.mean((x @ coef - y) ** 2)))
    return {"weights": coef[:c].round(6).tolist(), "bias": coef[c].round(6).tolist(), "rmse": round(rmse, 5)}
