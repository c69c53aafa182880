"""DDIM (eta = 0, deterministic); twin of diffusers' DDIMScheduler."""

from __future__ import annotations

import numpy as np

from runtime.samplers.base import Sampler
from runtime.samplers.schedule import NoiseSchedule


class DdimSampler(Sampler):
    """x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps, with a = alphas_cumprod. Latents are
    variance-preserving: init_noise_sigma is 1 and the UNet input is not rescaled.

    As in diffusers, the step goes from t to t - N // num_steps whatever the spacing (so "linspace" and
    "trailing" steps need not land on the next timestep), and below t = 0 uses a = 1 if set_alpha_to_one,
    else alphas_cumprod[0].
    """

    name = "ddim"
    needs_noise = False
    schedule_defaults = {"timestep_spacing": "leading", "clip_sample": True}

    def __init__(self, schedule: NoiseSchedule, num_steps: int):
        super().__init__(schedule, num_steps)
        s, n_train = self.schedule, self.schedule.num_train_timesteps
        # "leading" plus steps_offset reaches t = N at num_steps = N, past the table (diffusers fails there)
        t = np.minimum(s.spaced_timesteps(self.num_steps, whole=True).astype(np.int64), n_train - 1)
        self.timesteps = t.astype(np.float32)
        self.init_noise_sigma = 1.0
        ac = s.alphas_cumprod()
        final = np.float32(1.0) if s.set_alpha_to_one else ac[0]
        prev = t - n_train // self.num_steps
        self._alpha = ac[t]
        self._alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        model_output, sample, _ = self._check_step_args(model_output, i, sample, noise)
        one = np.float32(1.0)
        alpha, alpha_prev = self._alpha[i], self._alpha_prev[i]
        sqrt_a, sqrt_b = np.sqrt(alpha), np.sqrt(one - alpha)
        v_pred = self.schedule.prediction_type != "epsilon"
        eps = sqrt_a * model_output + sqrt_b * sample if v_pred else model_output
        x0 = self.predicted_x0(model_output, sample, sqrt_a, sqrt_b, clip=True)
        return np.sqrt(alpha_prev) * x0 + np.sqrt(one - alpha_prev) * eps
