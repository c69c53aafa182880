"""Latent Consistency Model sampling (for LCM-distilled models and LCM-LoRA); twin of diffusers' LCMScheduler."""

from __future__ import annotations

import numpy as np

from runtime.samplers.base import Sampler
from runtime.samplers.schedule import NoiseSchedule

SIGMA_DATA = np.float32(0.5)
"""The consistency-model data scale in c_skip and c_out (diffusers hard-codes 0.5)."""


def lcm_timesteps(original_steps: int, num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """int64 [num_steps]: descending timesteps, every (original_steps / num_steps)-th point of the distillation
    grid k-1, 2k-1, ..., original_steps*k - 1 with k = num_train_timesteps // original_steps."""
    k = num_train_timesteps // original_steps
    grid = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    return grid[np.floor(np.linspace(0, original_steps, num_steps, endpoint=False)).astype(np.int64)]


class LcmSampler(Sampler):
    """Each step maps x_t to the model's consistency estimate denoised = c_out * x0 + c_skip * x_t, then
    re-noises it to the next timestep with fresh noise: sqrt(a_next) * denoised + sqrt(1 - a_next) * noise.
    The last step returns `denoised` and ignores its noise (diffusers draws none there).

    Steps come from the original_inference_steps grid, so num_steps is at most original_inference_steps; the
    timestep spacing, steps_offset and set_alpha_to_one settings are not used.
    """

    name = "lcm"
    needs_noise = True
    # timestep_spacing is unused; it is set only so that `schedule` reads like the twin's config
    schedule_defaults = {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "timestep_spacing": "leading",
    }

    @classmethod
    def max_steps(cls, schedule: NoiseSchedule) -> int:
        return min(schedule.original_inference_steps, schedule.num_train_timesteps)

    def __init__(self, schedule: NoiseSchedule, num_steps: int):
        n_train, original = schedule.num_train_timesteps, schedule.original_inference_steps
        if original > n_train:
            raise ValueError(f"original_inference_steps={original} must be at most num_train_timesteps={n_train}")
        super().__init__(schedule, num_steps)
        t = lcm_timesteps(original, n_train, self.num_steps)
        self.timesteps = t.astype(np.float32)
        self.init_noise_sigma = 1.0
        ac = self.schedule.alphas_cumprod()
        self._alpha = ac[t]
        self._alpha_next = ac[np.append(t[1:], t[-1])]  # the last entry is unused: the last step adds no noise
        scaled = t.astype(np.float32) * np.float32(self.schedule.timestep_scaling)
        denom = scaled * scaled + SIGMA_DATA * SIGMA_DATA
        self._c_skip = SIGMA_DATA * SIGMA_DATA / denom
        self._c_out = scaled / np.sqrt(denom)

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        model_output, sample, noise = self._check_step_args(model_output, i, sample, noise)
        assert noise is not None  # needs_noise
        one = np.float32(1.0)
        sqrt_a, sqrt_b = np.sqrt(self._alpha[i]), np.sqrt(one - self._alpha[i])
        x0 = self.predicted_x0(model_output, sample, sqrt_a, sqrt_b, clip=True)
        denoised = self._c_out[i] * x0 + self._c_skip[i] * sample
        if i == self.num_steps - 1:
            return denoised
        a_next = self._alpha_next[i]
        return np.sqrt(a_next) * denoised + np.sqrt(one - a_next) * noise
