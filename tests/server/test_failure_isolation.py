"""A request that fails inside a call it shares with others fails alone: at every point of the engine's turn
(text encode, preparation and the VAE encoder, UNet, sampler step, VAE decode, paste, PNG) the other requests
of the call still give the PNG bytes they give alone, and work already done for them is not done again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import numpy as np
import pytest

from proto.kiln.v1 import kiln_pb2 as pb
from runtime import engine as engine_module
from runtime.engine import Artifact, Engine, EngineConfig, Failed
from runtime.model import LoadedModel
from runtime.pipeline import Generation, Pipeline
from runtime.validate import validate
from tests.server.test_image_inputs import encode, pattern, right_half_mask

# Three requests that run 3 denoising steps each at 64x64, so they share every call of every turn: the text
# encoder, each UNet step and the VAE decoder. The broken one is img2img (so it has a VAE-encoder call of its
# own) and arrives between the two healthy ones, so a healthy request comes before it and after it in each call.
HEALTHY = [
    pb.GenerateRequest(model="tiny", prompt="a red circle", seed=1, steps=3, sampler="euler_a", request_id="h0"),
    pb.GenerateRequest(model="tiny", prompt="fill the right", seed=2, steps=4, strength=0.75, request_id="h1",
                       init_image=encode(pattern()), mask_image=encode(right_half_mask()), mask_blur=2),
]
BROKEN = pb.GenerateRequest(model="tiny", prompt="a broken one", seed=3, steps=6, strength=0.5, request_id="bad",
                            init_image=encode(np.zeros((64, 64, 3), np.uint8)))


class Broken(RuntimeError):
    """The injected failure."""


def is_bad(gen: Generation) -> bool:
    return gen.params.request_id == "bad"


class CountingSession:
    """A model session that counts its calls and raises Broken when `breaks(feed)` is true."""

    def __init__(self, real, breaks: Callable[[Mapping[str, np.ndarray]], bool] = lambda feed: False):  # type: ignore[no-untyped-def]
        self.real, self.breaks, self.calls = real, breaks, 0
        self.name, self.input_names, self.output_names = real.name, real.input_names, real.output_names

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.breaks(inputs):
            raise Broken(f"{self.name} cannot take this input")
        return self.real.run(inputs)


def break_shared(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The engine's shared call `name` (over several requests) raises when the broken request is in it."""
    real = getattr(engine_module, name)

    def shared(model, items):  # type: ignore[no-untyped-def]
        if any(is_bad(i[0] if isinstance(i, tuple) else i) for i in items):
            raise Broken(f"{name} breaks on the bad request")
        return real(model, items)

    monkeypatch.setattr(engine_module, name, shared)


def break_own(monkeypatch: pytest.MonkeyPatch, method: str, when: Callable[[Generation], bool] = is_bad) -> None:
    """Pipeline.`method` (one request's own work) raises for the broken request."""
    real = getattr(Pipeline, method)

    def own(self, gen, *args, **kw):  # type: ignore[no-untyped-def]
        if when(gen):
            raise Broken(f"{method} breaks on the bad request")
        return real(self, gen, *args, **kw)

    monkeypatch.setattr(Pipeline, method, own)


def black_image(feed: Mapping[str, np.ndarray]) -> bool:
    """The broken request's init image is all black: -1 everywhere at the VAE encoder's input."""
    return bool(np.all(feed["sample"] == -1.0))


POINTS = ["text_encode", "prepare", "vae_encoder", "unet", "sampler_step", "vae_decode", "paste", "png"]


async def run_engine(model: LoadedModel, requests: list[pb.GenerateRequest], **config: object
                     ) -> tuple[dict[str, list[bytes] | BaseException], Engine]:
    """The requests through a real engine as the servicer submits them, all before its first turn (so they
    share every call, in this order); each one's PNGs, or the error it failed with."""
    engine = Engine(EngineConfig(max_wait_s=0, **config))  # type: ignore[arg-type]
    engine.start()
    m = model.manifest
    jobs = []
    for r in requests:
        gen = Generation(validate(r, m.defaults, m.limits, schedule=model.schedule), model)
        Pipeline(model).tokenize(gen)
        jobs.append(engine.submit(gen))
    out: dict[str, list[bytes] | BaseException] = {}
    for job in jobs:
        events = [e async for e in job.events()]
        failed = [e.error for e in events if isinstance(e, Failed)]
        out[job.request_id] = failed[0] if failed else [e.png for e in events if isinstance(e, Artifact)]
    await engine.stop()
    return out, engine


@pytest.fixture(scope="module")
def alone(tiny_model: LoadedModel) -> dict[str, list[bytes] | BaseException]:
    return {r.request_id: asyncio.run(run_engine(tiny_model, [r]))[0][r.request_id] for r in HEALTHY}


@pytest.mark.parametrize("point", POINTS)
def test_a_request_failing_in_a_shared_call_fails_alone(tiny_model, alone, monkeypatch, point) -> None:  # type: ignore[no-untyped-def]
    text_encoder = CountingSession(tiny_model.sessions["text_encoder"])
    monkeypatch.setitem(tiny_model.sessions, "text_encoder", text_encoder)
    if point == "text_encode":
        break_shared(monkeypatch, "encode_text_batch")
    elif point == "prepare":
        break_own(monkeypatch, "prepare")
    elif point == "vae_encoder":
        monkeypatch.setitem(tiny_model.sessions, "vae_encoder",
                            CountingSession(tiny_model.sessions["vae_encoder"], black_image))
    elif point == "unet":
        break_shared(monkeypatch, "unet_batch")
    elif point == "sampler_step":  # its second step: after one step that went well
        break_own(monkeypatch, "apply_unet_output", lambda g: is_bad(g) and g.steps_done == 1)
    elif point == "vae_decode":
        break_shared(monkeypatch, "decode_batch")
    elif point == "paste":
        break_own(monkeypatch, "finish_image")
    elif point == "png":
        break_own(monkeypatch, "encode_png")

    results, engine = asyncio.run(run_engine(tiny_model, [HEALTHY[0], BROKEN, HEALTHY[1]]))
    assert isinstance(results["bad"], Broken), results["bad"]
    for rid in ("h0", "h1"):
        assert results[rid] == alone[rid], f"{rid}: {results[rid]!r} instead of its PNG alone"
    assert {o.request_id: o.status for o in engine.history} == {"h0": "finished", "bad": "failed", "h1": "finished"}
    first_unet_calls = {"text_encode": [("h0", "h1")], "prepare": [("h0", "h1")], "vae_encoder": [("h0", "h1")],
                        "unet": [("h0",), ("h1",)]}.get(point, [("h0", "bad", "h1")])  # the broken call is not kept
    assert [b.request_ids for b in list(engine.batches)[:len(first_unet_calls)]] == first_unet_calls, engine.batches
    # work done for the healthy requests in a call that went well is not done again
    if point != "text_encode":
        assert text_encoder.calls == 1, f"the text encoder ran {text_encoder.calls} times for one batch"
    if point in ("paste", "png"):
        assert list(engine.decodes) == [("h0", "bad", "h1")], engine.decodes


def test_only_an_idle_engine_waits_for_more_requests(tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """`max_wait_s` is spent once, when a request finds the engine idle; the turns that follow run at once (the
    engine used to wait again before every turn of a partly filled batch)."""
    waits: list[int] = []
    real = Engine._gather_arrivals

    async def counted(self: Engine) -> None:
        waits.append(len(self._jobs))
        await real(self)

    monkeypatch.setattr(Engine, "_gather_arrivals", counted)

    async def go() -> None:
        engine = Engine(EngineConfig(max_wait_s=0.05))
        engine.start()
        m = tiny_model.manifest
        gen = Generation(validate(HEALTHY[0], m.defaults, m.limits, schedule=tiny_model.schedule), tiny_model)
        Pipeline(tiny_model).tokenize(gen)
        events = [e async for e in engine.submit(gen).events()]
        await engine.stop()
        assert any(isinstance(e, Artifact) for e in events)

    asyncio.run(go())
    assert waits == [1]  # one wait for a request that ran 5 turns (encode, 3 steps, decode)
