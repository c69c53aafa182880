"""The diffusers peer through run_peer.py on the tiny model, in Kiln's own .venv (no peer environment is made)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest

from bench import peers


def in_process_diffusers(model: Path, latents: np.ndarray, size: int, steps: int, seed: int) -> np.ndarray:
    """What bench/latency.py's diffusers variant does, here in the test process."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        out = pipe(peers.PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                   latents=torch.from_numpy(latents), generator=torch.Generator().manual_seed(seed),
                   output_type="np").images[0]
    return (out * 255).round().astype(np.uint8)


def test_diffusers_peer_matches_in_process_diffusers(tiny_source: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.workspace.WORK", tmp_path / "work")
    size, steps, seed = 64, 3, 5
    result = peers.measure("diffusers", tiny_source, size=size, steps=steps, guidance=7.5, seed=seed, repeats=2,
                           log=lambda _: None)

    assert result["pipeline"] == "diffusers" and result["scheduler"] == "EulerDiscreteScheduler"
    assert result["prompt"] == peers.PROMPT and result["precision"] == "fp32"
    assert (result["size"], result["steps"], result["seed"], result["threads"]) == (size, steps, seed, 2)
    assert len(result["warm_s"]) == 2 and all(t > 0 for t in result["warm_s"])
    assert result["median_warm_s"] == pytest.approx(statistics.median(result["warm_s"]), abs=2e-3)
    phases = result["phases"]
    assert set(phases) == {"interpreter_s", "import_s", "load_s", "first_image_s"}
    assert all(v > 0 for v in phases.values())
    assert result["cold_start_s"] == pytest.approx(sum(phases.values()), abs=0.01)
    assert result["peak_rss_bytes"] >= result["peak_rss_after_first_image_bytes"] > 50 * 2**20
    assert {"torch", "diffusers", "transformers"} <= set(result["versions"])

    lat_path = peers.latents(tiny_source, size, seed)
    lat = np.load(lat_path)
    assert lat.shape == (1, 4, size // 8, size // 8)
    assert np.array_equal(lat, np.random.default_rng(seed).standard_normal(lat.shape, dtype=np.float32))
    image = Path(result["image"])
    assert image.suffix == ".png" and image.exists()

    from PIL import Image

    ours = np.asarray(Image.open(image))
    ref = in_process_diffusers(tiny_source, lat, size, steps, seed)
    assert ours.shape == ref.shape == (size, size, 3)
    assert np.array_equal(ours, ref), f"max diff {np.abs(ours.astype(int) - ref.astype(int)).max()}"
    assert ours.std() > 1  # a real picture, not a constant that any two pipelines would agree on

    other = tmp_path / "other.png"
    Image.fromarray(255 - ref).save(other)
    assert peers.image_diff(image, image) == (0, 0.0)
    assert peers.image_diff(image, other)[0] > 0


def test_measure_rejects_unknown_pipeline(tiny_source: Path) -> None:
    with pytest.raises(ValueError, match="pipeline='tensorrt' is not one of diffusers, optimum, openvino"):
        peers.measure("tensorrt", tiny_source)


def test_diffusers_peer_runs_sdxl_turbo_as_diffusers_does(tiny_sdxl_source: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An SDXL folder runs through StableDiffusionXLPipeline, and `sampler="turbo"` is SDXL-Turbo's setting
    (EulerAncestral, trailing timesteps), here at 1 step without guidance: the same image as in-process diffusers."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
    from PIL import Image

    monkeypatch.setattr("bench.workspace.WORK", tmp_path / "work")
    size, seed = 64, 2
    result = peers.measure("diffusers", tiny_sdxl_source, size=size, steps=1, guidance=0.0, seed=seed, repeats=1,
                           sampler="turbo", log=lambda _: None)
    assert result["scheduler"] == "EulerAncestralDiscreteScheduler" and result["sampler"] == "turbo"
    assert (result["steps"], result["guidance"]) == (1, 0.0)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_source)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    lat = np.load(peers.latents(tiny_sdxl_source, size, seed))
    with torch.inference_mode():
        out = pipe(peers.PROMPT, height=size, width=size, num_inference_steps=1, guidance_scale=0.0,
                   latents=torch.from_numpy(lat), generator=torch.Generator().manual_seed(seed),
                   output_type="np").images[0]
    ref = (out * 255).round().astype(np.uint8)
    ours = np.asarray(Image.open(result["image"]))
    assert ours.shape == ref.shape == (size, size, 3)
    assert np.array_equal(ours, ref), f"max diff {np.abs(ours.astype(int) - ref.astype(int)).max()}"
    assert ours.std() > 1
    assert peers.label("openvino-static", sdxl=True).startswith("optimum-intel OVStableDiffusionXLPipeline, static image size")
