"""Parity of the numpy samplers in runtime.samplers with their diffusers twins, plus argument validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from runtime.samplers import SAMPLERS, NoiseSchedule, make_sampler

REPO_ROOT = Path(__file__).resolve().parents[2]

# diffusers' schedulers call np.array() on torch tensors, which numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5 (no timestep_spacing key).
SD_V1 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

CONFIGS = {
    "sd_v1": SD_V1,
    "linspace": {**SD_V1, "timestep_spacing": "linspace"},
    "leading": {**SD_V1, "timestep_spacing": "leading"},
    "trailing": {**SD_V1, "timestep_spacing": "trailing"},
    "v_pred_leading": {**SD_V1, "timestep_spacing": "leading", "prediction_type": "v_prediction"},
    "v_pred_trailing": {**SD_V1, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "linear_betas": {"beta_schedule": "linear", "num_train_timesteps": 1000},  # everything else defaulted
    # the shipped shapes model's schedule (train/shapes/model.py): linear betas, v-prediction, SD v1's spacing
    "shapes": {**SD_V1, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
               "prediction_type": "v_prediction"},
}
STEPS = (1, 2, 4, 7, 10, 25, 50)

# name -> (diffusers twin class, extra kwargs for Twin.from_config)
TWINS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
}

SHAPE = (2, 4, 8, 8)
RTOL = 1e-5


def fake_unet(x: np.ndarray, t: float) -> np.ndarray:
    """Deterministic stand-in for the UNet: a pure function of its input and the timestep."""
    return (np.float32(0.3) * x + np.float32(0.1 * np.cos(t / 100.0))).astype(np.float32)


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.dtype == np.float32, f"{what}: dtype {ours.dtype}"
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    tol = RTOL * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


def test_registry_matches_twins():
    assert set(SAMPLERS) == set(TWINS), "every registered sampler needs a diffusers twin in this test"
    assert list(SAMPLERS) == sorted(SAMPLERS)
    for name, cls in SAMPLERS.items():
        assert cls.name == name


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", TWINS)
def test_default_spacing_matches_twin(name, config_name):
    twin_cls, twin_kwargs = TWINS[name]
    twin = twin_cls.from_config(CONFIGS[config_name], **twin_kwargs)
    schedule = NoiseSchedule.from_config(CONFIGS[config_name])
    assert schedule.timestep_spacing == twin.config.timestep_spacing
    assert schedule.prediction_type == twin.config.prediction_type
    assert schedule.steps_offset == twin.config.steps_offset
    np.testing.assert_array_equal(schedule.alphas_cumprod(), twin.alphas_cumprod.numpy())


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", TWINS)
def test_trajectory_matches_diffusers(name, config_name, num_steps):
    config = CONFIGS[config_name]
    twin_cls, twin_kwargs = TWINS[name]
    ref = twin_cls.from_config(config, **twin_kwargs)
    ref.set_timesteps(num_steps)
    ours = make_sampler(name, NoiseSchedule.from_config(config), num_steps)

    assert ours.num_steps == num_steps == len(ref.timesteps)
    assert ours.timesteps.dtype == np.float32 and ours.timesteps.shape == (num_steps,)
    ref_timesteps = ref.timesteps.numpy().astype(np.float64)
    np.testing.assert_allclose(ours.timesteps, ref_timesteps, rtol=1e-5, atol=0)
    ref_sigma = float(ref.init_noise_sigma)
    assert ours.init_noise_sigma == pytest.approx(ref_sigma, rel=1e-6)

    rng = np.random.default_rng(1234)
    latents = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(ours.init_noise_sigma)
    x_ours, x_ref = latents, torch.from_numpy(latents.copy())
    # diffusers draws ancestral noise from gen_ref; gen_ours reproduces the identical draw for our sampler.
    gen_ref, gen_ours = torch.Generator().manual_seed(99), torch.Generator().manual_seed(99)
    for i, t in enumerate(ref.timesteps):
        in_ref = ref.scale_model_input(x_ref, t)
        in_ours = ours.scale_model_input(x_ours, i)
        assert_close(in_ours, in_ref.numpy(), f"model input at step {i}")

        out_ref = torch.from_numpy(fake_unet(in_ref.numpy(), float(t)))
        out_ours = fake_unet(in_ours, float(ours.timesteps[i]))
        noise = None
        if ours.needs_noise:
            shape, dtype, device = out_ref.shape, out_ref.dtype, out_ref.device
            noise = randn_tensor(shape, dtype=dtype, device=device, generator=gen_ours).numpy()
        x_ref = ref.step(out_ref, t, x_ref, generator=gen_ref).prev_sample
        x_ours = ours.step(out_ours, i, x_ours, noise=noise)
        assert_close(x_ours, x_ref.numpy(), f"sample after step {i}")
    # Same number of draws on both sides (zero for the deterministic samplers).
    assert torch.equal(gen_ref.get_state(), gen_ours.get_state())


def test_ancestral_step_requires_noise():
    sampler = make_sampler("euler_a", NoiseSchedule.from_config(SD_V1), 4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="needs noise"):
        sampler.step(x, 0, x)
    with pytest.raises(ValueError, match="noise shape"):
        sampler.step(x, 0, x, noise=np.zeros((1, 4, 8, 8), np.float32))


@pytest.mark.parametrize("name", TWINS)
def test_step_index_out_of_range(name):
    sampler = make_sampler(name, NoiseSchedule.from_config(SD_V1), 4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match=r"i=4 is out of range \[0, 3\]"):
        sampler.step(x, 4, x, noise=x)
    with pytest.raises(ValueError, match=r"i=-1 is out of range"):
        sampler.scale_model_input(x, -1)


def test_unknown_sampler_name():
    with pytest.raises(ValueError, match="^sampler='foo' is not one of: dpmpp_2m_karras, euler, euler_a$"):
        make_sampler("foo", NoiseSchedule.from_config(SD_V1), 10)


@pytest.mark.parametrize("name", TWINS)
@pytest.mark.parametrize("bad", [0, -3, 1001, 2.5, True, "10"])
def test_bad_num_steps(name, bad):
    with pytest.raises(ValueError, match=rf"num_steps={bad!r}"):
        make_sampler(name, NoiseSchedule.from_config(SD_V1), bad)


@pytest.mark.parametrize("name", TWINS)
def test_num_steps_bounds_are_allowed(name):
    schedule = NoiseSchedule.from_config(SD_V1)
    assert make_sampler(name, schedule, 1).num_steps == 1
    assert make_sampler(name, schedule, np.int64(1000)).timesteps.shape == (1000,)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"timestep_spacing": "up"}, "timestep_spacing='up' is not one of: linspace, leading, trailing"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule='squaredcos_cap_v2' is not one of"),
        ({"prediction_type": "sample"}, "prediction_type='sample' is not one of: epsilon, v_prediction"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"num_train_timesteps": 1}, "num_train_timesteps=1"),
        ({"beta_end": 1.5}, "beta_end=1.5"),
    ],
)
def test_bad_schedule_config(override, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_config({**SD_V1, **override})


def test_import_does_not_pull_torch():
    code = "import sys, runtime.samplers; bad = {'torch', 'diffusers'} & set(sys.modules); assert not bad"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
