"""Calibration and fidelity inputs: run the fp32 pipeline over shipped prompts and record what each
component is fed, so int8 scales come from the activations real requests produce."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.pipeline import to_vae_input

PROMPTS_FILE = Path(__file__).parent / "prompts/calibration.txt"


def prompts(path: str | Path | None = None) -> list[str]:
    """Non-empty, non-comment lines of `path` (default: the prompt set shipped with Kiln)."""
    path = Path(path) if path else PROMPTS_FILE
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    out = [ln for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


class RecordingSession:
    """A ModelSession that keeps a copy of every feed it runs (up to `limit`)."""

    def __init__(self, inner, limit: int | None = None):  # type: ignore[no-untyped-def]
        self.inner = inner
        self.name = inner.name
        self.input_names = inner.input_names
        self.output_names = inner.output_names
        self.limit = limit
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.limit is None or len(self.feeds) < self.limit:
            self.feeds.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        return self.inner.run(inputs)


@dataclass
class Run:
    """What one pass of the pipeline over a prompt set produced."""

    feeds: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    """Inputs each component was fed, in call order (the VAE encoder's: the decoded images, in [-1, 1])."""
    images: list[np.ndarray] = field(default_factory=list)
    """uint8 [H, W, 3] per prompt."""
    latents: list[np.ndarray] = field(default_factory=list)
    """Final latents per prompt (before the VAE decoder)."""


def run_pipeline(model, texts: list[str], steps: int, seed: int = 0, record: bool = True,  # type: ignore[no-untyped-def]
                 size: int | None = None) -> Run:
    """Text-to-image over `texts` at the bundle's default size (or `size` x `size`), sampler and guidance; seed + i
    per prompt."""
    from proto.kiln.v1 import kiln_pb2 as pb
    from runtime.pipeline import Pipeline
    from runtime.validate import validate

    sessions = dict(model.sessions)
    recorders = {}
    if record:
        recorders = {n: RecordingSession(s) for n, s in sessions.items() if n != "vae_encoder"}
        model.sessions.update(recorders)
    result = Run()
    try:
        pipe = Pipeline(model)
        for i, text in enumerate(texts):
            request = pb.GenerateRequest(prompt=text, steps=steps, seed=seed + i, width=size or 0, height=size or 0)
            params = validate(request, model.manifest.defaults, model.manifest.limits)
            images, gen = pipe.run(params)
            assert gen.latents is not None
            result.latents.append(gen.latents[:1].copy())
            result.images.append(images[0])
    finally:
        model.sessions.clear()
        model.sessions.update(sessions)
    result.feeds = {n: r.feeds for n, r in recorders.items()}
    if record:
        result.feeds["vae_encoder"] = [{"sample": to_vae_input(im)} for im in result.images]
    return result


