"""DPM-Solver++(2M) with Karras sigmas; twin of DPMSolverMultistepScheduler(dpmsolver++, order 2, Karras)."""

from __future__ import annotations

import numpy as np

from runtime.samplers.base import Sampler
from runtime.samplers.schedule import NoiseSchedule


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """Variance-preserving (alpha_t, sigma_t) for a sigma-space noise level."""
    alpha = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
    return alpha, sigma * alpha


def _log_snr(alpha: np.float32, sigma: np.float32) -> np.float32:
    """lambda = log(alpha_t / sigma_t), the half log-SNR the solver steps in."""
    return np.log(alpha) - np.log(sigma)


class DpmppTwoMKarrasSampler(Sampler):
    """Multistep DPM-Solver++ in data (x0) prediction, second order (midpoint) with first-order steps first
    and last (the last step lands on sigma = 0 and returns the denoised estimate). Latents are
    variance-preserving: init_noise_sigma is 1 and the UNet input is not rescaled."""

    name = "dpmpp_2m_karras"
    needs_noise = False

    def __init__(self, schedule: NoiseSchedule, num_steps: int):
        super().__init__(schedule, num_steps)
        sigmas = schedule.karras_sigmas(self.num_steps)
        self.timesteps = schedule.sigma_to_t(sigmas).round().astype(np.float32)
        self.sigmas = np.append(sigmas, 0.0).astype(np.float32)
        self.init_noise_sigma = 1.0
        self._prev: tuple[int, np.ndarray] | None = None  # (step index, denoised) from the previous step

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        self._check_index(i)
        return np.asarray(sample, dtype=np.float32)

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        model_output, sample, _ = self._check_step_args(model_output, i, sample, noise)
        alpha_s, sigma_s = _alpha_sigma(self.sigmas[i])
        if self.schedule.prediction_type == "epsilon":
            denoised = (sample - sigma_s * model_output) / alpha_s
        else:
            denoised = alpha_s * sample - sigma_s * model_output
        prev, self._prev = self._prev, (i, denoised)

        if self.sigmas[i + 1] == 0:  # final step: the first-order update to sigma = 0 is exactly x0
            return denoised
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        lambda_s = _log_snr(alpha_s, sigma_s)
        h = _log_snr(alpha_t, sigma_t) - lambda_s
        decay = alpha_t * (np.exp(-h) - np.float32(1.0))
        x = (sigma_t / sigma_s) * sample - decay * denoised
        if prev is None or prev[0] != i - 1:  # no history from step i-1: first order (DDIM)
            return x
        lambda_prev = _log_snr(*_alpha_sigma(self.sigmas[i - 1]))
        r = (lambda_s - lambda_prev) / h
        d1 = (np.float32(1.0) / r) * (denoised - prev[1])
        return x - np.float32(0.5) * decay * d1
