"""The per-request decoder on a real `kiln serve`: ListModels lists each bundle's decoders, `decoder: "tiny"`
draws with the bundle's tiny decoder, a decoder the bundle lacks or an unknown one is INVALID_ARGUMENT naming
`decoder` and the allowed values; and the engine never puts both decoders in one decode call."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime.client import channel
from runtime.pipeline import Pipeline
from runtime.validate import validate
from tests.conftest import ServerProcess, load_latest, start_server
from tests.server.test_batching import generate, pngs, serving
from tests.server.test_errors import call, violations


@pytest.fixture(scope="module")
def vae_server(vae_store: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    s = start_server(vae_store, tmp_path_factory.mktemp("vae-server") / "serve.log")
    yield s
    s.stop()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_list_models_lists_decoders(vae_server: ServerProcess) -> None:
    with channel(vae_server.target) as ch:
        models = {m.name: m for m in pb_grpc.KilnStub(ch).ListModels(pb.ListModelsRequest(), timeout=30).models}
    assert list(models["swapped"].decoders) == ["full", "tiny"]
    assert list(models["with-vae"].decoders) == ["full"]
    assert list(models["taesd"].decoders) == ["full"]  # TAESD as the VAE is the bundle's full decoder


def test_generate_with_each_decoder(vae_server: ServerProcess, vae_store: Path) -> None:
    model = load_latest(vae_store, "swapped")
    got = {}
    for decoder in ("tiny", "full", ""):
        request = pb.GenerateRequest(model="swapped", prompt="a red circle", steps=4, seed=7, sampler="euler",
                                     decoder=decoder)
        with channel(vae_server.target) as ch:
            events = list(pb_grpc.KilnStub(ch).Generate(request, timeout=60))
        got[decoder] = _pixels(events[-1].artifact.data)
        params = validate(request, model.manifest.defaults, model.manifest.limits, decoders=tuple(model.decoders))
        want = Pipeline(model).run(params)[0][0]
        assert np.abs(got[decoder].astype(int) - want.astype(int)).max() <= 1, decoder
    assert np.array_equal(got["full"], got[""])  # unset: the full decoder
    assert np.abs(got["tiny"].astype(int) - got["full"].astype(int)).mean() > 10


@pytest.mark.parametrize(("model", "decoder", "message"), [
    ("with-vae", "tiny", "decoder='tiny': model 'with-vae' has no tiny decoder; its decoders: full"),
    ("swapped", "taesd", "decoder='taesd' is not one of: full, tiny"),
])
def test_bad_decoder_is_invalid_argument(vae_server: ServerProcess, model: str, decoder: str, message: str) -> None:
    error = call(vae_server.target, pb.GenerateRequest(model=model, prompt="x", steps=1, decoder=decoder))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in violations(error)["decoder"]


def test_decode_calls_never_mix_decoders(vae_store: Path) -> None:
    """Two requests of the same size finishing in the same turn, one per decoder: two decode calls, and each
    PNG is byte-identical to the request run alone; two with the same decoder share one call."""
    model = load_latest(vae_store, "swapped")
    requests = [pb.GenerateRequest(model="swapped", prompt=f"shape {i}", seed=i, steps=3, request_id=f"d{i}",
                                   decoder=d) for i, d in enumerate(("full", "tiny", "tiny"))]

    async def together():  # type: ignore[no-untyped-def]
        async with serving(vae_store, {"swapped": model}, max_batch_size=16, max_wait_s=0.5) as server:
            results = await asyncio.gather(*(generate(server.port, r) for r in requests))
            return [pngs(got) for _, got, _ in results], list(server.engine.decodes)

    async def alone():  # type: ignore[no-untyped-def]
        async with serving(vae_store, {"swapped": model}, batching=False) as server:
            return [pngs((await generate(server.port, r))[1]) for r in requests]

    solo = asyncio.run(alone())
    both, decodes = asyncio.run(together())
    assert both == solo
    assert sorted(map(sorted, decodes)) == [["d0"], ["d1", "d2"]], decodes


def test_kiln_generate_decoder_flag(vae_server: ServerProcess, vae_store: Path, tmp_path: Path) -> None:
    from tests.conftest import kiln

    out = tmp_path / "draft.png"
    r = kiln("generate", "--target", vae_server.target, "--model", "swapped", "--prompt", "a red circle", "--steps",
             "4", "--seed", "7", "--sampler", "euler", "--decoder", "tiny", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    model = load_latest(vae_store, "swapped")
    request = pb.GenerateRequest(model="swapped", prompt="a red circle", steps=4, seed=7, sampler="euler",
                                 decoder="tiny")
    want = Pipeline(model).run(validate(request, model.manifest.defaults, model.manifest.limits,
                                        decoders=tuple(model.decoders)))[0][0]
    assert np.abs(_pixels(out.read_bytes()).astype(int) - want.astype(int)).max() <= 1
    r = kiln("generate", "--target", vae_server.target, "--model", "with-vae", "--prompt", "x", "--decoder", "tiny",
             "--quiet", "--out", str(tmp_path / "no.png"))
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr and "decoder" in r.stderr, r.stderr
