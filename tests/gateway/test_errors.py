"""gRPC status -> HTTP status through a real gateway: a busy server is 503 with Retry-After, an unreachable one
503, and every gRPC code the server can send has its HTTP status and JSON body."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from gateway.errors import from_rpc_error
from tests.conftest import free_port, start_server
from tests.gateway.conftest import start_gateway
from tests.gateway.test_a1111 import SLOW


def _rpc_error(code: grpc.StatusCode, message: str, *details) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for d in details:
        status.details.add().Pack(d)
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()), ("x-request-id", "r1"))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=message)


@pytest.mark.parametrize("code,status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 422), (grpc.StatusCode.NOT_FOUND, 404), (grpc.StatusCode.UNAUTHENTICATED, 401),
    (grpc.StatusCode.PERMISSION_DENIED, 403), (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (grpc.StatusCode.UNAVAILABLE, 503), (grpc.StatusCode.FAILED_PRECONDITION, 409), (grpc.StatusCode.ABORTED, 409),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504), (grpc.StatusCode.INTERNAL, 502), (grpc.StatusCode.UNKNOWN, 502)])
def test_status_table(code: grpc.StatusCode, status: int) -> None:
    e = from_rpc_error(_rpc_error(code, "why"))
    assert e.status == status and e.code == code.name and e.headers["x-request-id"] == "r1"
    assert ("Retry-After" in e.headers) is (status in (429, 503))


def test_details_travel_and_busy_is_503() -> None:
    delay = duration_pb2.Duration(seconds=7, nanos=200_000_000)
    quota = _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "credits",
                       error_details_pb2.ErrorInfo(reason="CREDITS_EXHAUSTED", domain="kiln"),
                       error_details_pb2.RetryInfo(retry_delay=delay))
    e = from_rpc_error(quota)
    assert (e.status, e.headers["Retry-After"], e.reason) == (429, "8", "CREDITS_EXHAUSTED")
    assert e.openai_body()["error"]["type"] == "insufficient_quota"
    busy = from_rpc_error(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy",
                                     error_details_pb2.ErrorInfo(reason="SERVER_BUSY", domain="kiln")))
    assert busy.status == 503 and busy.headers["Retry-After"] == "1"
    bad = from_rpc_error(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "w", error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field="loras[1].scale", description="x")])))
    renamed = bad.renamed({"loras": "adapters"})
    assert renamed.field == "adapters[1].scale" and renamed.body()["detail"][0]["loc"] == ["body", "adapters", 1, "scale"]
    assert renamed.details[0]["fieldViolations"][0]["field"] == "adapters[1].scale"


def test_busy_server_is_503_with_retry_after(tiny_store: Path, tmp_path: Path) -> None:
    server = start_server(tiny_store, tmp_path / "serve.log", "--max-queue", "1")
    gateway = start_gateway(server.target, tmp_path / "gateway.log")
    try:
        slow: dict[str, httpx.Response] = {}
        httpx.get(f"{gateway.url}/sdapi/v1/progress")  # watching: the gateway asks for step events
        t = threading.Thread(target=lambda: slow.setdefault("r", httpx.post(
            f"{gateway.url}/sdapi/v1/txt2img", json=SLOW, timeout=300)))
        t.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{gateway.url}/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"] == "RESOURCE_EXHAUSTED" and "busy" in r.json()["message"]
        httpx.post(f"{gateway.url}/sdapi/v1/interrupt")
        t.join(60)
        assert slow["r"].status_code == 200
        for _ in range(10):  # the cancelled request leaves the engine at its next step: retry as told
            r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}, timeout=60)
            if r.status_code != 503:
                break
            time.sleep(float(r.headers["retry-after"]) / 4)
        assert r.status_code == 200, r.text  # and it keeps serving
    finally:
        gateway.stop()
        server.stop()


def test_unreachable_server_is_503(tmp_path: Path) -> None:
    from gateway.config import GatewayConfig
    from gateway.server import GatewayServer

    async def run() -> tuple[int, dict, int]:
        server = GatewayServer(GatewayConfig(target=f"127.0.0.1:{free_port()}", port=0, timeout_s=5))
        port = await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                r = await client.post("/sdapi/v1/txt2img", json={"prompt": "x"})
                health = await client.get("/healthz")
                return r.status_code, r.json(), health.status_code
        finally:
            await server.stop()

    status, body, health = asyncio.run(run())
    assert status == 503 and body["error"] == "UNAVAILABLE" and "unreachable" in body["message"]
    assert health == 503
