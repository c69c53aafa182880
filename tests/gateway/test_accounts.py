"""Keys, credits and rates through the gateway: the key an HTTP client carries reaches the gRPC server, so the
same accounts apply; gRPC refusals become 401 / 403 / 429 (with Retry-After) and the credit figures headers."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.gateway.conftest import GatewayProcess, start_gateway
from tests.server.test_quotas import _create_key, _serve, _tiers

BODY = {"prompt": "a red circle", "steps": 2, "seed": 1, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def accounts(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str, Path]]:
    work = tmp_path_factory.mktemp("gateway-accounts")
    store = work / "store"  # two models (the tiny bundle under a second name) for the per-client model choice
    shutil.copytree(tiny_store / "tiny", store / "tiny")
    shutil.copytree(tiny_store / "tiny", store / "tiny-b")
    for manifest in (store / "tiny-b").glob("*/manifest.json"):
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "name": "tiny-b"}))
    db = f"sqlite:///{work / 'auth.db'}"
    tiers = _tiers(work / "tiers.toml", credits=3)
    server = _serve(store, work / "serve.log", db, tiers)
    yield server, db, tiers
    server.stop()


@pytest.fixture(scope="module")
def account_gateway(accounts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    server, db, tiers = accounts
    g = start_gateway(server.target, tmp_path_factory.mktemp("gw") / "gateway.log",
                      "--api-auth", "alice:wonderland=" + _create_key(db, tiers, "boss"))
    yield g
    g.stop()


def test_a_key_with_3_credits_gets_exactly_3_of_10_concurrent_calls(accounts, account_gateway) -> None:
    server, db, tiers = accounts
    key = _create_key(db, tiers)

    async def ten() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(
                f"{account_gateway.url}/sdapi/v1/txt2img", json={**BODY, "seed": i},
                headers={"Authorization": f"Bearer {key}"}) for i in range(10)))

    responses = asyncio.run(ten())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 3 + [429] * 7, [r.text for r in responses]
    refused = next(r for r in responses if r.status_code == 429)
    body = refused.json()
    assert body["error"] == "RESOURCE_EXHAUSTED" and 0 < int(refused.headers["retry-after"]) <= 86400
    info = next(d for d in body["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["reason"] == "CREDITS_EXHAUSTED"
    assert refused.headers["x-credits-remaining"] == "0"
    balance = httpx.get(f"{account_gateway.url}/v1/balance", headers={"Authorization": f"Bearer {key}"}).json()
    assert (balance["spent"], balance["remaining"], balance["held"], balance["daily_credits"]) == (3, 0, 0, 3)


def test_missing_and_wrong_keys(account_gateway) -> None:
    r = httpx.post(f"{account_gateway.url}/sdapi/v1/txt2img", json=BODY)
    assert r.status_code == 401 and r.json()["error"] == "UNAUTHENTICATED" and "www-authenticate" in r.headers
    r = httpx.post(f"{account_gateway.url}/sdapi/v1/txt2img", json=BODY, headers={"Authorization": "Bearer kiln_no_x"})
    assert r.status_code == 401
    r = httpx.get(f"{account_gateway.url}/sdapi/v1/sd-models", headers={"X-API-Key": "nope"})
    assert r.status_code == 401
    r = httpx.post(f"{account_gateway.url}/sdapi/v1/txt2img", json=BODY, auth=("alice", "wrong"))
    assert r.status_code == 401 and "alice" in r.json()["message"]
    r = httpx.post(f"{account_gateway.url}/sdapi/v1/txt2img", json=BODY, headers={"Authorization": "Digest x"})
    assert r.status_code == 401


def test_basic_auth_maps_to_a_key_and_credits_show_in_headers(account_gateway, accounts) -> None:
    r = httpx.post(f"{account_gateway.url}/sdapi/v1/txt2img", json=BODY, auth=("alice", "wonderland"), timeout=120)
    assert r.status_code == 200, r.text
    assert int(r.headers["x-credits-remaining"]) >= 0 and r.headers["x-credits-cost"] == "1"
    assert json.loads(r.json()["info"])["seed"] == 1
    # the tier's limits are the server's: steps over its max_steps is a 422 naming the field
    server, db, tiers = accounts
    r = httpx.post(f"{account_gateway.url}/sdapi/v1/txt2img", json={**BODY, "steps": 40},
                   headers={"Authorization": f"Bearer {_create_key(db, tiers)}"})
    assert r.status_code == 422 and r.json()["field"] == "steps" and "max_steps=12" in r.json()["message"]


def test_sse_stream_with_a_key(account_gateway, accounts) -> None:
    server, db, tiers = accounts
    key = _create_key(db, tiers)
    events = []
    with httpx.stream("POST", f"{account_gateway.url}/v1/generate", json={"model": "tiny", **BODY},
                      headers={"Authorization": f"Bearer {key}"}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["x-credits-cost"] == "1"
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            elif line.startswith("data: ") and events[-1] == "artifact":
                data = json.loads(line[6:])
                assert base64.b64decode(data["artifact"]["data"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert events[0] == "started" and events[-2:] == ["artifact", "done"] and "progress" in events
    r = httpx.post(f"{account_gateway.url}/v1/generate", json={"model": "tiny", **BODY})
    assert r.status_code == 401 and r.json()["error"] == "UNAUTHENTICATED"


def test_options_choose_the_model_per_key(account_gateway, accounts) -> None:
    server, db, tiers = accounts
    first, second = ({"Authorization": f"Bearer {_create_key(db, tiers)}"} for _ in range(2))
    url = account_gateway.url
    assert [m["title"] for m in httpx.get(f"{url}/sdapi/v1/sd-models", headers=first).json()] == ["tiny", "tiny-b"]
    assert httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-b"}, headers=first).status_code == 200
    assert httpx.get(f"{url}/sdapi/v1/options", headers=first).json()["sd_model_checkpoint"] == "tiny-b"
    assert httpx.get(f"{url}/sdapi/v1/options", headers=second).json()["sd_model_checkpoint"] == "tiny"

    def model_used(headers: dict[str, str], **extra: object) -> str:
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json={**BODY, **extra}, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        return json.loads(r.json()["info"])["sd_model_name"]

    assert model_used(first) == "tiny-b" and model_used(second) == "tiny"
    assert model_used(second, override_settings={"sd_model_checkpoint": "tiny-b"}) == "tiny-b"  # this request only


def test_idempotency_key_and_request_id_pass_through(account_gateway, accounts) -> None:
    server, db, tiers = accounts
    headers = {"Authorization": f"Bearer {_create_key(db, tiers)}", "Idempotency-Key": "retry-me-1",
               "X-Request-Id": "http-client-7"}
    first = httpx.post(f"{account_gateway.url}/sdapi/v1/txt2img", json=BODY, headers=headers, timeout=120)
    again = httpx.post(f"{account_gateway.url}/sdapi/v1/txt2img", json=BODY, headers=headers, timeout=120)
    assert first.status_code == again.status_code == 200, again.text
    assert first.headers["x-request-id"] == "http-client-7"
    assert first.json()["images"] == again.json()["images"]
    balance = httpx.get(f"{account_gateway.url}/v1/balance", headers=headers).json()
    assert balance["spent"] == 1  # the retry was not charged again


def test_n_iter_past_the_credits_returns_what_was_paid_for(account_gateway, accounts) -> None:
    server, db, tiers = accounts
    headers = {"Authorization": f"Bearer {_create_key(db, tiers)}"}  # 3 credits: one per call
    r = httpx.post(f"{account_gateway.url}/sdapi/v1/txt2img", json={**BODY, "n_iter": 5}, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 3 and info["all_seeds"] == [1, 2, 3]
    assert info["error"]["error"] == "RESOURCE_EXHAUSTED" and r.headers["x-kiln-incomplete"].startswith("RESOURCE")
    assert r.headers["x-credits-remaining"] == "0"
    # with nothing made at all the refusal is the response
    r = httpx.post(f"{account_gateway.url}/sdapi/v1/txt2img", json={**BODY, "n_iter": 2}, headers=headers)
    assert r.status_code == 429 and "retry-after" in r.headers


def test_rate_limit_counts_http_requests_one_to_one(tiny_store: Path, tmp_path: Path) -> None:
    """A request that names its model costs its key exactly one gRPC call (no ListModels of its own), so a tier's
    requests_per_minute means the same over HTTP as over gRPC."""
    db = f"sqlite:///{tmp_path / 'auth.db'}"
    tiers = _tiers(tmp_path / "tiers.toml", rpm=3)
    key = _create_key(db, tiers)
    server = _serve(tiny_store, tmp_path / "serve.log", db, tiers)
    gateway = start_gateway(server.target, tmp_path / "gateway.log")
    try:
        body = {**BODY, "override_settings": {"sd_model_checkpoint": "tiny"}}
        codes = [httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json=body, headers={"Authorization": f"Bearer {key}"},
                            timeout=120) for _ in range(4)]
        assert [r.status_code for r in codes] == [200, 200, 200, 429], codes[-1].text
        assert codes[2].headers["x-ratelimit-remaining"] == "0"
        reason = next(d for d in codes[3].json()["details"] if d["@type"].endswith("ErrorInfo"))["reason"]
        assert reason == "RATE_LIMITED" and int(codes[3].headers["retry-after"]) >= 1
    finally:
        gateway.stop()
        server.stop()


def test_gateway_on_the_network_in_front_of_a_server_with_accounts(accounts, tmp_path: Path) -> None:
    server, db, tiers = accounts
    g = start_gateway(server.target, tmp_path / "gateway.log", "--host", "0.0.0.0")  # keys required: allowed
    try:
        assert httpx.post(f"{g.url}/sdapi/v1/txt2img", json=BODY).status_code == 401
    finally:
        assert g.stop() == 0


def test_a_model_outside_the_tier_is_403(tiny_store: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'auth.db'}"
    tiers = _tiers(tmp_path / "tiers.toml", models='["other"]')
    key = _create_key(db, tiers)
    server = _serve(tiny_store, tmp_path / "serve.log", db, tiers)
    gateway = start_gateway(server.target, tmp_path / "gateway.log")
    try:
        r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={**BODY, "override_settings": {
            "sd_model_checkpoint": "tiny"}}, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED" and "tier" in r.json()["message"]
    finally:
        gateway.stop()
        server.stop()
