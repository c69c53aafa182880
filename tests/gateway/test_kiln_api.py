"""Kiln's own HTTP surface: `POST /v1/generate` streaming Server-Sent Events that mirror the gRPC stream (same
events, same PNG bytes), `GET /v1/models`, and `kiln serve --gateway-port` running the gateway beside the server."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
from PIL import Image

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from tests.conftest import ROOT, free_port
from tests.gateway.conftest import GatewayProcess, start_gateway, wait_http

REQUEST = {"model": "tiny", "prompt": "a red circle", "seed": 9, "steps": 3, "num_images": 2, "preview_every": 1}


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    out, event = [], ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[6:])))
    return out


def test_generate_streams_the_grpc_events(gateway: GatewayProcess, server) -> None:
    with httpx.stream("POST", f"{gateway.url}/v1/generate", json={**REQUEST, "unknownField": 1}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    with grpc.insecure_channel(server.target) as ch:
        grpc_events = list(pb_grpc.KilnStub(ch).Generate(pb.GenerateRequest(**REQUEST), timeout=120))
    assert [e for e, _ in events] == [e.WhichOneof("event") for e in grpc_events] + ["done"]
    started = events[0][1]["started"]
    assert (started["seed"], started["steps"], started["num_images"], started["mode"]) == (9, 3, 2, "text_to_image")
    previews = [d["progress"]["preview_png"] for e, d in events if e == "progress" and d["progress"]["preview_png"]]
    assert len(previews) == 3 and Image.open(io.BytesIO(base64.b64decode(previews[0]))).size == (8, 8)
    artifacts = [d["artifact"] for e, d in events if e == "artifact"]
    assert [a["index"] for a in artifacts] == [0, 1] and [a["seed"] for a in artifacts] == [9, 10]
    want = [e.artifact.data for e in grpc_events if e.WhichOneof("event") == "artifact"]
    assert [base64.b64decode(a["data"]) for a in artifacts] == want  # the same PNG bytes as over gRPC
    assert "x-request-id" in events[-1][1]["metadata"]


def test_generate_img2img_with_a_data_url(gateway: GatewayProcess) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 200, 0)).save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with httpx.stream("POST", f"{gateway.url}/v1/generate", json={"model": "tiny", "prompt": "x", "steps": 2,
                                                                 "init_image": data_url, "strength": 0.5},
                      timeout=120) as r:
        events = sse_events(r)
    assert events[0][1]["started"]["mode"] == "img2img" and events[0][1]["started"]["denoising_steps"] == 1
    assert events[-1][0] == "done"


def test_generate_refusals_are_http_errors_naming_the_field(gateway: GatewayProcess) -> None:
    r = httpx.post(f"{gateway.url}/v1/generate", json={"model": "tiny", "prompt": "x", "width": 13})
    assert r.status_code == 422 and r.json()["field"] == "width" and r.headers["content-type"] == "application/json"
    r = httpx.post(f"{gateway.url}/v1/generate", json={"model": "tiny", "prompt": "x", "steps": "many"})
    assert r.status_code == 422 and r.json()["field"] == "steps"
    r = httpx.post(f"{gateway.url}/v1/generate", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"] == "NOT_FOUND" and "tiny" in r.json()["message"]
    r = httpx.post(f"{gateway.url}/v1/generate", json=[1, 2])
    assert r.status_code == 422 and r.json()["field"] == "body"
    r = httpx.post(f"{gateway.url}/v1/generate", json={"model": "tiny", "prompt": "x", "init_image": "&&&"})
    assert r.status_code == 422 and r.json()["field"] == "init_image"


def test_models_lists_kiln_and_openai_shapes(gateway: GatewayProcess) -> None:
    body = httpx.get(f"{gateway.url}/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == "tiny" and body["data"][0]["object"] == "model"
    model = body["models"][0]
    assert model["name"] == "tiny" and model["limits"]["max_size"] >= 64 and "euler" in model["samplers"]


def test_serve_with_gateway_port(tiny_store: Path, tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--store", str(tiny_store), "--port",
                                 str(port), "--gateway-port", str(http), "--preview-every", "0", "--preload", "none"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{http}"
        wait_http(url, proc, log)
        # the model is not loaded yet: the stream says so before Started
        with httpx.stream("POST", f"{url}/v1/generate", json={**REQUEST, "num_images": 1}, timeout=120) as r:
            events = sse_events(r)
        kinds = [e for e, _ in events]
        first = kinds.index("started")
        assert first >= 1 and {d["progress"]["stage"] for _, d in events[:first]} == {"loading"}
        assert kinds[-2:] == ["artifact", "done"]
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": 4}, timeout=120)
        assert r.status_code == 200 and json.loads(r.json()["info"])["all_seeds"] == [4]
        assert f"-> gRPC 127.0.0.1:{port}" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    assert "stopped" in log.read_text()


def test_gateway_on_the_network_needs_accounts_or_insecure_open(server, tiny_store: Path, tmp_path: Path) -> None:
    """As `kiln serve` refuses a non-loopback --host without --auth-db, the gateway refuses one in front of a
    server without accounts (it would hand out free generations), unless --insecure-open."""
    port = str(free_port())
    out = subprocess.run([sys.executable, "-m", "cli.main", "gateway", "--target", server.target, "--host", "0.0.0.0",
                          "--port", port], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "serves without accounts" in out.stderr and "--insecure-open" in out.stderr
    out = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--store", str(tiny_store), "--port",
                          str(free_port()), "--gateway-port", port, "--gateway-host", "0.0.0.0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "serves without accounts" in out.stderr, out.stderr[-2000:]
    g = start_gateway(server.target, tmp_path / "open.log", "--host", "0.0.0.0", "--insecure-open")
    g.stop()
