"""Parity of the numpy samplers in runtime.samplers with their diffusers twins, plus argument validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
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
    # the keys only DDIM and LCM read, away from their defaults: clipping is active with fake_unet, and so small
    # a timestep_scaling that LCM's c_skip is far from 0 (at the usual 10 it is < 1e-5 for t >= 19)
    "ddim_lcm_keys": {**SD_V1, "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 0.5,
                      "original_inference_steps": 25, "timestep_scaling": 0.01},
}
STEPS = (1, 2, 4, 7, 10, 25, 50)

# name -> (diffusers twin class, extra kwargs for Twin.from_config)
TWINS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": (DDIMScheduler, {}),  # step() defaults to eta=0
    "lcm": (LCMScheduler, {}),
    # SD-Turbo/SDXL-Turbo's diffusers setup, whatever the model config's spacing
    "turbo": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}),
}
# Twins that draw no noise on their last step (our sampler takes it and ignores it).
NO_NOISE_ON_LAST_STEP = {"lcm"}


def max_steps(name: str, config: dict) -> int:
    """The step limit each sampler documents, restated here so the test can catch a change."""
    if name == "turbo":
        return 4
    if name == "lcm":
        return config.get("original_inference_steps", 50)
    return config.get("num_train_timesteps", 1000)


def trajectory_cases() -> list:
    """Every (sampler, config, steps) combination; those past a sampler's step limit are skipped here and
    checked to raise in test_step_limits."""
    cases = []
    for name in TWINS:
        for config_name, config in CONFIGS.items():
            for num_steps in STEPS:
                limit = max_steps(name, config)
                skip = pytest.mark.skip(reason=f"{name} allows 1-{limit} steps (test_step_limits)")
                marks = [skip] if num_steps > limit else []
                cases.append(pytest.param(name, config_name, num_steps, marks=marks,
                                          id=f"{name}-{config_name}-{num_steps}"))
    return cases


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
def test_schedule_matches_twin_config(name, config_name):
    """The schedule each sampler runs on has its twin's settings, including the twin's own defaults."""
    twin_cls, twin_kwargs = TWINS[name]
    twin = twin_cls.from_config(CONFIGS[config_name], **twin_kwargs)
    schedule = make_sampler(name, NoiseSchedule.from_config(CONFIGS[config_name]), 1).schedule
    for field in ("timestep_spacing", "prediction_type", "steps_offset", "beta_schedule", "beta_start", "beta_end",
                  "set_alpha_to_one", "clip_sample", "clip_sample_range", "original_inference_steps",
                  "timestep_scaling"):
        if field in twin.config:
            assert getattr(schedule, field) == twin.config[field], field
    np.testing.assert_array_equal(schedule.alphas_cumprod(), twin.alphas_cumprod.numpy())


@pytest.mark.parametrize(("name", "config_name", "num_steps"), trajectory_cases())
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
        if ours.needs_noise and name in NO_NOISE_ON_LAST_STEP and i == num_steps - 1:
            noise = np.full(SHAPE, np.nan, np.float32)  # must be ignored
        elif ours.needs_noise:
            shape, dtype, device = out_ref.shape, out_ref.dtype, out_ref.device
            noise = randn_tensor(shape, dtype=dtype, device=device, generator=gen_ours).numpy()
        x_ref = ref.step(out_ref, t, x_ref, generator=gen_ref).prev_sample
        x_ours = ours.step(out_ours, i, x_ours, noise=noise)
        assert_close(x_ours, x_ref.numpy(), f"sample after step {i}")
    # Same number of draws on both sides (zero for the deterministic samplers).
    assert torch.equal(gen_ref.get_state(), gen_ours.get_state())


@pytest.mark.parametrize("name", ["euler_a", "lcm", "turbo"])
def test_noise_injecting_step_requires_noise(name):
    assert SAMPLERS[name].needs_noise
    sampler = make_sampler(name, NoiseSchedule.from_config(SD_V1), 4)
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
    names = "ddim, dpmpp_2m, dpmpp_2m_karras, euler, euler_a, lcm, turbo"
    with pytest.raises(ValueError, match=f"^sampler='foo' is not one of: {names}$"):
        make_sampler("foo", NoiseSchedule.from_config(SD_V1), 10)


@pytest.mark.parametrize("name", TWINS)
@pytest.mark.parametrize("bad", [0, -3, 1001, 2.5, True, "10"])
def test_bad_num_steps(name, bad):
    with pytest.raises(ValueError, match=rf"num_steps={bad!r}"):
        make_sampler(name, NoiseSchedule.from_config(SD_V1), bad)


@pytest.mark.parametrize("config_name", ["sd_v1", "ddim_lcm_keys"])
@pytest.mark.parametrize("name", TWINS)
def test_step_limits(name, config_name):
    config = CONFIGS[config_name]
    schedule = NoiseSchedule.from_config(config)
    limit = max_steps(name, config)
    assert SAMPLERS[name].max_steps(schedule) == limit
    assert make_sampler(name, schedule, 1).num_steps == 1
    assert make_sampler(name, schedule, np.int64(limit)).timesteps.shape == (limit,)
    with pytest.raises(ValueError, match=rf"^num_steps={limit + 1} is out of range \[1, {limit}\] for sampler '{name}'$"):
        make_sampler(name, schedule, limit + 1)


@pytest.mark.parametrize("config_name", ["sd_v1", "ddim_lcm_keys"])
def test_lcm_limit_is_the_twins(config_name):
    config = CONFIGS[config_name]
    limit = max_steps("lcm", config)
    twin = LCMScheduler.from_config(config)
    twin.set_timesteps(limit)
    with pytest.raises(ValueError):
        twin.set_timesteps(limit + 1)
    assert make_sampler("lcm", NoiseSchedule.from_config(config), limit).num_steps == limit


def test_lcm_original_steps_above_train_steps():
    schedule = NoiseSchedule.from_config({**SD_V1, "original_inference_steps": 1001})
    with pytest.raises(ValueError, match="^original_inference_steps=1001 must be at most num_train_timesteps=1000$"):
        make_sampler("lcm", schedule, 4)
    assert make_sampler("euler", schedule, 4).num_steps == 4  # only LCM reads the key


def test_defaults_apply_only_to_missing_keys():
    schedule = NoiseSchedule.from_config(SD_V1)
    assert {"timestep_spacing", "prediction_type", "clip_sample_range"} <= schedule.defaulted
    assert "clip_sample" not in schedule.defaulted and "steps_offset" not in schedule.defaulted
    ddim = make_sampler("ddim", schedule, 4).schedule
    assert (ddim.timestep_spacing, ddim.clip_sample) == ("leading", False)  # SD v1 sets clip_sample False
    assert make_sampler("euler", schedule, 4).schedule is schedule
    explicit = NoiseSchedule.from_config({**SD_V1, "timestep_spacing": "trailing"})
    assert make_sampler("ddim", explicit, 4).schedule.timestep_spacing == "trailing"


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
        ({"thresholding": True}, "thresholding=True"),
        ({"clip_sample_range": 0.0}, r"^clip_sample_range=0.0 must be > 0$"),
        ({"timestep_scaling": -1.0}, r"^timestep_scaling=-1.0 must be > 0$"),
        ({"original_inference_steps": 0}, r"^original_inference_steps=0 must be >= 1$"),
    ],
)
def test_bad_schedule_config(override, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_config({**SD_V1, **override})


def test_import_does_not_pull_torch():
    code = "import sys, runtime.samplers; bad = {'torch', 'diffusers'} & set(sys.modules); assert not bad"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


@pytest.mark.parametrize("start", [1, 3])
@pytest.mark.parametrize("config_name", ["sd_v1", "trailing", "shapes"])
@pytest.mark.parametrize("name", TWINS)
def test_img2img_start_and_blend_match_diffusers(name, config_name, start):
    """img2img: `add_noise` at the start step equals the twin's (after set_begin_index, as diffusers' img2img
    pipeline calls it), the trajectory from there matches, and the inpainting blend's add_noise at every later
    step matches the twin's mid-loop add_noise."""
    num_steps = 4
    config = CONFIGS[config_name]
    twin_cls, twin_kwargs = TWINS[name]
    ref = twin_cls.from_config(config, **twin_kwargs)
    ref.set_timesteps(num_steps)
    if hasattr(ref, "set_begin_index"):  # DDIM and LCM index by timestep and have none
        ref.set_begin_index(start)
    ours = make_sampler(name, NoiseSchedule.from_config(config), num_steps)

    rng = np.random.default_rng(7)
    x0, noise = rng.standard_normal((2, *SHAPE), dtype=np.float32)
    x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[start:start + 1])
    x_ours = ours.add_noise(x0, noise, start)
    assert_close(x_ours, x_ref.numpy(), "noised start")

    gen_ref, gen_ours = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for i in range(start, num_steps):
        t = ref.timesteps[i]
        in_ref = ref.scale_model_input(x_ref, t)
        in_ours = ours.scale_model_input(x_ours, i)
        out_ref = torch.from_numpy(fake_unet(in_ref.numpy(), float(t)))
        out_ours = fake_unet(in_ours, float(ours.timesteps[i]))
        step_noise = None
        if ours.needs_noise and not (name in NO_NOISE_ON_LAST_STEP and i == num_steps - 1):
            step_noise = randn_tensor(out_ref.shape, dtype=out_ref.dtype, generator=gen_ours).numpy()
        elif ours.needs_noise:
            step_noise = np.zeros(SHAPE, np.float32)
        x_ref = ref.step(out_ref, t, x_ref, generator=gen_ref).prev_sample
        x_ours = ours.step(out_ours, i, x_ours, noise=step_noise)
        assert_close(x_ours, x_ref.numpy(), f"sample after step {i}")
        if i + 1 < num_steps:  # the blend's re-noised known region, as the inpainting pipeline computes it
            blend_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[i + 1:i + 2])
            assert_close(ours.add_noise(x0, noise, i + 1), blend_ref.numpy(), f"blend add_noise at {i + 1}")
