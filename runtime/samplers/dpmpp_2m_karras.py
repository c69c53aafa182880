"""DPM-Solver++(2M) with Karras sigmas; twin of DPMSolverMultistepScheduler(dpmsolver++, order 2, Karras)."""

from __future__ import annotations

import numpy as np

from runtime.samplers.dpmpp_2m import DpmppTwoMSampler
from runtime.samplers.schedule import NoiseSchedule


class DpmppTwoMKarrasSampler(DpmppTwoMSampler):
    """DPM-Solver++(2M) on Karras (2022) sigmas (rho = 7) from the largest to the smallest training sigma;
    the UNet gets each sigma's timestep rounded to a whole step. The timestep spacing setting is not used."""

    name = "dpmpp_2m_karras"

    @staticmethod
    def sigma_grid(schedule: NoiseSchedule, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        sigmas = schedule.karras_sigmas(num_steps)
        return schedule.sigma_to_t(sigmas).round(), sigmas
