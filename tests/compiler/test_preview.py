"""The latent preview map: the compiler's least-squares fit recovers a known linear VAE, and compiled bundles
carry the map the runtime renders previews with."""

from __future__ import annotations

import numpy as np
import torch

from compiler.preview import fit_latent_rgb, synthetic_images
from runtime.pipeline import latent_preview


class LinearVae(torch.nn.Module):
    """An 'encoder' that average-pools by 4 and mixes RGB into 4 channels (moments = mean and log-variance)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mix = torch.randn(4, 3, generator=g)
        self.offset = torch.randn(4, generator=g)
        self.quant_conv = None

    def encoder(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(x, 4)
        mean = torch.einsum("oc,bchw->bohw", self.mix, pooled) + self.offset[None, :, None, None]
        return torch.cat([mean, torch.zeros_like(mean)], dim=1)


def test_fit_recovers_a_linear_vae() -> None:
    vae = LinearVae()
    fit = fit_latent_rgb(vae, scaling_factor=0.5, scale_factor=4)
    assert np.asarray(fit["weights"]).shape == (4, 3) and len(fit["bias"]) == 3
    assert fit["rmse"] < 1e-4
    image = synthetic_images(32, count=1, seed=7)
    with torch.inference_mode():
        latent = vae.encoder(torch.from_numpy(image))[0, :4].numpy() * 0.5
    expected = torch.nn.functional.avg_pool2d(torch.from_numpy(image), 4)[0].numpy().transpose(1, 2, 0) / 2 + 0.5
    got = latent_preview(latent, fit).astype(np.float64) / 255
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-3


def test_compiled_bundle_has_the_map(tiny_model) -> None:
    rgb = tiny_model.manifest.model["latent_rgb"]
    assert np.asarray(rgb["weights"]).shape == (tiny_model.manifest.model["latent_channels"], 3)
    assert np.isfinite(rgb["rmse"])
