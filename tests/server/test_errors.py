"""Bad input -> INVALID_ARGUMENT with BadRequest naming field, value and range; NOT_FOUND; INTERNAL with a
request id; the server keeps serving after each."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import onnx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from onnx import TensorProto, helper

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime.client import channel
from tests.conftest import kiln, start_server


def call(target: str, request: pb.GenerateRequest) -> grpc.RpcError:
    with channel(target) as ch:
        try:
            list(pb_grpc.KilnStub(ch).Generate(request, timeout=60))
        except grpc.RpcError as e:
            return e
    raise AssertionError("the call succeeded")


def violations(error: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    out = {}
    for d in status.details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            out.update({v.field: v.description for v in br.field_violations})
    return out


def ok(target: str) -> None:
    with channel(target) as ch:
        events = list(pb_grpc.KilnStub(ch).Generate(pb.GenerateRequest(model="tiny", prompt="still here", steps=1),
                                                    timeout=60))
    assert events[-1].artifact.data[:8] == b"\x89PNG\r\n\x1a\n"


BAD = [
    ({"prompt": ""}, "prompt", "prompt must not be empty"),
    ({"prompt": "   "}, "prompt", "prompt must not be empty"),
    ({"prompt": "x" * 2001}, "prompt", "prompt has 2001 characters; at most 2000 are allowed"),
    ({"negative_prompt": "x" * 2001}, "negative_prompt", "at most 2000"),
    ({"width": 513}, "width", "width=513 must be a multiple of 8 between 64 and 1024"),
    ({"height": 56}, "height", "height=56 must be a multiple of 8 between 64 and 1024"),
    ({"width": 1032}, "width", "width=1032 must be a multiple of 8 between 64 and 1024"),
    ({"steps": 151}, "steps", "steps=151 must be between 1 and 150"),
    ({"guidance_scale": -1.0}, "guidance_scale", "guidance_scale=-1.0 must be between 0 and 30"),
    ({"guidance_scale": 31.0}, "guidance_scale", "guidance_scale=31.0 must be between 0 and 30"),
    ({"guidance_scale": float("nan")}, "guidance_scale", "guidance_scale=nan must be between 0 and 30"),
    ({"guidance_end": 1.5}, "guidance_end", "guidance_end=1.5 must be between 0 and 1"),
    ({"guidance_end": -0.25}, "guidance_end", "guidance_end=-0.25 must be between 0 and 1"),
    ({"guidance_end": float("nan")}, "guidance_end", "guidance_end=nan must be between 0 and 1"),
    ({"sampler": "ddim2"}, "sampler", "sampler='ddim2' is not one of: ddim, dpmpp_2m, dpmpp_2m_karras, euler, euler_a, lcm, turbo"),
    ({"num_images": 5}, "num_images", "num_images=5 must be between 1 and 4"),
    ({"sampler": "turbo", "steps": 5}, "steps", "steps=5 must be between 1 and 4 for sampler 'turbo'"),
    ({"steps": 4, "preview_every": 5}, "preview_every", "preview_every=5 must be between 0 (off) and steps=4"),
    ({"request_id": "has spaces"}, "request_id", "request_id must be 1-128 characters"),
]


@pytest.mark.parametrize(("fields", "field", "message"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_invalid_field_names_value_and_range(server, fields, field, message) -> None:  # type: ignore[no-untyped-def]
    request = pb.GenerateRequest(model="tiny", **{"prompt": "fine", **fields})
    e = call(server.target, request)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    v = violations(e)
    assert list(v) == [field] and message in v[field]


def test_all_violations_are_reported_at_once_and_server_keeps_serving(server) -> None:
    e = call(server.target, pb.GenerateRequest(model="tiny", prompt="", width=7, steps=0, sampler="x", num_images=9))
    assert set(violations(e)) == {"prompt", "width", "sampler", "num_images"}
    ok(server.target)


def test_missing_and_unknown_model(server) -> None:
    e = call(server.target, pb.GenerateRequest(prompt="x"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "available: tiny" in violations(e)["model"]
    e = call(server.target, pb.GenerateRequest(model="sdxl", prompt="x"))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "'sdxl' is not served here; available: tiny" in e.details()
    ok(server.target)


def test_cli_prints_status_and_details_and_exits_nonzero(server, tmp_path: Path) -> None:
    r = kiln("generate", "--target", server.target, "--model", "tiny", "--prompt", "x", "--width", "100",
             "--sampler", "nope", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 1
    assert r.stderr.startswith("INVALID_ARGUMENT: ")
    assert "  width: width=100 must be a multiple of 8 between 64 and 1024" in r.stderr
    assert "  sampler: sampler='nope' is not one of" in r.stderr
    assert not (tmp_path / "x.png").exists()


def _broken_decoder_store(tiny_bundle: Path, root: Path) -> Path:
    """The tiny bundle with a VAE decoder that only handles 8x8 latents: a real ONNX Runtime failure for others."""
    from model_store import Manifest, Store

    store = Store(root)
    staging = store.staging_dir("tiny")
    shutil.rmtree(staging)
    shutil.copytree(tiny_bundle, staging)
    x = helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["b", 4, "h", "w"])
    y = helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", 3, "H", "W"])
    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [1, 4, 8, 8])
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 8, 8])
    starts, ends, axes = (helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in
                          (("starts", 0), ("ends", 3), ("axes", 1)))
    graph = helper.make_graph([
        helper.make_node("Reshape", ["latent_sample", "shape"], ["r"]),
        helper.make_node("Slice", ["r", "starts", "ends", "axes"], ["s"]),
        helper.make_node("Resize", ["s", "", "scales"], ["sample"], mode="nearest"),
    ], "broken", [x], [y], [shape, scales, starts, ends, axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), staging / "vae_decoder.onnx")
    manifest = Manifest.read(staging)
    manifest.version += "-broken"
    (staging / "manifest.json").unlink()
    store.publish(staging, manifest)
    return root


def test_internal_error_has_request_id_in_status_and_log(tiny_bundle: Path, tmp_path: Path) -> None:
    store = _broken_decoder_store(tiny_bundle, tmp_path / "store")
    server = start_server(store, tmp_path / "serve.log")
    try:
        ok(server.target)  # 64x64 -> 8x8 latents: the decoder copes
        e = call(server.target, pb.GenerateRequest(model="tiny", prompt="x", width=128, steps=1))
        assert e.code() == grpc.StatusCode.INTERNAL
        rid = e.details().rsplit("request id ", 1)[1]
        assert len(rid) == 32
        log = server.wait_for_log(f"request {rid} /kiln.v1.Kiln/Generate: internal error")
        assert "Traceback" in log and "Reshape" in log
        assert dict(e.trailing_metadata())["x-request-id"] == rid
        ok(server.target)  # and it keeps serving
    finally:
        assert server.stop() == 0
