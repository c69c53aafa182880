"""`--log-format json`: every line a server (and a gateway) writes is one JSON object, and each request gets one
access line with its fields — request id, key id (never the secret), model, version, mode, size, steps,
sampler, status, stage timings."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import grpc
import httpx

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from tests.gateway.conftest import start_gateway
from tests.server.test_quotas import _create_key, _serve, _tiers


def _lines(path: Path) -> list[dict]:
    text = path.read_text()
    out = []
    for line in text.splitlines():
        assert line.startswith("{"), f"not a JSON line: {line!r}"
        out.append(json.loads(line))
    return out


def test_json_logs_and_one_access_line_per_request(tiny_store: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'auth.db'}"
    tiers = _tiers(tmp_path / "tiers.toml")
    key = _create_key(db, tiers)
    server = _serve(tiny_store, tmp_path / "serve.log", db, tiers, "--log-format", "json")
    gateway = start_gateway(server.target, tmp_path / "gateway.log", "--log-format", "json")
    try:
        request = pb.GenerateRequest(model="tiny", prompt="a red circle", steps=3, seed=4, request_id="log-me-1",
                                     sampler="euler", width=72)
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.KilnStub(ch)
            list(stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=60))
            with contextlib.suppress(grpc.RpcError):  # refused: its access line is what counts
                list(stub.Generate(pb.GenerateRequest(model="tiny", prompt="x", width=13, request_id="log-me-2"),
                                   metadata=(("authorization", f"Bearer {key}"),), timeout=60))
        r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2},
                       headers={"Authorization": f"Bearer {key}", "X-Request-Id": "via-http-1"}, timeout=60)
        assert r.status_code == 200
        server.wait_for_log("via-http-1")
    finally:
        gateway.stop()
        server.stop()
    lines = _lines(tmp_path / "serve.log")
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    access = {line["request_id"]: line for line in lines if line["logger"] == "kiln.access"}
    ok = access["log-me-1"]
    assert (ok["method"], ok["status"], ok["model"], ok["mode"], ok["width"], ok["height"], ok["steps"],
            ok["sampler"], ok["images"], ok["cost"]) == ("Generate", "OK", "tiny", "text_to_image", 72, 64, 3, "euler",
                                                         1, 1)
    assert ok["key_id"] == key.split("_")[1] and ok["version"] and ok["seconds"] > 0
    assert {"text_encode", "denoise", "decode", "png"} <= set(ok["stages"])
    bad = access["log-me-2"]
    assert (bad["status"], bad["reason"]) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
    assert access["via-http-1"]["status"] == "OK"  # the gateway's X-Request-Id reached the server's log
    secret = key.split("_", 2)[2]
    assert secret not in (tmp_path / "serve.log").read_text()
    _lines(tmp_path / "gateway.log")  # the gateway's lines are JSON too
