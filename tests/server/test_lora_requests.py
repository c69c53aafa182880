"""Per-request LoRA adapters on a server: concurrent requests with different adapters (and none) each get the
image their own selection gives alone, batched only with requests of the same selection; ListModels lists the
adapters; bad selections fail with INVALID_ARGUMENT or NOT_FOUND naming the field or the adapter."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime.client import channel, list_models
from runtime.model import LoadedModel
from tests.conftest import start_server
from tests.server.test_batching import generate, pngs, serving
from tests.server.test_errors import call, violations

MODEL = "tiny-lora"


def request(rid: str, seed: int, *loras: tuple[str, float]) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=MODEL, prompt="a red circle", negative_prompt="blurry", seed=seed, steps=5,
                              sampler="euler", request_id=rid,
                              loras=[pb.LoraSelection(name=n, scale=s) for n, s in loras])


# two with the same adapter (they may share UNet calls), one with another, one with two, one with none
REQUESTS = [
    request("kohya-a", 1, ("kohya", 1.0)),
    request("kohya-b", 2, ("kohya", 1.0)),
    request("peft", 1, ("peft", -0.7)),
    request("both", 1, ("peft", 0.5), ("kohya", 1.5)),
    request("none", 1),
]


@pytest.fixture(scope="module")
def lora_loaded(lora_store: Path) -> LoadedModel:
    from runtime.model import load_store

    return load_store(lora_store)[MODEL]


@pytest.fixture(scope="module")
def alone(lora_store: Path, lora_loaded: LoadedModel) -> dict[str, list[bytes]]:
    async def run() -> dict[str, list[bytes]]:
        async with serving(lora_store, {MODEL: lora_loaded}, batching=False) as server:
            out = {}
            for r in REQUESTS:
                code, got, status = await generate(server.port, r)
                assert code == grpc.StatusCode.OK, status.message
                out[r.request_id] = pngs(got)
            return out

    return asyncio.run(run())


def test_concurrent_requests_with_different_adapters_get_their_own_images(lora_store, lora_loaded, alone) -> None:  # type: ignore[no-untyped-def]
    async def run():  # type: ignore[no-untyped-def]
        async with serving(lora_store, {MODEL: lora_loaded}, max_batch_size=16, max_wait_s=0.5) as server:
            results = await asyncio.gather(*(generate(server.port, r) for r in REQUESTS))
            return results, list(server.engine.batches)

    results, batches = asyncio.run(run())
    for r, (code, got, status) in zip(REQUESTS, results, strict=True):
        assert code == grpc.StatusCode.OK, status.message
        assert pngs(got) == alone[r.request_id], f"{r.request_id}: its PNG differs from the same request alone"
    # same seed and prompt, different adapters: different images (an adapter leaking into another's call shows)
    same_seed = {alone[k][0] for k in ("kohya-a", "peft", "both", "none")}
    assert len(same_seed) == 4
    # only requests with the same selection shared a UNet call, and those two did
    shared = {b.request_ids for b in batches if len(b.request_ids) > 1}
    assert shared and all(set(ids) == {"kohya-a", "kohya-b"} for ids in shared), batches


def test_a_damaged_adapter_is_skipped_and_the_others_load(lora_store: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from runtime.model import load_store

    store = tmp_path / "store"
    shutil.copytree(lora_store, store)
    data = bytearray((store / MODEL / "adapters/peft.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    (store / MODEL / "adapters/peft.safetensors").write_bytes(bytes(data))
    model = load_store(store)[MODEL]
    assert sorted(model.adapters) == ["kohya"]
    assert "skipping LoRA adapter" in caplog.text and "peft.safetensors: sha256" in caplog.text


def test_adapter_feeds_are_cached_per_selection(lora_loaded: LoadedModel) -> None:
    lora = lora_loaded.lora
    assert lora is not None
    a = lora.feeds("unet", (("kohya", 1.0),))
    assert lora.feeds("unet", (("kohya", 1.0),)) is a
    both = lora.feeds("unet", (("kohya", 1.0), ("peft", 0.5)))
    name = next(n for n in both if n.startswith("lora_up."))
    kohya, peft = lora.adapters["kohya"].tensors["unet"][name], lora.adapters["peft"].tensors["unet"][name]
    assert both[name].shape[1] == kohya.shape[1] + peft.shape[1]  # concatenated along the rank
    assert (both[name][:, kohya.shape[1]:] == peft * 0.5).all()  # the scale folded into `up`
    none = lora.feeds("unet", ())
    assert none[name].shape[1] == 0


@pytest.fixture(scope="module")
def lora_server(lora_store: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    s = start_server(lora_store, tmp_path_factory.mktemp("lora-server") / "serve.log")
    yield s
    s.stop()


def test_list_models_lists_adapters(lora_server, lora_files) -> None:  # type: ignore[no-untyped-def]
    from model_store import sha256_file

    (info,) = list_models(lora_server.target).models
    assert info.limits.max_loras == 2
    assert [(a.name, a.rank, a.scale) for a in info.adapters] == [("kohya", 2, 1.0), ("peft", 4, 1.0)]
    assert info.adapters[0].sha256 == sha256_file(lora_files["kohya"])


def test_plain_models_list_no_adapters(server) -> None:  # type: ignore[no-untyped-def]
    (info,) = list_models(server.target).models
    assert info.limits.max_loras == 0 and not info.adapters


def test_unknown_adapter_is_not_found(lora_server) -> None:  # type: ignore[no-untyped-def]
    from grpc_status import rpc_status

    e = call(lora_server.target, request("x", 1, ("kohya", 1.0), ("watercolor", 1.0)))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert "adapter 'watercolor' is not served here; available: kohya, peft" in e.details()
    (detail,) = rpc_status.from_call(e).details
    info = error_details_pb2.ResourceInfo()
    detail.Unpack(info)
    assert (info.resource_type, info.resource_name) == ("adapter", "watercolor")


@pytest.mark.parametrize(("loras", "field", "text"), [
    ([("kohya", 4.5)], "loras[0].scale", "loras[0].scale=4.5 must be between -4 and 4"),
    ([("kohya", 1.0), ("peft", float("nan"))], "loras[1].scale", "must be between -4 and 4"),
    ([("kohya", 1.0), ("kohya", 0.5)], "loras[1].name", "loras[1].name='kohya' is selected twice"),
    ([("", 1.0)], "loras[0].name", "must name an adapter"),
    ([("kohya", 1.0), ("peft", 1.0), ("x", 1.0)], "loras", "loras has 3 adapters; at most 2 are allowed"),
])
def test_bad_selections_are_invalid_arguments(lora_server, loras, field, text) -> None:  # type: ignore[no-untyped-def]
    e = call(lora_server.target, request("x", 1, *loras))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert text in violations(e)[field]


def test_loras_on_a_model_without_lora_inputs(server) -> None:  # type: ignore[no-untyped-def]
    r = pb.GenerateRequest(model="tiny", prompt="a red circle", steps=2, loras=[pb.LoraSelection(name="kohya")])
    e = call(server.target, r)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes no per-request LoRA adapters" in violations(e)["loras"]
    with channel(server.target) as ch:  # the server keeps serving
        assert list(pb_grpc.KilnStub(ch).Generate(pb.GenerateRequest(model="tiny", prompt="ok", steps=1), timeout=60))


def test_cli_lists_and_selects_adapters(lora_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import kiln

    listed = kiln("models", "list", "--target", lora_server.target)
    assert listed.returncode == 0 and "LoRA adapters (up to 2): kohya (rank 2), peft (rank 4)" in listed.stdout
    args = ("generate", "--target", lora_server.target, "--model", MODEL, "--prompt", "a red circle", "--steps", "3",
            "--seed", "1", "--quiet")
    with_lora = kiln(*args, "--lora", "kohya:0.8", "--lora", "peft", "--out", str(tmp_path / "a.png"))
    without = kiln(*args, "--out", str(tmp_path / "b.png"))
    assert with_lora.returncode == 0 and without.returncode == 0, with_lora.stderr + without.stderr
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    bad = kiln(*args, "--lora", "kohya:9", "--out", str(tmp_path / "c.png"))
    assert bad.returncode == 1 and "loras[0].scale" in bad.stderr, bad.stderr


def test_io_binding_keeps_a_selections_lora_inputs_resident(lora_loaded: LoadedModel) -> None:
    import numpy as np

    from runtime.sessions import OrtSession

    path = lora_loaded.path / lora_loaded.manifest.components["unet"].file
    plain, bound = OrtSession("unet", path), OrtSession("unet", path, io_binding=True)
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32), "timestep": np.full((2,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
            **lora_loaded.lora_feeds("unet", (("kohya", 1.0),))}
    np.testing.assert_array_equal(bound.run(feed)["out_sample"], plain.run(feed)["out_sample"])
    assert bound.uploads == len(feed)
    # the next step of the same request: only the latents and the timestep cross again
    step = {**feed, "sample": feed["sample"] * 0.5, **lora_loaded.lora_feeds("unet", (("kohya", 1.0),))}
    np.testing.assert_array_equal(bound.run(step)["out_sample"], plain.run(step)["out_sample"])
    assert bound.uploads == len(feed) + 2
