"""Previews on demand: AUTOMATIC1111 routes ask the server for previews only for a client that polls
`/sdapi/v1/progress` for images (each costs the server a latent decode and a PNG per step; the gateway benchmark
measured it), so an API client that never looks pays nothing for them."""

from __future__ import annotations

import base64
import threading
import time
import uuid

import httpx

from gateway.jobs import Jobs
from tests.gateway.conftest import GatewayProcess

STEPS = 100  # long enough (a few hundred ms on the tiny model) to poll progress many times during one generation


def generate_while_polling(url: str, headers: dict[str, str]) -> list[bool]:
    """One txt2img in a thread; once it is sampling (polled without images, which does not count as watching),
    polls with images until it ends. Whether each of those polls carried a preview."""
    result: dict[str, httpx.Response] = {}
    # a poll without images before the request: the client watches progress (step events), not previews yet
    httpx.get(f"{url}/sdapi/v1/progress", params={"skip_current_image": True}, headers=headers)
    worker = threading.Thread(target=lambda: result.update(r=httpx.post(
        f"{url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": STEPS, "seed": 3}, headers=headers,
        timeout=120)))
    worker.start()
    seen: list[bool] = []
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        while worker.is_alive():
            state = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["state"]
            if state["sampling_step"] >= 1:
                break
            time.sleep(0.002)
        while worker.is_alive():
            progress = client.get("/sdapi/v1/progress").json()
            if progress["state"]["job_count"]:
                image = progress["current_image"]
                seen.append(bool(image) and base64.b64decode(image).startswith(b"\x89PNG"))
            time.sleep(0.005)
    worker.join()
    assert result["r"].status_code == 200, result["r"].text[:500]
    return seen


def test_previews_start_once_a_client_watches_and_only_for_it(gateway: GatewayProcess) -> None:
    watcher = {"Authorization": f"Bearer previews-{uuid.uuid4().hex}"}  # a client no other test has polled for
    first = generate_while_polling(gateway.url, watcher)
    assert first and not any(first), "previews were asked for before the client ever watched"
    second = generate_while_polling(gateway.url, watcher)
    assert any(second), f"no preview in {len(second)} polls after the client watched"
    other = {"Authorization": f"Bearer previews-{uuid.uuid4().hex}"}
    assert not any(generate_while_polling(gateway.url, other)), "another client's watching turned previews on"


def test_watching_lasts_its_window() -> None:
    jobs = Jobs()
    assert not jobs.watched("a", 60) and jobs.watched("a", 0)  # 0: previews for every request
    jobs.watch("a")
    assert jobs.watched("a", 60) and not jobs.watched("b", 60)
    time.sleep(0.02)
    assert not jobs.watched("a", 0.01)


def test_step_events_only_for_clients_that_poll_progress() -> None:
    """What the gateway asks the server for, by what the client watched: nothing (omit_progress), step events,
    or step events with previews."""
    from gateway.config import GatewayConfig
    from gateway.context import Gateway
    from gateway.upstream import Upstream
    from proto.kiln.v1 import kiln_pb2 as pb

    gw = Gateway(GatewayConfig(preview_every=2), Upstream.__new__(Upstream))

    def asked(client: str) -> tuple[bool, int]:
        request = pb.GenerateRequest(model="m", prompt="p", steps=5)
        gw.progress_for(client, request)
        return request.omit_progress, request.preview_every

    assert asked("a") == (True, 0)
    gw.jobs.watch("a", images=False)
    assert asked("a") == (False, 0) and asked("b") == (True, 0)
    gw.jobs.watch("a")
    assert asked("a") == (False, 2)
    always = Gateway(GatewayConfig(preview_watch_s=0, preview_every=8), Upstream.__new__(Upstream))
    request = pb.GenerateRequest(model="m", prompt="p", steps=5)
    always.progress_for("c", request)
    assert (request.omit_progress, request.preview_every) == (False, 5)  # within the request's steps
