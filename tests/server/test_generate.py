"""A real `kiln serve` on loopback, driven by the real `kiln generate` CLI and by a gRPC client."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import grpc
from PIL import Image

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime.client import channel
from tests.conftest import kiln


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_same_seed_gives_identical_png_and_other_seed_differs(server, tmp_path: Path) -> None:
    outs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        r = kiln("generate", "--target", server.target, "--model", "tiny", "--prompt", "a red circle",
                 "--seed", str(seed), "--out", str(tmp_path / f"{name}.png"))
        assert r.returncode == 0, r.stderr
        assert f"seed {seed}" in r.stdout
        outs[name] = sha(tmp_path / f"{name}.png")
    assert outs["a"] == outs["b"] != outs["c"]
    # the progress bar was drawn from the stream
    assert "denoise" in r.stderr and "20/20" in r.stderr


def test_cli_writes_numbered_files_for_several_images(server, tmp_path: Path) -> None:
    r = kiln("generate", "--target", server.target, "--model", "tiny", "--prompt", "two of them", "--seed", "3",
             "--num-images", "2", "--steps", "3", "--out", str(tmp_path / "img.png"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png", "img-2.png"]
    texts = [Image.open(tmp_path / n).text["parameters"] for n in ("img-1.png", "img-2.png")]
    assert "Seed: 3," in texts[0] and "Seed: 4," in texts[1]


def test_stream_events_and_artifact_fields(server) -> None:
    request = pb.GenerateRequest(model="tiny", prompt="a blue square", width=72, height=64, steps=5, seed=42,
                                 sampler="euler_a", guidance_scale=5.0, request_id="client-id-1")
    with channel(server.target) as ch:
        call = pb_grpc.KilnStub(ch).Generate(request, timeout=60)
        events = list(call)
        trailing = dict(call.trailing_metadata())
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["started"] + ["progress"] * 6 + ["artifact"]
    assert all(e.request_id == "client-id-1" for e in events)
    s = events[0].started
    assert (s.width, s.height, s.steps, s.seed, s.sampler, s.num_images) == (72, 64, 5, 42, "euler_a", 1)
    assert s.guidance_scale == 5.0 and s.model == "tiny" and s.model_version
    steps = [(e.progress.stage, e.progress.step) for e in events[1:-1]]
    assert steps == [("text_encode", 0)] + [("denoise", i) for i in range(1, 6)]
    elapsed = [e.progress.elapsed_s for e in events[1:-1]]
    assert elapsed == sorted(elapsed)
    a = events[-1].artifact
    assert a.mime == "image/png" and a.seed == 42 and a.finish_reason == pb.FINISH_REASON_SUCCESS
    assert [t.stage for t in a.timings] == ["validate", "tokenize", "text_encode", "prepare", "denoise", "decode",
                                            "png"]
    assert all(t.seconds > 0 for t in a.timings)
    img = Image.open(io.BytesIO(a.data))
    assert img.size == (72, 64) and "Seed: 42" in img.text["parameters"]
    assert trailing["x-request-id"] == "client-id-1"


def test_omit_progress_sends_only_previews_and_artifacts(server) -> None:
    """omit_progress drops the Progress events without a preview; the images are the same bytes."""
    base = {"model": "tiny", "prompt": "a blue square", "steps": 6, "seed": 5, "num_images": 2}
    with channel(server.target) as ch:
        stub = pb_grpc.KilnStub(ch)
        full = list(stub.Generate(pb.GenerateRequest(**base), timeout=60))
        quiet = list(stub.Generate(pb.GenerateRequest(**base, omit_progress=True), timeout=60))
        previews = list(stub.Generate(pb.GenerateRequest(**base, omit_progress=True, preview_every=2), timeout=60))
    assert [e.WhichOneof("event") for e in quiet] == ["started", "artifact", "artifact"]
    assert [e.artifact.data for e in quiet[1:]] == [e.artifact.data for e in full if e.HasField("artifact")]
    assert [(e.progress.step, bool(e.progress.preview_png)) for e in previews if e.HasField("progress")] == [
        (2, True), (4, True), (6, True)]


def test_unset_seed_is_random_and_reported(server) -> None:
    request = pb.GenerateRequest(model="tiny", prompt="anything", steps=1)
    with channel(server.target) as ch:
        stub = pb_grpc.KilnStub(ch)
        seeds = []
        for _ in range(2):
            events = list(stub.Generate(request, timeout=60))
            assert events[0].started.seed == events[-1].artifact.seed
            assert f"Seed: {events[-1].artifact.seed}," in Image.open(io.BytesIO(events[-1].artifact.data)).text[
                "parameters"]
            seeds.append(events[-1].artifact.seed)
    assert seeds[0] != seeds[1]


def test_long_prompt_truncation_is_reported(server, tmp_path: Path) -> None:
    prompt = "cat " * 75 + "on a red mat"
    with channel(server.target) as ch:
        events = list(pb_grpc.KilnStub(ch).Generate(
            pb.GenerateRequest(model="tiny", prompt=prompt, negative_prompt="ugly", steps=1), timeout=60))
    (t,) = events[0].started.truncations
    assert (t.field, t.kept_tokens, t.dropped_tokens, t.dropped_text) == ("prompt", 75, 4, "on a red mat")
    r = kiln("generate", "--target", server.target, "--model", "tiny", "--prompt", prompt, "--steps", "1",
             "--out", str(tmp_path / "t.png"), "--quiet")
    assert r.returncode == 0 and "dropped 4 tokens: 'on a red mat'" in r.stderr


def test_list_models(server) -> None:
    with channel(server.target) as ch:
        (m,) = pb_grpc.KilnStub(ch).ListModels(pb.ListModelsRequest(), timeout=10).models
    assert m.name == "tiny" and m.version
    assert dict(m.precision) == {"text_encoder": "fp32", "unet": "fp32", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    assert (m.default_width, m.default_height, m.default_steps, m.default_sampler) == (64, 64, 20, "dpmpp_2m_karras")
    assert (m.limits.min_size, m.limits.max_size, m.limits.max_steps, m.limits.max_images) == (64, 1024, 150, 4)
    assert list(m.samplers) == ["ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "lcm", "turbo"]
    r = kiln("models", "list", "--target", server.target)
    assert r.returncode == 0 and r.stdout.startswith("tiny\t")


def test_health_and_reflection(server) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "kiln.v1.Kiln"):
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        # what a reflection-only client (grpcurl list / describe) sees
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"kiln.v1.Kiln", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(db)
        svc = pool.FindServiceByName("kiln.v1.Kiln")
        assert {m.name for m in svc.methods} == {"Generate", "ListModels", "GetBalance", "GrantCredits", "CreateKey",
                                                 "RevokeKey", "LoadModel", "UnloadModel"}
        gen = svc.methods_by_name["Generate"]
        assert gen.server_streaming and gen.input_type.full_name == "kiln.v1.GenerateRequest"
        assert "prompt" in gen.input_type.fields_by_name


def test_message_size_limits_are_explicit(server) -> None:
    huge = pb.GenerateRequest(model="tiny", prompt="x", negative_prompt="y" * (17 << 20))
    # a client that would send it: the server's own 16 MiB receive limit must refuse it
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        try:
            list(pb_grpc.KilnStub(ch).Generate(huge, timeout=30))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        else:
            raise AssertionError("a 17 MiB request was accepted")


def test_cli_saves_previews_beside_the_image(server, tmp_path: Path) -> None:
    out = tmp_path / "img.png"
    r = kiln("generate", "--target", server.target, "--model", "tiny", "--prompt", "a red circle", "--seed", "1",
             "--steps", "4", "--preview-every", "2", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "img.preview-step002.png",
                                                           "img.preview-step004.png"]
