"""Pure-numpy diffusion samplers and the registry that maps request sampler names to them."""

from __future__ import annotations

from runtime.samplers.base import Sampler
from runtime.samplers.ddim import DdimSampler
from runtime.samplers.dpmpp_2m import DpmppTwoMSampler
from runtime.samplers.dpmpp_2m_karras import DpmppTwoMKarrasSampler
from runtime.samplers.euler import EulerSampler
from runtime.samplers.euler_a import EulerAncestralSampler
from runtime.samplers.lcm import LcmSampler
from runtime.samplers.schedule import NoiseSchedule
from runtime.samplers.turbo import TurboSampler

_ALL = (
    DdimSampler, DpmppTwoMSampler, DpmppTwoMKarrasSampler, EulerSampler, EulerAncestralSampler, LcmSampler,
    TurboSampler,
)
SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in sorted(_ALL, key=lambda cls: cls.name)}


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int) -> Sampler:
    """A fresh sampler instance for one request; ValueError for an unknown name or bad num_steps."""
    cls = SAMPLERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"sampler={name!r} is not one of: {', '.join(SAMPLERS)}")
    return cls(schedule, num_steps)


__all__ = ["SAMPLERS", "NoiseSchedule", "Sampler", "make_sampler"]
