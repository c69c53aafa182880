"""Euler ancestral sampler (Euler step plus fresh noise); twin of EulerAncestralDiscreteScheduler."""

from __future__ import annotations

import numpy as np

from runtime.samplers.base import SigmaSampler


class EulerAncestralSampler(SigmaSampler):
    """Splits each step sigma_i -> sigma_{i+1} into a deterministic Euler step down to sigma_down and
    added noise sigma_up, where sigma_up^2 + sigma_down^2 = sigma_{i+1}^2. Needs noise on every step."""

    name = "euler_a"
    needs_noise = True

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        model_output, sample, noise = self._check_step_args(model_output, i, sample, noise)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        s2, s2_next = sigma * sigma, sigma_next * sigma_next
        sigma_up = np.sqrt(s2_next * (s2 - s2_next) / s2)
        sigma_down = np.sqrt(np.maximum(s2_next - sigma_up * sigma_up, np.float32(0.0)))
        derivative = (sample - self.denoised(model_output, sample, sigma)) / sigma
        return sample + derivative * (sigma_down - sigma) + noise * sigma_up
