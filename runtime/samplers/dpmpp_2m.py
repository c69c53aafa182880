"""DPM-Solver++(2M); twin of DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)."""

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


def dpm_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """float64 [num_steps]: descending whole timesteps as DPMSolverMultistepScheduler spaces them.

    Unlike `NoiseSchedule.spaced_timesteps`, "linspace" and "leading" lay out num_steps + 1 points and drop
    the last (t = 0 before steps_offset).
    """
    n_train = schedule.num_train_timesteps
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, num_steps + 1).round()[::-1][:-1]
    if schedule.timestep_spacing == "leading":
        grid = (np.arange(num_steps + 1) * (n_train // (num_steps + 1))).round()[::-1][:-1]
        return grid + schedule.steps_offset
    return schedule.spaced_timesteps(num_steps).astype(np.float64)  # trailing is the same as everywhere


class DpmppTwoMSampler(Sampler):
    """Multistep DPM-Solver++ in data (x0) prediction, second order (midpoint) with first-order steps first
    and last (the last step lands on sigma = 0 and returns the denoised estimate). Latents are
    variance-preserving: init_noise_sigma is 1 and the UNet input is not rescaled.

    Sigmas are those of the spaced timesteps; subclasses change the grid through `sigma_grid`.
    """

    name = "dpmpp_2m"
    needs_noise = False

    sigmas: np.ndarray
    """float32 [num_steps + 1]: sigma at each step; sigmas[num_steps] == 0."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int):
        super().__init__(schedule, num_steps)
        timesteps, sigmas = self.sigma_grid(self.schedule, self.num_steps)
        self.timesteps = timesteps.astype(np.float32)
        self.sigmas = np.append(sigmas, 0.0).astype(np.float32)
        self.init_noise_sigma = 1.0
        self._prev: tuple[int, np.ndarray] | None = None  # (step index, denoised) from the previous step

    @staticmethod
    def sigma_grid(schedule: NoiseSchedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas), both [num_steps] and descending: the solver's grid without the final 0."""
        timesteps = dpm_timesteps(schedule, num_steps)
        return timesteps, schedule.interp_sigmas(timesteps)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """alpha_i * x0 + sigma_i * noise, the variance-preserving pair of the solver's sigma at step i."""
        alpha, sigma = _alpha_sigma(self.sigmas[self._check_index(i)])
        return (alpha * np.asarray(original, np.float32) + sigma * np.asarray(noise, np.float32)).astype(np.float32)

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        model_output, sample, _ = self._check_step_args(model_output, i, sample, noise)
        alpha_s, sigma_s = _alpha_sigma(self.sigmas[i])
        denoised = self.predicted_x0(model_output, sample, alpha_s, sigma_s)
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
