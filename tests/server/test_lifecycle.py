"""Cancellation, deadlines and graceful SIGTERM on a real server process."""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime.client import channel
from tests.conftest import start_server

# 512x512 on the tiny model: slow enough per step (4096-token attention) to observe, 150 steps in all
SLOW = {"model": "tiny", "prompt": "slow", "width": 512, "height": 512, "steps": 150, "sampler": "euler"}


def outcome(server, rid: str) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    log = server.wait_for_log(f"request {rid} ", timeout=60)
    m = re.search(rf"request {rid} (\w+) after (\d+)/150 steps", log)
    assert m, log
    return m.group(1), int(m.group(2))


def test_client_cancel_stops_denoising_before_the_next_step(server) -> None:
    with channel(server.target) as ch:
        call = pb_grpc.KilnStub(ch).Generate(pb.GenerateRequest(**SLOW, request_id="cancel-me"), timeout=120)
        for event in call:
            if event.WhichOneof("event") == "progress" and event.progress.step >= 2:
                call.cancel()
                break
    status, steps = outcome(server, "cancel-me")
    assert status == "cancelled" and 2 <= steps < 20


def test_deadline_stops_denoising(server) -> None:
    with channel(server.target) as ch, pytest.raises(grpc.RpcError) as e:
        list(pb_grpc.KilnStub(ch).Generate(pb.GenerateRequest(**SLOW, request_id="deadline"), timeout=1.5))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    status, steps = outcome(server, "deadline")
    assert status == "cancelled" and steps < 150


def test_sigterm_goes_not_serving_finishes_in_flight_and_exits_zero(tiny_store: Path, tmp_path: Path) -> None:
    server = start_server(tiny_store, tmp_path / "serve.log")
    request = pb.GenerateRequest(**{**SLOW, "steps": 12}, request_id="in-flight")
    events: list[pb.GenerateResponse] = []
    first_step = threading.Event()

    def client() -> None:
        with channel(server.target) as ch:
            for event in pb_grpc.KilnStub(ch).Generate(request, timeout=120):
                events.append(event)
                if event.WhichOneof("event") == "progress" and event.progress.step == 1:
                    first_step.set()

    t = threading.Thread(target=client)
    t.start()
    assert first_step.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for_log("shutting down")
    with channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            list(pb_grpc.KilnStub(ch).Generate(pb.GenerateRequest(model="tiny", prompt="late"), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    t.join(120)
    assert events[-1].WhichOneof("event") == "artifact"  # the in-flight request finished
    assert server.proc.wait(60) == 0
    assert "request in-flight finished after 12/12 steps" in server.log()


def test_lame_duck_takes_new_calls_while_not_serving_then_refuses(tiny_store: Path, tmp_path: Path) -> None:
    """`--lame-duck`: after SIGTERM health is NOT_SERVING at once (a balancer stops routing), but calls that still
    arrive are served until the period ends; then they are refused UNAVAILABLE."""
    server = start_server(tiny_store, tmp_path / "serve.log", "--lame-duck", "4")
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for_log("shutting down")
    with channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        late = list(pb_grpc.KilnStub(ch).Generate(pb.GenerateRequest(model="tiny", prompt="late", steps=2), timeout=10))
        assert late[-1].WhichOneof("event") == "artifact"
    server.wait_for_log("lame-duck period over")
    with channel(server.target) as ch, pytest.raises(grpc.RpcError) as refused:
        list(pb_grpc.KilnStub(ch).Generate(pb.GenerateRequest(model="tiny", prompt="later"), timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.proc.wait(60) == 0
