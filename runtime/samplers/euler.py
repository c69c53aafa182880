"""Euler sampler (deterministic, first order in sigma space); twin of diffusers' EulerDiscreteScheduler."""

from __future__ import annotations

import numpy as np

from runtime.samplers.base import SigmaSampler


class EulerSampler(SigmaSampler):
    """x_{i+1} = x_i + d_i * (sigma_{i+1} - sigma_i), with d_i = (x_i - x0_i) / sigma_i."""

    name = "euler"
    needs_noise = False

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        model_output, sample, _ = self._check_step_args(model_output, i, sample, noise)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        derivative = (sample - self.denoised(model_output, sample, sigma)) / sigma
        return sample + derivative * (sigma_next - sigma)
