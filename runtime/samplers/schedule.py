"""The training noise schedule (betas -> alphas_cumprod -> sigmas) and the timestep/sigma grids on it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _one_of(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of: {', '.join(allowed)}")


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace computed like torch.linspace(dtype=float32) on CPU, which diffusers builds betas with.

    Float32 step, then each element is a single-rounded `start + step*i` for the first half and
    `end - step*(n-1-i)` for the second, so alphas_cumprod matches the diffusers twin bit for bit.
    """
    a, b = np.float32(start), np.float32(end)
    step = float((b - a) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    lo = float(a) + step * i  # float64 product of a float32 and a small int is exact; one rounding below
    hi = float(b) - step * (n - 1 - i)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


@dataclass(frozen=True)
class NoiseSchedule:
    """The model's discrete training noise schedule, as read from a diffusers `scheduler_config.json`.

    Field defaults are those of the diffusers twin schedulers (Euler/EulerAncestral/DPMSolverMultistep), which
    is what `Twin.from_config(config)` uses for a key the config lacks. Twins with other defaults (DDIM, LCM)
    get theirs through `with_defaults`, which only touches the fields named in `defaulted`.
    """

    num_train_timesteps: int = 1000
    """Number of discrete diffusion timesteps the model was trained with (t = 0 .. N-1)."""
    beta_start: float = 0.0001
    """Variance beta at t = 0."""
    beta_end: float = 0.02
    """Variance beta at t = N-1."""
    beta_schedule: str = "linear"
    """How betas go from beta_start to beta_end: "linear", or "scaled_linear" (linear in sqrt(beta))."""
    steps_offset: int = 0
    """Added to every inference timestep under "leading" spacing (SD v1 uses 1)."""
    timestep_spacing: str = "linspace"
    """How inference timesteps are picked from 0..N-1: "linspace" (evenly, both ends included),
    "leading" (multiples of N // steps, plus steps_offset) or "trailing" (counting down from N-1)."""
    prediction_type: str = "epsilon"
    """What the UNet predicts: "epsilon" (the noise) or "v_prediction" (v = alpha*eps - sigma*x0)."""
    set_alpha_to_one: bool = True
    """DDIM: alphas_cumprod "before" t = 0, used when a step lands below t = 0: 1.0 if True, else
    alphas_cumprod[0] (SD v1 sets False)."""
    clip_sample: bool = False
    """DDIM and LCM: clip the predicted x0 to [-clip_sample_range, clip_sample_range]. Defaults to True
    for DDIM (its twin's default) when the config lacks the key."""
    clip_sample_range: float = 1.0
    """Bound for clip_sample; > 0."""
    original_inference_steps: int = 50
    """LCM: step count of the distillation schedule; LCM picks its timesteps from that grid, so it allows at
    most this many steps. At most num_train_timesteps (checked when an LCM sampler is made)."""
    timestep_scaling: float = 10.0
    """LCM: t * timestep_scaling is the time in the consistency-model boundary scalings c_skip and c_out; > 0."""
    defaulted: frozenset[str] = frozenset()
    """Fields the source config lacked (set by `from_config`; empty when built directly). `with_defaults`
    replaces only these, as diffusers does for keys a config lacks (its `_use_default_values`)."""

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r} must be >= 2")
        for field in ("beta_start", "beta_end"):
            value = getattr(self, field)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{field}={value!r} is not in the open range (0, 1)")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset={self.steps_offset!r} must be >= 0")
        _one_of("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _one_of("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _one_of("prediction_type", self.prediction_type, PREDICTION_TYPES)
        for field in ("clip_sample_range", "timestep_scaling"):
            value = getattr(self, field)
            if not value > 0.0:
                raise ValueError(f"{field}={value!r} must be > 0")
        if self.original_inference_steps < 1:
            raise ValueError(f"original_inference_steps={self.original_inference_steps!r} must be >= 1")
        unknown = self.defaulted - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"defaulted names unknown fields: {', '.join(sorted(unknown))}")

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> NoiseSchedule:
        """Build from a diffusers scheduler config dict; keys that do not shape the schedule are ignored."""
        if d.get("trained_betas") is not None:
            raise ValueError("trained_betas is not supported; use beta_start/beta_end/beta_schedule")
        if d.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr=True is not supported")
        if d.get("thresholding"):
            raise ValueError("thresholding=True (dynamic thresholding) is not supported")
        defaults = cls()

        def get(name: str, cast: Any) -> Any:
            value = d.get(name)
            return getattr(defaults, name) if value is None else cast(value)

        return cls(
            num_train_timesteps=get("num_train_timesteps", int),
            beta_start=get("beta_start", float),
            beta_end=get("beta_end", float),
            beta_schedule=get("beta_schedule", str),
            steps_offset=get("steps_offset", int),
            timestep_spacing=get("timestep_spacing", str),
            prediction_type=get("prediction_type", str),
            set_alpha_to_one=get("set_alpha_to_one", bool),
            clip_sample=get("clip_sample", bool),
            clip_sample_range=get("clip_sample_range", float),
            original_inference_steps=get("original_inference_steps", int),
            timestep_scaling=get("timestep_scaling", float),
            defaulted=frozenset(f.name for f in fields(cls) if f.name != "defaulted" and d.get(f.name) is None),
        )

    def with_defaults(self, defaults: Mapping[str, Any]) -> NoiseSchedule:
        """This schedule with the fields in `defaulted` that `defaults` names set to its values."""
        chosen = {k: v for k, v in defaults.items() if k in self.defaulted}
        if not chosen:
            return self
        return replace(self, **chosen, defaulted=self.defaulted - chosen.keys())

    def alphas_cumprod(self) -> np.ndarray:
        """float32 [N]: prod_{s<=t} (1 - beta_s), accumulated in float64 like torch.cumprod on CPU."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = _linspace_f32(self.beta_start, self.beta_end, n)
        else:
            root = _linspace_f32(self.beta_start**0.5, self.beta_end**0.5, n)
            betas = root * root
        alphas = np.float32(1.0) - betas
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32)

    def train_sigmas(self) -> np.ndarray:
        """float32 [N]: sigma(t) = sqrt((1 - alphas_cumprod) / alphas_cumprod), increasing in t."""
        ac = self.alphas_cumprod()
        return np.sqrt((np.float32(1.0) - ac) / ac)

    def spaced_timesteps(self, num_steps: int, whole: bool = False) -> np.ndarray:
        """float32 [num_steps]: descending inference timesteps for `timestep_spacing`.

        whole: round "linspace" timesteps to training timesteps, as the DDIM-style twins do (the other spacings
        are whole already); the sigma-space twins keep them fractional.
        """
        n_train = self.num_train_timesteps
        t: np.ndarray
        if self.timestep_spacing == "linspace":
            t = np.linspace(0, n_train - 1, num_steps)[::-1]
            if whole:
                t = t.round()
        elif self.timestep_spacing == "leading":
            t = (np.arange(num_steps) * (n_train // num_steps)).round()[::-1] + self.steps_offset
        else:  # trailing; float arange can overshoot by one element for some step counts, so truncate
            t = np.arange(n_train, 0, -n_train / num_steps).round()[:num_steps] - 1
        return t.astype(np.float32)

    def interp_sigmas(self, timesteps: np.ndarray) -> np.ndarray:
        """float64: sigma at (possibly fractional) timesteps, linear in sigma between training timesteps."""
        sig = self.train_sigmas()
        return np.interp(np.asarray(timesteps, np.float64), np.arange(len(sig)), sig.astype(np.float64))

    def sigma_to_t(self, sigmas: np.ndarray) -> np.ndarray:
        """float64: fractional timestep of each sigma, linear in log-sigma between training steps (0..N-1)."""
        log_train = np.log(self.train_sigmas())
        log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
        low = np.clip(np.searchsorted(log_train, log_sigma, side="right") - 1, 0, len(log_train) - 2)
        lo, hi = log_train[low], log_train[low + 1]
        w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
        return (1.0 - w) * low + w * (low + 1)

    def karras_sigmas(self, num_steps: int, rho: float = 7.0) -> np.ndarray:
        """float64 [num_steps]: Karras (2022) sigmas, sigma(N-1) to sigma(0) evenly in sigma**(1/rho)."""
        sig = self.train_sigmas()
        max_inv, min_inv = float(sig[-1]) ** (1 / rho), float(sig[0]) ** (1 / rho)
        ramp = np.linspace(0, 1, num_steps)
        return (max_inv + ramp * (min_inv - max_inv)) ** rho
