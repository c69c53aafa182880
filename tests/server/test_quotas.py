"""Keys, credits, rate and tier limits through real `kiln serve` processes on loopback, on SQLite and on a real
redis-server: exact credits under 64 concurrent calls, refunds on failure and cancellation, expiry after a
server is killed, idempotent retries, admin RPCs, and two replicas sharing one Redis."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, kiln, redis_url, start_server
from tests.server.test_errors import _broken_decoder_store

TIERS = """
[tiers.t]
daily_credits = {credits}
requests_per_minute = {rpm}
max_concurrent = {concurrent}
max_steps = 12
max_pixels = 16384
max_images = 2
models = {models}

[tiers.boss]
daily_credits = 1000
requests_per_minute = 10000
max_concurrent = 64
max_steps = 50
max_pixels = 1048576
max_images = 4
models = ["*"]
admin = true
"""


def _tiers(path: Path, credits: int = 10, rpm: int = 10000, concurrent: int = 64, models: str = '["*"]') -> Path:
    path.write_text(TIERS.format(credits=credits, rpm=rpm, concurrent=concurrent, models=models))
    return path


def _create_key(db: str, tiers: Path, tier: str = "t") -> str:
    out = kiln("keys", "create", "--auth-db", db, "--tiers", str(tiers), "--tier", tier, "--label", "test")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def _serve(store: Path, log: Path, db: str, tiers: Path, *extra: str) -> ServerProcess:
    return start_server(store, log, "--auth-db", db, "--tiers", str(tiers), *extra)


def _request(**kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"model": "tiny", "prompt": "a red circle", "steps": 2, "seed": 1, **kw})  # type: ignore[arg-type]


def _auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def _generate(target: str, key: str, request: pb.GenerateRequest, *extra: tuple[str, str],
                    timeout: float = 120) -> tuple[grpc.StatusCode, list[pb.GenerateResponse], dict, status_pb2.Status]:
    async with grpc.aio.insecure_channel(target) as ch:
        call = pb_grpc.KilnStub(ch).Generate(request, metadata=(*_auth(key), *extra), timeout=timeout)
        got: list[pb.GenerateResponse] = []
        try:
            async for r in call:
                got.append(r)
        except grpc.aio.AioRpcError:
            pass
        trailing = await call.trailing_metadata() or ()
        meta = {k: v for k, v in (await call.initial_metadata() or ())}
        meta.update({k: v for k, v in trailing})  # the final figures
        status = status_pb2.Status()
        if "grpc-status-details-bin" in meta:
            status.ParseFromString(meta["grpc-status-details-bin"])
        return await call.code(), got, meta, status


def _details(call: object) -> dict[str, object]:
    """The google.rpc details of a failed sync call, or of an aio call's status (from `_generate`)."""
    status = call if isinstance(call, status_pb2.Status) else rpc_status.from_call(call)  # type: ignore[arg-type]
    out: dict[str, object] = {}
    for d in status.details if status else []:
        for cls in (error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo,
                    error_details_pb2.BadRequest):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                out[cls.DESCRIPTOR.name] = msg
    return out


def _balance(target: str, key: str) -> pb.Balance:
    ch, stub = _stub(target)
    with ch:
        return stub.GetBalance(pb.GetBalanceRequest(), metadata=_auth(key))


def _settled(target: str, key: str, timeout: float = 10) -> pb.Balance:
    """The balance once nothing is held: refunds land as the server sees cancellations."""
    deadline = time.monotonic() + timeout
    while True:
        b = _balance(target, key)
        if b.held == 0 or time.monotonic() > deadline:
            return b
        time.sleep(0.05)


def _stub(target: str) -> tuple[grpc.Channel, pb_grpc.KilnStub]:
    ch = grpc.insecure_channel(target)
    return ch, pb_grpc.KilnStub(ch)


def test_64_concurrent_calls_on_10_credits(auth_db: str, tiny_store: Path, tmp_path: Path) -> None:
    tiers = _tiers(tmp_path / "tiers.toml")
    key = _create_key(auth_db, tiers)
    server = _serve(tiny_store, tmp_path / "serve.log", auth_db, tiers)
    try:
        async def all_calls():  # type: ignore[no-untyped-def]
            return await asyncio.gather(*(_generate(server.target, key, _request(seed=i)) for i in range(64)))

        results = asyncio.run(all_calls())
        codes = [r[0] for r in results]
        assert codes.count(grpc.StatusCode.OK) == 10 and codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 54
        ok = [r for r in results if r[0] == grpc.StatusCode.OK]
        assert all(r[1][0].started.cost == 1 and r[1][-1].HasField("artifact") for r in ok)
        assert all(r[2]["x-credits-cost"] == "1" and "x-credits-reset" in r[2] for r in ok)
        refused = next(r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED)
        d = _details(refused[3])
        assert d["ErrorInfo"].reason == "CREDITS_EXHAUSTED" and d["ErrorInfo"].domain == "kiln"  # type: ignore[attr-defined]
        assert "daily_credits" in d["QuotaFailure"].violations[0].subject  # type: ignore[attr-defined]
        assert 0 < d["RetryInfo"].retry_delay.seconds <= 86400  # type: ignore[attr-defined]
        assert refused[2]["x-credits-remaining"] == "0"
        ch, stub = _stub(server.target)
        with ch:
            balance, call = stub.GetBalance.with_call(pb.GetBalanceRequest(), metadata=_auth(key))
        assert (balance.spent, balance.remaining, balance.held, balance.daily_credits) == (10, 0, 0, 10)
        assert dict(call.trailing_metadata())["x-credits-remaining"] == "0"
    finally:
        assert server.stop() == 0


def test_two_replicas_sharing_redis_never_overdraw(tiny_store: Path, tmp_path: Path) -> None:
    tiers = _tiers(tmp_path / "tiers.toml", credits=7)
    with redis_url(tmp_path) as redis:
        key = _create_key(redis, tiers)
        servers = [_serve(tiny_store, tmp_path / f"serve{i}.log", redis, tiers) for i in range(2)]
        try:
            async def spread():  # type: ignore[no-untyped-def]
                return await asyncio.gather(*(_generate(servers[i % 2].target, key, _request(seed=i)) for i in range(24)))

            codes = [r[0] for r in asyncio.run(spread())]
            assert codes.count(grpc.StatusCode.OK) == 7
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 17
            for s in servers:
                b = _balance(s.target, key)
                assert (b.spent, b.remaining) == (7, 0)
        finally:
            for s in servers:
                s.stop()


def test_failed_and_cancelled_requests_are_refunded(auth_db: str, tiny_bundle: Path, tiny_store: Path,
                                                    tmp_path: Path) -> None:
    tiers = _tiers(tmp_path / "tiers.toml", credits=3)
    key = _create_key(auth_db, tiers)
    broken = _broken_decoder_store(tiny_bundle, tmp_path / "broken")
    server = _serve(broken, tmp_path / "serve.log", auth_db, tiers)
    try:
        # the broken decoder fails in ONNX Runtime for anything but 64x64 images
        code, _, meta, _ = asyncio.run(_generate(server.target, key, _request(width=128)))
        assert code == grpc.StatusCode.INTERNAL and meta["x-credits-remaining"] == "3"
        code, *_ = asyncio.run(_generate(server.target, key, _request(guidance_scale=1e6)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop()
    server = _serve(tiny_store, tmp_path / "serve2.log", auth_db, tiers)
    try:
        async def cancel_after_first_progress() -> None:
            async with grpc.aio.insecure_channel(server.target) as ch:
                call = pb_grpc.KilnStub(ch).Generate(_request(steps=12), metadata=_auth(key))
                async for r in call:
                    if r.HasField("progress"):
                        call.cancel()
                        break

        asyncio.run(cancel_after_first_progress())
        _settled(server.target, key)  # its 2 credits must be back before the next 2-credit call can reserve
        code, *_ = asyncio.run(_generate(server.target, key, _request(steps=12, width=128, height=128),
                                         timeout=0.02))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        b = _settled(server.target, key)
        assert (b.spent, b.held, b.remaining) == (0, 0, 3)
    finally:
        server.stop()


def test_killed_server_s_holds_expire_after_the_ttl(auth_db: str, tiny_store: Path, tmp_path: Path) -> None:
    tiers = _tiers(tmp_path / "tiers.toml", credits=4)
    key = _create_key(auth_db, tiers)
    server = _serve(tiny_store, tmp_path / "serve.log", auth_db, tiers, "--hold-ttl", "5")
    ch, stub = _stub(server.target)
    with ch:
        call = stub.Generate(_request(steps=12, width=128, height=128), metadata=_auth(key))
        for r in call:
            if r.HasField("progress"):
                break
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        killed = time.time()

    async def balance():  # type: ignore[no-untyped-def]
        from runtime.accounts.ledger import open_ledger

        ledger = open_ledger(auth_db)
        try:
            return await ledger.balance(key.split("_")[1], 4, time.time())
        finally:
            await ledger.close()

    # 12 steps cost 2 credits, held by the dead server until its hold runs out
    held = asyncio.run(balance())
    assert time.time() - killed < 4 and (held.held, held.remaining) == (2, 2)
    time.sleep(max(0.0, killed + 5.5 - time.time()))
    other = _serve(tiny_store, tmp_path / "serve2.log", auth_db, tiers)
    try:
        later = _balance(other.target, key)
        assert (later.held, later.remaining, later.spent) == (0, 4, 0)
    finally:
        other.stop()


def test_idempotent_retries_are_charged_once(auth_db: str, tiny_store: Path, tmp_path: Path) -> None:
    tiers = _tiers(tmp_path / "tiers.toml", credits=5)
    key = _create_key(auth_db, tiers)
    server = _serve(tiny_store, tmp_path / "serve.log", auth_db, tiers)
    try:
        idem = ("x-idempotency-key", "job-1")
        job = _request(steps=12, width=128, height=128)  # 2 credits, long enough to still be running at the retry

        async def racing() -> list[grpc.StatusCode]:
            async with grpc.aio.insecure_channel(server.target) as ch:
                first = pb_grpc.KilnStub(ch).Generate(job, metadata=(*_auth(key), idem))
                async for r in first:  # the first attempt is running...
                    if r.HasField("progress"):
                        break
                retry = await _generate(server.target, key, job, idem)  # ...when the retry comes
                async for _ in first:
                    pass
                return [await first.code(), retry[0]]

        assert asyncio.run(racing()) == [grpc.StatusCode.OK, grpc.StatusCode.ABORTED]
        code, again, meta, _ = asyncio.run(_generate(server.target, key, job, idem))
        assert code == grpc.StatusCode.OK and again[-1].artifact.data[:8] == b"\x89PNG\r\n\x1a\n"
        code, _, _, call = asyncio.run(_generate(server.target, key, _request(steps=11), idem))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert _details(call)["BadRequest"].field_violations[0].field == "x-idempotency-key"  # type: ignore[attr-defined]
        # request_id works as the idempotency key too
        for _ in range(2):
            code, *_ = asyncio.run(_generate(server.target, key, _request(request_id="req-abc")))
            assert code == grpc.StatusCode.OK
        b = _balance(server.target, key)
        assert (b.spent, b.remaining) == (3, 2)  # job-1 (12 steps: 2 credits) and req-abc (1), once each
    finally:
        server.stop()


def test_keys_tiers_and_admin_rpcs(auth_db: str, tiny_store: Path, tmp_path: Path) -> None:
    tiers = _tiers(tmp_path / "tiers.toml", models='["other"]')
    user, boss = _create_key(auth_db, tiers), _create_key(auth_db, tiers, "boss")
    server = _serve(tiny_store, tmp_path / "serve.log", auth_db, tiers)
    ch, stub = _stub(server.target)
    try:
        def code_of(fn, request, key=None):  # type: ignore[no-untyped-def]
            try:
                fn(request, metadata=_auth(key) if key else ())
                return grpc.StatusCode.OK, None
            except grpc.RpcError as e:
                return e.code(), e

        assert code_of(stub.ListModels, pb.ListModelsRequest())[0] == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(stub.ListModels, pb.ListModelsRequest(), "kiln_000000000000_" + "x" * 43)[0] == \
            grpc.StatusCode.UNAUTHENTICATED
        assert code_of(stub.ListModels, pb.ListModelsRequest(), user)[0] == grpc.StatusCode.OK
        code, err = code_of(stub.CreateKey, pb.CreateKeyRequest(tier="t"), user)
        assert code == grpc.StatusCode.PERMISSION_DENIED and _details(err)["ErrorInfo"].reason == "ADMIN_ONLY"  # type: ignore[attr-defined]
        for admin_only, req in ((stub.LoadModel, pb.LoadModelRequest(model="tiny")),  # the model pool's admin RPCs
                                (stub.UnloadModel, pb.UnloadModelRequest(model="tiny"))):
            code, err = code_of(admin_only, req, user)
            assert code == grpc.StatusCode.PERMISSION_DENIED and _details(err)["ErrorInfo"].reason == "ADMIN_ONLY"  # type: ignore[attr-defined]
        assert code_of(stub.LoadModel, pb.LoadModelRequest(model="tiny"), boss)[0] == grpc.StatusCode.OK
        # tier limits: a model outside the tier, then too many steps / pixels / images
        code, _, _, call = asyncio.run(_generate(server.target, user, _request()))
        assert code == grpc.StatusCode.PERMISSION_DENIED and _details(call)["ErrorInfo"].reason == "MODEL_NOT_IN_TIER"  # type: ignore[attr-defined]
        fresh = stub.CreateKey(pb.CreateKeyRequest(tier="boss", label="made over gRPC"), metadata=_auth(boss))
        code, _, _, call = asyncio.run(_generate(server.target, fresh.api_key, _request(steps=60)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        granted = stub.GrantCredits(pb.GrantCreditsRequest(key_id=fresh.key_id, credits=5), metadata=_auth(boss))
        assert (granted.granted, granted.remaining) == (5, 1005)
        assert code_of(stub.GrantCredits, pb.GrantCreditsRequest(key_id="nope", credits=5), boss)[0] == \
            grpc.StatusCode.NOT_FOUND
        revoked = stub.RevokeKey(pb.RevokeKeyRequest(key_id=fresh.key_id), metadata=_auth(boss))
        assert revoked.revoked_unix > 0
        code, err = code_of(stub.GetBalance, pb.GetBalanceRequest(), fresh.api_key)
        assert code == grpc.StatusCode.UNAUTHENTICATED and _details(err)["ErrorInfo"].reason == "REVOKED_KEY"  # type: ignore[attr-defined]
        listed = kiln("keys", "list", "--auth-db", auth_db, "--tiers", str(tiers))
        assert fresh.key_id in listed.stdout and "made over gRPC" in listed.stdout
        assert fresh.api_key.split("_")[-1] not in listed.stdout  # never a secret
    finally:
        ch.close()
        server.stop()


def test_rate_limit_and_cli(auth_db: str, tiny_store: Path, tmp_path: Path) -> None:
    tiers = _tiers(tmp_path / "tiers.toml", rpm=2)
    key = _create_key(auth_db, tiers)
    server = _serve(tiny_store, tmp_path / "serve.log", auth_db, tiers)
    try:
        out = kiln("generate", "--target", server.target, "--model", "tiny", "--prompt", "a red circle", "--steps",
                   "2", "--api-key", key, "--out", str(tmp_path / "a.png"), "--quiet")
        assert out.returncode == 0, out.stderr
        assert "cost 1 credit(s)" in out.stderr and "9 credit(s) left today" in out.stderr
        out = kiln("credits", "--target", server.target, "--api-key", key)
        assert out.returncode == 0 and "9 credit(s) left today" in out.stdout, out.stderr
        out = kiln("credits", "--target", server.target, "--api-key", key)
        assert out.returncode == 1 and "RESOURCE_EXHAUSTED" in out.stderr and "RATE_LIMITED" in out.stderr
        assert "RetryInfo" in out.stderr
    finally:
        server.stop()


def test_no_auth_db_means_loopback_only(tiny_store: Path) -> None:
    out = kiln("serve", "--store", str(tiny_store), "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert out.returncode != 0 and "--insecure-open" in out.stderr


def test_account_rpcs_on_a_server_without_accounts(server: ServerProcess) -> None:
    ch, stub = _stub(server.target)
    with ch, pytest.raises(grpc.RpcError) as e:
        stub.GetBalance(pb.GetBalanceRequest())
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--auth-db" in e.value.details()
    assert _details(e.value)["ErrorInfo"].reason == "NO_ACCOUNTS"  # type: ignore[attr-defined]
