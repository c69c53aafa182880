"""The credit ledger's contract, on every backend: exact credits under concurrency, refunds, hold expiry,
idempotency, concurrency and rate limits, the UTC day boundary, keys."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from runtime.accounts.ledger import (
    ConcurrencyLimited,
    CreditsExhausted,
    IdempotencyDone,
    IdempotencyInProgress,
    IdempotencyMismatch,
    Ledger,
    RateLimited,
    next_reset,
    utc_day,
)
from tests.accounts.conftest import run, with_ledger

NOON = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC).timestamp()
TTL = 30.0


def test_reserve_commit_release_and_balance(auth_db: str) -> None:
    async def body(ledger: Ledger) -> None:
        await ledger.add_key("k1", "h", "free", "", NOON)
        a = await ledger.reserve("k1", 3, daily=10, max_concurrent=9, now=NOON, ttl=TTL)
        b = await ledger.reserve("k1", 4, daily=10, max_concurrent=9, now=NOON, ttl=TTL)
        assert (a.remaining, b.remaining, a.cost, b.expires) == (7, 3, 3, NOON + TTL)
        bal = await ledger.balance("k1", 10, NOON)
        assert (bal.remaining, bal.held, bal.spent) == (3, 7, 0) and bal.reset == next_reset(NOON)
        with pytest.raises(CreditsExhausted) as e:
            await ledger.reserve("k1", 4, daily=10, max_concurrent=9, now=NOON, ttl=TTL)
        assert (e.value.remaining, e.value.cost) == (3, 4)
        assert await ledger.commit(a.hold_id, NOON + 1) and await ledger.release(b.hold_id)
        assert not await ledger.commit(a.hold_id, NOON + 1) and not await ledger.release(b.hold_id)
        assert not await ledger.commit(b.hold_id, NOON + 1)  # released: never charged later
        bal = await ledger.balance("k1", 10, NOON + 2)
        assert (bal.remaining, bal.held, bal.spent) == (7, 0, 3)

    run(with_ledger(auth_db, body))


def test_64_concurrent_reservations_on_10_credits(auth_db: str) -> None:
    async def body(ledger: Ledger) -> None:
        async def one(i: int) -> bool:
            try:
                hold = await ledger.reserve("k", 1, daily=10, max_concurrent=64, now=NOON, ttl=TTL)
            except CreditsExhausted:
                return False
            await asyncio.sleep(0.001 * (i % 5))
            return await ledger.commit(hold.hold_id, NOON + 1)

        results = await asyncio.gather(*(one(i) for i in range(64)))
        assert sum(results) == 10
        bal = await ledger.balance("k", 10, NOON + 2)
        assert (bal.remaining, bal.spent, bal.held) == (0, 10, 0)

    run(with_ledger(auth_db, body))


def test_a_hold_nobody_extends_expires_and_its_credits_come_back(auth_db: str) -> None:
    async def body(ledger: Ledger) -> None:
        dead = await ledger.reserve("k", 5, daily=5, max_concurrent=2, now=NOON, ttl=TTL)
        with pytest.raises(CreditsExhausted):
            await ledger.reserve("k", 1, daily=5, max_concurrent=2, now=NOON + TTL - 1, ttl=TTL)
        assert (await ledger.balance("k", 5, NOON + TTL + 0.5)).remaining == 5
        assert not await ledger.commit(dead.hold_id, NOON + TTL + 1)  # too late: it was given back
        # a live request keeps its hold by extending it
        live = await ledger.reserve("k", 5, daily=5, max_concurrent=2, now=NOON + 100, ttl=TTL)
        for t in range(110, 200, 10):
            assert await ledger.extend(live.hold_id, NOON + t, TTL)
        assert (await ledger.balance("k", 5, NOON + 200)).remaining == 0
        assert await ledger.commit(live.hold_id, NOON + 201)
        assert not await ledger.extend(live.hold_id, NOON + 202, TTL)

    run(with_ledger(auth_db, body))


def test_idempotency(auth_db: str) -> None:
    async def body(ledger: Ledger) -> None:
        kw = {"daily": 10, "max_concurrent": 5, "ttl": TTL}
        first = await ledger.reserve("k", 2, now=NOON, idempotency_key="abc", request_hash="r1", **kw)
        with pytest.raises(IdempotencyInProgress):
            await ledger.reserve("k", 2, now=NOON + 1, idempotency_key="abc", request_hash="r1", **kw)
        with pytest.raises(IdempotencyMismatch):
            await ledger.reserve("k", 2, now=NOON + 1, idempotency_key="abc", request_hash="r2", **kw)
        assert await ledger.commit(first.hold_id, NOON + 2)
        with pytest.raises(IdempotencyDone) as done:
            await ledger.reserve("k", 2, now=NOON + 3, idempotency_key="abc", request_hash="r1", **kw)
        assert done.value.hold_id == first.hold_id
        assert (await ledger.balance("k", 10, NOON + 4)).spent == 2  # charged once
        # another key's idempotency keys are its own
        await ledger.reserve("other", 2, now=NOON + 3, idempotency_key="abc", request_hash="r9", **kw)
        # a failed (released) attempt may be retried with the same key, and is charged when it succeeds
        failed = await ledger.reserve("k", 1, now=NOON + 5, idempotency_key="def", request_hash="r3", **kw)
        assert await ledger.release(failed.hold_id)
        retry = await ledger.reserve("k", 1, now=NOON + 6, idempotency_key="def", request_hash="r3", **kw)
        assert retry.hold_id != failed.hold_id and await ledger.commit(retry.hold_id, NOON + 7)
        # after 24 h the key is forgotten
        again = await ledger.reserve("k", 2, now=NOON + 86400 + 10, idempotency_key="abc", request_hash="r2", **kw)
        assert again.hold_id != first.hold_id

    run(with_ledger(auth_db, body))


def test_concurrency_limit_counts_running_holds(auth_db: str) -> None:
    async def body(ledger: Ledger) -> None:
        a = await ledger.reserve("k", 1, daily=10, max_concurrent=2, now=NOON, ttl=TTL)
        await ledger.reserve("k", 1, daily=10, max_concurrent=2, now=NOON, ttl=TTL)
        with pytest.raises(ConcurrencyLimited):
            await ledger.reserve("k", 1, daily=10, max_concurrent=2, now=NOON, ttl=TTL)
        await ledger.reserve("other", 1, daily=10, max_concurrent=2, now=NOON, ttl=TTL)
        await ledger.commit(a.hold_id, NOON + 1)
        await ledger.reserve("k", 1, daily=10, max_concurrent=2, now=NOON + 1, ttl=TTL)

    run(with_ledger(auth_db, body))


def test_utc_day_boundary_resets_credits_and_grants(auth_db: str) -> None:
    async def body(ledger: Ledger) -> None:
        await ledger.add_key("k", "h", "free", "", NOON)
        midnight = next_reset(NOON)
        late = midnight - 1
        granted = await ledger.grant("k", 5, 3, late)
        assert granted is not None and granted.granted == 5
        assert await ledger.grant("nobody", 5, 3, late) is None
        hold = await ledger.reserve("k", 8, daily=3, max_concurrent=5, now=late, ttl=TTL)
        await ledger.commit(hold.hold_id, late + 0.5)
        assert (await ledger.balance("k", 3, late + 0.5)).remaining == 0
        bal = await ledger.balance("k", 3, midnight + 0.5)
        assert (bal.remaining, bal.spent, bal.granted) == (3, 0, 0)
        assert utc_day(midnight) != utc_day(late) and bal.reset == midnight + 86400

    run(with_ledger(auth_db, body))


def test_gcra_rate_limit(auth_db: str) -> None:
    async def body(ledger: Ledger) -> None:
        # a burst of up to one minute's worth passes, each admission saying how many more would
        assert [await ledger.admit("k", 6, NOON) for _ in range(6)] == [5, 4, 3, 2, 1, 0]
        with pytest.raises(RateLimited) as e:
            await ledger.admit("k", 6, NOON)
        assert e.value.retry_after_s == pytest.approx(10.0)
        with pytest.raises(RateLimited):
            await ledger.admit("k", 6, NOON + 9.9)
        assert await ledger.admit("k", 6, NOON + 10.0) == 0  # one interval (60 / 6 s) later, one more
        assert await ledger.admit("k", 6, NOON + 60.0) == 4
        await ledger.admit("other", 6, NOON)

    run(with_ledger(auth_db, body))


def test_keys(auth_db: str) -> None:
    async def body(ledger: Ledger) -> None:
        await ledger.add_key("a1", "hash-a", "free", "alice", NOON)
        await ledger.add_key("b2", "hash-b", "pro", "", NOON + 1)
        got = await ledger.get_key("a1")
        assert got is not None and (got.tier, got.label, got.revoked, got.secret_hash) == ("free", "alice", None, "hash-a")
        assert await ledger.get_key("zz") is None
        assert await ledger.revoke_key("a1", NOON + 5) and not await ledger.revoke_key("zz", NOON)
        assert await ledger.revoke_key("a1", NOON + 9)  # twice is fine; the first time stays
        listed = await ledger.list_keys()
        assert [(k.key_id, k.tier, k.revoked) for k in listed] == [("a1", "free", NOON + 5), ("b2", "pro", None)]

    run(with_ledger(auth_db, body))


def _reserve_many(url: str, n: int, start: float) -> int:
    """In a child process: wait for `start`, then try `n` reservations of 1 credit; how many succeeded."""
    import time as _time

    async def go() -> int:
        from runtime.accounts.ledger import open_ledger

        ledger = open_ledger(url)
        ok = 0
        try:
            _time.sleep(max(0.0, start - _time.time()))
            for _ in range(n):
                try:
                    hold = await ledger.reserve("k", 1, daily=25, max_concurrent=1000, now=NOON, ttl=TTL)
                    ok += await ledger.commit(hold.hold_id, NOON + 1)
                except CreditsExhausted:
                    pass
        finally:
            await ledger.close()
        return ok

    return asyncio.run(go())


def test_processes_sharing_one_sqlite_file_never_overdraw(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import multiprocessing
    import time as _time

    url = f"sqlite:///{tmp_path / 'auth.db'}"
    run(with_ledger(url, lambda ledger: ledger.list_keys()))  # create the schema once
    start = _time.time() + 1.0
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        got = pool.starmap(_reserve_many, [(url, 20, start)] * 3)
    assert sum(got) == 25

    async def spent(ledger: Ledger) -> int:
        return (await ledger.balance("k", 25, NOON + 2)).spent

    assert run(with_ledger(url, spent)) == 25
