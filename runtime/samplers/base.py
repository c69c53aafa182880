"""The Sampler base class, plus the shared base of the sigma-space (k-diffusion style) samplers."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from runtime.samplers.schedule import NoiseSchedule


class Sampler:
    """One sampler run (one instance per request; may hold multistep state between `step` calls).

    The caller draws the initial latents as `standard_normal * init_noise_sigma`, then for each step i
    feeds `scale_model_input(x, i)` and `timesteps[i]` to the UNet and sets `x = step(out, i, x, noise)`.
    Arrays are [B, C, H, W]; results are float32.
    """

    name: ClassVar[str]
    """Registry name."""
    needs_noise: ClassVar[bool] = False
    """True for samplers that inject fresh noise: `step` then needs standard-normal `noise` shaped like the
    sample on every step."""
    schedule_defaults: ClassVar[Mapping[str, Any]] = {}
    """NoiseSchedule values for fields the model's config lacks, where this sampler's diffusers twin has its own
    defaults (diffusers' `Twin.from_config` fills missing keys from the twin's __init__ defaults)."""

    schedule: NoiseSchedule
    """The schedule this sampler runs on: the model's, with `schedule_defaults` applied."""
    timesteps: np.ndarray
    """float32 [num_steps]: the timestep fed to the UNet at step i."""
    init_noise_sigma: float
    """Initial latents = standard normal * init_noise_sigma."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int):
        self.schedule = schedule.with_defaults(self.schedule_defaults)
        self.num_steps = _check_num_steps(num_steps, self.max_steps(self.schedule), self.name)

    @classmethod
    def max_steps(cls, schedule: NoiseSchedule) -> int:
        """The most steps this sampler allows on `schedule` (num_steps must be in [1, max_steps])."""
        return schedule.num_train_timesteps

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """The sample as the UNet should see it at step i: unchanged, unless a sampler scales it."""
        self._check_index(i)
        return np.asarray(sample, dtype=np.float32)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """`original` (clean latents) noised to the level of step i, as the sampler's latents are at that step
        (img2img's start, inpainting's blend). Variance-preserving here: sqrt(a) * x0 + sqrt(1 - a) * noise with
        a = alphas_cumprod[timesteps[i]]; sigma-space samplers override it."""
        a = self.schedule.alphas_cumprod()[int(self.timesteps[self._check_index(i)])]
        return (np.sqrt(a) * np.asarray(original, np.float32)
                + np.sqrt(np.float32(1.0) - a) * np.asarray(noise, np.float32)).astype(np.float32)

    def predicted_x0(self, model_output: np.ndarray, sample: np.ndarray, alpha: np.float32, sigma: np.float32,
                     clip: bool = False) -> np.ndarray:
        """x0 from the UNet output at a variance-preserving noise level (sample = alpha * x0 + sigma * eps), for
        the model's prediction type; with `clip`, clipped as the schedule's clip_sample says."""
        if self.schedule.prediction_type == "epsilon":
            x0 = (sample - sigma * model_output) / alpha
        else:
            x0 = alpha * sample - sigma * model_output
        if clip and self.schedule.clip_sample:
            bound = np.float32(self.schedule.clip_sample_range)
            x0 = np.clip(x0, -bound, bound)
        return x0

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Returns the sample for step i+1 (the final latents after the last step)."""
        raise NotImplementedError

    def _check_index(self, i: int) -> int:
        if not 0 <= i < self.num_steps:
            raise ValueError(f"step index i={i!r} is out of range [0, {self.num_steps - 1}]")
        return i

    def _check_step_args(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Validates step() arguments; returns (model_output, sample, noise) as float32 arrays."""
        self._check_index(i)
        model_output = np.asarray(model_output, dtype=np.float32)
        sample = np.asarray(sample, dtype=np.float32)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {model_output.shape} != sample shape {sample.shape}")
        if noise is None:
            if self.needs_noise:
                raise ValueError(f"sampler {self.name!r} is ancestral: step() needs noise of {sample.shape}")
        else:
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != sample.shape:
                raise ValueError(f"noise shape {noise.shape} != sample shape {sample.shape}")
        return model_output, sample, noise


def _check_num_steps(num_steps: int, max_steps: int, sampler: str) -> int:
    try:
        if isinstance(num_steps, bool):
            raise TypeError
        n = operator.index(num_steps)
    except TypeError:
        raise ValueError(f"num_steps={num_steps!r} is not an integer") from None
    if not 1 <= n <= max_steps:
        raise ValueError(f"num_steps={num_steps!r} is out of range [1, {max_steps}] for sampler {sampler!r}")
    return n


class SigmaSampler(Sampler):
    """Base for k-diffusion style samplers that work in sigma space: x = x0 + sigma * eps.

    Sigmas are those of the spaced timestep grid (linear interpolation), followed by a final 0.
    """

    sigmas: np.ndarray
    """float32 [num_steps + 1]: sigma at each step; sigmas[num_steps] == 0."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int):
        super().__init__(schedule, num_steps)
        self.timesteps = self.schedule.spaced_timesteps(self.num_steps)
        self.sigmas = np.append(self.schedule.interp_sigmas(self.timesteps), 0.0).astype(np.float32)
        max_sigma = self.sigmas.max()
        # diffusers' convention: "leading" starts from a fully noised sample in the variance-preserving sense.
        if self.schedule.timestep_spacing == "leading":
            max_sigma = np.sqrt(max_sigma * max_sigma + np.float32(1.0))
        self.init_noise_sigma = float(max_sigma)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """Divides by sqrt(sigma^2 + 1), mapping the sigma-space sample back to unit variance."""
        sigma = self.sigmas[self._check_index(i)]
        return np.asarray(sample, dtype=np.float32) / np.sqrt(sigma * sigma + np.float32(1.0))

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """x0 + sigma_i * noise."""
        sigma = self.sigmas[self._check_index(i)]
        return (np.asarray(original, np.float32) + sigma * np.asarray(noise, np.float32)).astype(np.float32)

    def denoised(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        """The model's estimate of x0 at noise level sigma (float32 in, float32 out)."""
        if self.schedule.prediction_type == "epsilon":
            return sample - sigma * model_output
        var = sigma * sigma + np.float32(1.0)
        return model_output * (-sigma / np.sqrt(var)) + sample / var
