"""SDXL on a real gRPC server: step-level batching with each row's own added conditioning (pooled text
embeddings, size conditioning) gives the same PNG bytes as each request alone; ListModels tells the design;
size_conditioning is validated."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime.model import LoadedModel
from tests.server.test_batching import generate, pngs, run_alone, serving

SC = pb.SizeConditioning
# one latent size (so they share UNet calls), each with other size conditioning, guidance and negative prompt
SAME_SIZE = [
    pb.GenerateRequest(model="tiny-sdxl", prompt="a red circle", seed=1, steps=4, sampler="euler", request_id="s0"),
    pb.GenerateRequest(model="tiny-sdxl", prompt="a red circle", seed=1, steps=4, sampler="euler", request_id="s1",
                       size_conditioning=SC(original_width=1024, original_height=768, crop_top=32, crop_left=16)),
    pb.GenerateRequest(model="tiny-sdxl", prompt="a blue square", negative_prompt="blurry", seed=2, steps=3,
                       guidance_scale=4.0, sampler="euler_a", num_images=2, request_id="s2", preview_every=1,
                       size_conditioning=SC(target_width=512, target_height=512)),
    pb.GenerateRequest(model="tiny-sdxl", prompt="turbo", seed=3, steps=1, guidance_scale=0.0, sampler="turbo",
                       request_id="s3"),
]
OTHER_SIZE = pb.GenerateRequest(model="tiny-sdxl", prompt="a red circle", seed=1, steps=4, sampler="euler",
                                width=80, height=64, request_id="wide")
REQUESTS = [*SAME_SIZE, OTHER_SIZE]


@pytest.fixture(scope="module")
def alone(tiny_sdxl_store: Path, tiny_sdxl_model: LoadedModel) -> dict[str, list[bytes]]:
    return run_alone(tiny_sdxl_store, {"tiny-sdxl": tiny_sdxl_model}, REQUESTS)


def test_size_conditioning_changes_the_image(alone) -> None:  # type: ignore[no-untyped-def]
    assert alone["s0"] != alone["s1"]  # same prompt and seed, other size conditioning


def test_batched_sdxl_requests_equal_alone(tiny_sdxl_store, tiny_sdxl_model, alone) -> None:  # type: ignore[no-untyped-def]
    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_sdxl_store, {"tiny-sdxl": tiny_sdxl_model}, max_batch_size=16,
                           max_wait_s=0.5) as server:
            results = await asyncio.gather(*(generate(server.port, r) for r in REQUESTS))
            return results, list(server.engine.batches)

    results, batches = asyncio.run(run())
    for r, (code, got, _) in zip(REQUESTS, results, strict=True):
        assert code == grpc.StatusCode.OK
        assert pngs(got) == alone[r.request_id], f"{r.request_id}: batched PNG bytes differ from alone"
        previews = [e.progress.preview_png for e in got if e.WhichOneof("event") == "progress" and e.progress.preview_png]
        assert len(previews) == (3 if r.preview_every else 0)  # latent previews through the fitted SDXL map
    first = next(b for b in batches if "s0" in b.request_ids)
    assert set(first.request_ids) == {"s0", "s1", "s2", "s3"}  # the 80x64 request runs in its own calls
    assert first.rows == 2 + 2 + 4 + 1
    assert all("wide" not in b.request_ids or b.request_ids == ("wide",) for b in batches)


def test_list_models_and_size_conditioning_errors(tiny_sdxl_store, tiny_sdxl_model, tiny_model) -> None:  # type: ignore[no-untyped-def]
    async def run():  # type: ignore[no-untyped-def]
        models = {"tiny-sdxl": tiny_sdxl_model, "tiny": tiny_model}
        async with serving(tiny_sdxl_store, models) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                listed = await pb_grpc.KilnStub(ch).ListModels(pb.ListModelsRequest(), timeout=30)
            bad = await generate(server.port, pb.GenerateRequest(
                model="tiny-sdxl", prompt="x", steps=2, size_conditioning=SC(original_width=5000, crop_top=9999)))
            not_sdxl = await generate(server.port, pb.GenerateRequest(
                model="tiny", prompt="x", steps=2, size_conditioning=SC(original_width=512)))
            return listed, bad, not_sdxl

    listed, bad, not_sdxl = asyncio.run(run())
    by_name = {m.name: m for m in listed.models}
    assert by_name["tiny-sdxl"].architecture == "sdxl" and by_name["tiny"].architecture == "sd"
    assert by_name["tiny-sdxl"].precision["text_encoder_2"] == "fp32"
    from google.rpc import error_details_pb2

    for (code, _, status), fields in ((bad, {"size_conditioning.original_width": "between 8 and 4096",
                                             "size_conditioning.crop_top": "between 0 and 4096"}),
                                      (not_sdxl, {"size_conditioning": "only to SDXL models"})):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        req = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(req)
        got = {v.field: v.description for v in req.field_violations}
        assert set(got) == set(fields), got
        for f, text in fields.items():
            assert text in got[f]
