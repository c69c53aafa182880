"""1-4 step sampling for adversarially distilled "turbo" models (SD-Turbo, SDXL-Turbo).

Twin: diffusers' setup for those models, EulerAncestralDiscreteScheduler with timestep_spacing="trailing".
"""

from __future__ import annotations

import dataclasses

from runtime.samplers.euler_a import EulerAncestralSampler
from runtime.samplers.schedule import NoiseSchedule

MAX_STEPS = 4
"""Turbo models are distilled (ADD) for 1 to 4 steps; more steps do not improve them."""


class TurboSampler(EulerAncestralSampler):
    """Euler ancestral on "trailing" timesteps whatever the model's config says, so step 1 starts at the
    last training timestep (t = N-1, pure noise); a 1-step run is a single x0 prediction. num_steps is 1 to
    MAX_STEPS. Turbo models are meant to run without guidance (guidance_scale 0 or 1)."""

    name = "turbo"

    @classmethod
    def max_steps(cls, schedule: NoiseSchedule) -> int:
        return min(MAX_STEPS, schedule.num_train_timesteps)

    def __init__(self, schedule: NoiseSchedule, num_steps: int):
        forced = dataclasses.replace(
            schedule, timestep_spacing="trailing", defaulted=schedule.defaulted - {"timestep_spacing"}
        )
        super().__init__(forced, num_steps)
