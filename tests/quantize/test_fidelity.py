"""PSNR, SSIM and relative error: the figures the fidelity gate decides on."""

from __future__ import annotations

import numpy as np

from quantize.fidelity import ImageFidelity, psnr, rel_error, ssim


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, 64)[None, :, None] * np.ones((64, 64, 3))
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def test_psnr_matches_its_definition() -> None:
    a = _image()
    b = a.astype(np.int16).copy()
    b[::2] += 5  # half the pixels off by 5: MSE 12.5
    b = np.clip(b, 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert psnr(a, b) == 10 * np.log10(255**2 / mse)
    assert psnr(a, a) == float("inf")


def test_ssim_is_one_for_identical_and_falls_with_noise() -> None:
    a = _image()
    assert abs(ssim(a, a) - 1.0) < 1e-12
    rng = np.random.default_rng(1)
    noisy = [np.clip(a + rng.normal(0, s, a.shape), 0, 255).astype(np.uint8) for s in (2, 10, 40)]
    values = [ssim(a, n) for n in noisy]
    assert values[0] > values[1] > values[2] and values[0] < 1
    # a constant shift of brightness barely changes structure: SSIM stays high where PSNR drops
    shifted = np.clip(a.astype(int) + 12, 0, 255).astype(np.uint8)
    assert ssim(a, shifted) > 0.95 and psnr(a, shifted) < 30


def test_rel_error_and_summary() -> None:
    ref = np.array([3.0, 4.0])
    assert rel_error(ref, ref * 1.1) == np.float64(0.1).item() or abs(rel_error(ref, ref * 1.1) - 0.1) < 1e-12
    assert rel_error(ref, np.array([np.nan, 0])) == float("inf")
    a = _image()
    f = ImageFidelity.compare([a, a], [a, np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)])
    assert f.psnr_min < f.psnr < 99.0 and f.as_dict()["psnr"] == round(f.psnr, 3)
