"""Step-level batching on a real gRPC server (in-process, so the engine's batch records can be checked):
batched results equal the same requests run alone, byte for byte; joining, leaving, size groups, the batch
size limit, cancellation, the queue limit and previews."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime.engine import EngineConfig
from runtime.model import LoadedModel
from runtime.server.app import KilnServer, ServeConfig


@asynccontextmanager
async def serving(store: Path, models: dict[str, LoadedModel], **engine: object) -> AsyncIterator[KilnServer]:
    server = KilnServer(ServeConfig(store=store, port=0, engine=EngineConfig(**engine)), models)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def generate(port: int, request: pb.GenerateRequest, cancel_at_step: int = 0
                   ) -> tuple[grpc.StatusCode, list[pb.GenerateResponse], status_pb2.Status]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = pb_grpc.KilnStub(ch).Generate(request, timeout=120)
        got: list[pb.GenerateResponse] = []
        try:
            async for r in call:
                got.append(r)
                if cancel_at_step and r.WhichOneof("event") == "progress" and r.progress.step == cancel_at_step:
                    call.cancel()
                    break
        except grpc.aio.AioRpcError:
            pass
        status = status_pb2.Status()
        for k, v in await call.trailing_metadata() or ():
            if k == "grpc-status-details-bin":
                status.ParseFromString(v)
        return await call.code(), got, status


def pngs(responses: list[pb.GenerateResponse]) -> list[bytes]:
    return [r.artifact.data for r in responses if r.WhichOneof("event") == "artifact"]


# varied on purpose: guided and not (2 rows vs 1 per image), guided for its first 2 steps only (guidance_end: 2
# rows, then 1), samplers with and without multistep state and ancestral noise, different step counts (requests
# leave the batch at different steps), two images in one
REQUESTS = [
    pb.GenerateRequest(model="tiny", prompt="a red circle", seed=1, steps=4, sampler="euler", request_id="r0"),
    pb.GenerateRequest(model="tiny", prompt="a blue square", seed=2, steps=6, sampler="euler_a", request_id="r1",
                       guidance_scale=1.0),
    pb.GenerateRequest(model="tiny", prompt="a green triangle", seed=3, steps=3, sampler="dpmpp_2m_karras",
                       num_images=2, request_id="r2"),
    pb.GenerateRequest(model="tiny", prompt="a yellow circle", negative_prompt="blurry", seed=4, steps=5,
                       guidance_scale=4.0, sampler="euler", request_id="r3", guidance_end=0.4),
]


def run_alone(store: Path, models: dict[str, LoadedModel], requests: list[pb.GenerateRequest]) -> dict[str, list[bytes]]:
    """Each request run by itself on a server without batching: request id -> its PNGs."""

    async def run() -> dict[str, list[bytes]]:
        async with serving(store, models, batching=False) as server:
            out = {}
            for r in requests:
                code, got, _ = await generate(server.port, r)
                assert code == grpc.StatusCode.OK
                out[r.request_id] = pngs(got)
            assert not any(len(b.request_ids) > 1 for b in server.engine.batches)
            return out

    return asyncio.run(run())


@pytest.fixture(scope="module")
def alone(tiny_store: Path, tiny_model: LoadedModel) -> dict[str, list[bytes]]:
    return run_alone(tiny_store, {"tiny": tiny_model}, REQUESTS)


def test_batched_requests_give_the_same_png_bytes_as_alone(tiny_store, tiny_model, alone) -> None:
    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, max_batch_size=16, max_wait_s=0.5) as server:
            results = await asyncio.gather(*(generate(server.port, r) for r in REQUESTS))
            return results, list(server.engine.batches)

    results, batches = asyncio.run(run())
    for r, (code, got, _) in zip(REQUESTS, results, strict=True):
        assert code == grpc.StatusCode.OK
        assert pngs(got) == alone[r.request_id], f"{r.request_id}: batched PNG bytes differ from alone"
    # all four started together (max_wait), then left as their steps ran out: 3, 4, 5, 6 steps
    sizes = [len(b.request_ids) for b in batches]
    assert sizes == [4, 4, 4, 3, 2, 1], sizes
    assert batches[0].rows == batches[1].rows == 2 + 1 + 4 + 2
    assert batches[2].rows == 2 + 1 + 4 + 1  # r3 past its guidance_end (2 of 5 steps guided): its conditional row
    # rows stay in arrival order (whichever order the four RPCs reached the server); r2 (3 steps) leaves first
    assert batches[1].request_ids == batches[2].request_ids == batches[0].request_ids
    assert batches[3].request_ids == tuple(r for r in batches[0].request_ids if r != "r2")


def test_late_arrivals_join_running_batches(tiny_store, tiny_model, alone) -> None:
    # 150 steps: long enough that the second request surely arrives while the first is still denoising
    long = pb.GenerateRequest(model="tiny", prompt="long", seed=7, steps=150, request_id="long")

    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, max_wait_s=0.0) as server:
            first = asyncio.create_task(generate(server.port, long))
            while not any(server.engine.batches):
                await asyncio.sleep(0.001)
            second = await generate(server.port, REQUESTS[0])
            return await first, second, list(server.engine.batches)

    first, second, batches = asyncio.run(run())
    assert first[0] == grpc.StatusCode.OK and pngs(second[1]) == alone["r0"]
    assert any(b.request_ids == ("long", "r0") for b in batches), batches
    assert batches[0].request_ids == ("long",)


def test_batch_size_limit_and_size_groups(tiny_store, tiny_model, alone) -> None:
    other_size = pb.GenerateRequest(model="tiny", prompt="a red circle", seed=1, steps=4, width=128, height=96,
                                    request_id="big")

    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, max_batch_size=3, max_wait_s=0.5) as server:
            results = await asyncio.gather(*(generate(server.port, r) for r in [*REQUESTS, other_size]))
            return results, list(server.engine.batches)

    results, batches = asyncio.run(run())
    for r, (code, got, _) in zip(REQUESTS, results, strict=False):
        assert code == grpc.StatusCode.OK and pngs(got) == alone[r.request_id]
    for b in batches:
        assert b.rows <= 3 or len(b.request_ids) == 1, b  # r2 alone is 4 rows: it runs, by itself
        assert "big" not in b.request_ids or b.request_ids == ("big",), b


def test_cancelled_request_leaves_the_batch_and_the_others_are_unchanged(tiny_store, tiny_model, alone) -> None:
    victim = pb.GenerateRequest(model="tiny", prompt="cancel me", seed=9, steps=40, request_id="victim")

    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, max_wait_s=0.5) as server:
            results = await asyncio.gather(generate(server.port, victim, cancel_at_step=2),
                                           *(generate(server.port, r) for r in REQUESTS))
            for _ in range(100):
                if any(o.request_id == "victim" for o in server.engine.history):
                    break
                await asyncio.sleep(0.01)
            return results, list(server.engine.batches), list(server.engine.history)

    results, batches, history = asyncio.run(run())
    assert results[0][0] == grpc.StatusCode.CANCELLED
    for r, (code, got, _) in zip(REQUESTS, results[1:], strict=True):
        assert code == grpc.StatusCode.OK and pngs(got) == alone[r.request_id]
    (victim_outcome,) = [o for o in history if o.request_id == "victim"]
    assert victim_outcome.status == "cancelled" and victim_outcome.steps_done < 10
    assert sum("victim" in b.request_ids for b in batches) == victim_outcome.steps_done


def test_queue_limit_answers_server_busy(tiny_store, tiny_model) -> None:
    slow = pb.GenerateRequest(model="tiny", prompt="slow", seed=1, steps=150, width=256, height=256)

    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, max_queue=1) as server:
            first = asyncio.create_task(generate(server.port, slow, cancel_at_step=3))
            while not server.engine.active:
                await asyncio.sleep(0.001)
            busy = await generate(server.port, REQUESTS[0])
            return await first, busy

    first, (code, got, status) = asyncio.run(run())
    assert first[0] == grpc.StatusCode.CANCELLED
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and not got
    reasons = []
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reasons.append(info.reason)
    assert reasons == ["SERVER_BUSY"]
    assert "max_queue=1" in status.message


def test_previews_every_k_steps(tiny_store, tiny_model, alone) -> None:
    request = pb.GenerateRequest()
    request.CopyFrom(REQUESTS[0])
    request.preview_every = 2

    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}) as server:
            ok = await generate(server.port, request)
            request.preview_every = 5  # > steps
            bad = await generate(server.port, request)
            return ok, bad

    (code, got, _), (bad_code, _, bad_status) = asyncio.run(run())
    assert code == grpc.StatusCode.OK
    steps = [r.progress for r in got if r.WhichOneof("event") == "progress" and r.progress.stage == "denoise"]
    assert [s.step for s in steps if s.preview_png] == [2, 4]
    m = tiny_model.manifest.model
    latent = tiny_model.manifest.defaults["height"] // m["vae_scale_factor"]
    preview = np.asarray(Image.open(io.BytesIO(steps[-1].preview_png)))
    assert preview.shape == (latent, latent, 3) and preview.std() > 0
    assert pngs(got) == alone["r0"], "previews must not change the image"
    assert bad_code == grpc.StatusCode.INVALID_ARGUMENT and "preview_every=5" in bad_status.message


def test_img2img_and_inpainting_batch_with_text_to_image(tiny_store, tiny_model, alone) -> None:
    """Requests that start part-way through the schedule (img2img), blend after each step (inpainting) and
    text-to-image share UNet calls, and each still gives the PNG bytes it gives alone."""
    y, x = np.mgrid[0:64, 0:64]
    init = io.BytesIO()
    Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)).save(init, format="PNG")
    mask = io.BytesIO()
    Image.fromarray(((x < 32) * 255).astype(np.uint8)).save(mask, format="PNG")
    edits = [
        pb.GenerateRequest(model="tiny", prompt="recolour", seed=5, steps=6, strength=0.5,
                           init_image=init.getvalue(), request_id="i2i"),
        pb.GenerateRequest(model="tiny", prompt="fill", seed=6, steps=5, init_image=init.getvalue(),
                           mask_image=mask.getvalue(), mask_blur=2, sampler="euler_a", request_id="inpaint"),
    ]

    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, batching=False) as server:
            solo = {r.request_id: pngs((await generate(server.port, r))[1]) for r in edits}
        async with serving(tiny_store, {"tiny": tiny_model}, max_batch_size=16, max_wait_s=0.5) as server:
            results = await asyncio.gather(*(generate(server.port, r) for r in [*edits, REQUESTS[0]]))
            return solo, results, list(server.engine.batches)

    solo, results, batches = asyncio.run(run())
    for r, (code, got, _) in zip([*edits, REQUESTS[0]], results, strict=True):
        assert code == grpc.StatusCode.OK
        assert pngs(got) == (solo.get(r.request_id) or alone[r.request_id]), r.request_id
    assert len(batches[0].request_ids) == 3, batches  # all three in one UNet call


def test_requests_finishing_together_share_the_decoder(tiny_store, tiny_model) -> None:
    """Same steps: the three requests finish in the same turn and their images are decoded in one VAE call
    (tiny images are far under the pixel budget), each PNG still byte-identical to the request run alone; a
    pixel budget of one image decodes them one by one."""
    same = [pb.GenerateRequest(model="tiny", prompt=f"shape {i}", seed=10 + i, steps=3, request_id=f"s{i}",
                               num_images=1 + (i == 2)) for i in range(3)]

    async def run(**engine):  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, max_batch_size=16, max_wait_s=0.5, **engine) as server:
            results = await asyncio.gather(*(generate(server.port, r) for r in same))
            return [pngs(got) for _, got, _ in results], list(server.engine.decodes)

    async def alone():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, batching=False) as server:
            return [pngs((await generate(server.port, r))[1]) for r in same]

    solo = asyncio.run(alone())
    together, decodes = asyncio.run(run())
    assert together == solo
    assert sorted(decodes[0]) == ["s0", "s1", "s2"] and decodes[1] == ("s2",), decodes  # s2's second image next turn
    one_by_one, decodes = asyncio.run(run(decode_batch_pixels=64 * 64))
    assert one_by_one == solo and all(len(d) == 1 for d in decodes), decodes


def test_a_request_that_breaks_a_batched_call_fails_alone(tiny_store, tiny_model, alone, monkeypatch) -> None:
    """A UNet call that fails for one request is rerun request by request: only that one fails."""
    from runtime import engine as engine_module

    real = engine_module.unet_batch

    def breaks_on_bad(model, gens):  # type: ignore[no-untyped-def]
        if any(g.params.request_id == "bad" for g in gens):
            raise RuntimeError("this request breaks the UNet")
        return real(model, gens)

    monkeypatch.setattr(engine_module, "unet_batch", breaks_on_bad)
    bad = pb.GenerateRequest(model="tiny", prompt="bad", seed=9, steps=4, request_id="bad")

    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, max_batch_size=16, max_wait_s=0.5) as server:
            return await asyncio.gather(generate(server.port, REQUESTS[0]), generate(server.port, bad))

    good, failed = asyncio.run(run())
    assert good[0] == grpc.StatusCode.OK and pngs(good[1]) == alone["r0"]
    assert failed[0] == grpc.StatusCode.INTERNAL
