"""Fidelity figures of a quantized bundle against its fp32 twin: relative error, PSNR, SSIM; and the gate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_MIN_PSNR = 25.0
"""dB, final image vs fp32 at the same prompt, seed and steps (see docs in quantize/stage.py)."""
DEFAULT_MAX_REL_ERROR = 0.25
"""||quantized - fp32|| / ||fp32|| of a component's output on the fp32 pipeline's own inputs."""


class FidelityError(RuntimeError):
    """A quantized component (or the whole bundle) drifts from fp32 past the configured threshold."""


def rel_error(ref: np.ndarray, got: np.ndarray) -> float:
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    denom = float(np.linalg.norm(ref64))
    num = float(np.linalg.norm(got64 - ref64))
    if not np.isfinite(num):
        return float("inf")
    return num / denom if denom > 0 else (0.0 if num == 0 else float("inf"))


def psnr(ref: np.ndarray, got: np.ndarray) -> float:
    """dB between two uint8 images; identical images give inf."""
    mse = float(np.mean((ref.astype(np.float64) - got.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian over the first two axes, 'valid' region only (as Wang et al.'s SSIM)."""
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    n = 2 * radius + 1
    rows = sum(k[i] * x[i : x.shape[0] - n + 1 + i] for i in range(n))
    return sum(k[i] * rows[:, i : rows.shape[1] - n + 1 + i] for i in range(n))


def ssim(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean SSIM (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) over channels of two uint8 images."""
    a, b = ref.astype(np.float64), got.astype(np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a**2
    var_b = _gaussian_filter(b * b) - mu_b**2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


@dataclass
class ImageFidelity:
    psnr: float
    """Mean over the fidelity prompts, dB (identical images count as 99 dB so the mean stays finite)."""
    psnr_min: float
    ssim: float
    """Mean over the fidelity prompts."""

    @classmethod
    def compare(cls, refs: list[np.ndarray], gots: list[np.ndarray]) -> ImageFidelity:
        p = [min(psnr(r, g), 99.0) for r, g in zip(refs, gots, strict=True)]
        s = [ssim(r, g) for r, g in zip(refs, gots, strict=True)]
        return cls(psnr=float(np.mean(p)), psnr_min=float(np.min(p)), ssim=float(np.mean(s)))

    def as_dict(self) -> dict[str, float]:
        return {"psnr": round(self.psnr, 3), "psnr_min": round(self.psnr_min, 3), "ssim": round(self.ssim, 5)}
