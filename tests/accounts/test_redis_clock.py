"""The Redis ledger's one clock: two replicas on one real redis-server whose own clocks disagree by far more than
the hold TTL (one 36 h ahead, one 36 h behind, so each is on another UTC day than the server) share holds, rates
and days as if their clocks agreed, because every script reads the server's TIME and ignores the caller's `now`.
The shared suite (test_ledger.py) moves time on Redis through the caller's clock; this file runs the shipped one."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from runtime.accounts.accounts import Accounts, AccountsConfig
from runtime.accounts.ledger import RateLimited, next_reset, utc_day
from runtime.accounts.redis_ledger import _LIB
from tests.conftest import redis_url

SKEW = 36 * 3600.0
"""Each replica's clock error: past the hold TTL many times over, and across a UTC midnight whenever the test runs."""
TTL = 30.0


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    with redis_url(tmp_path) as u:
        yield u


def replicas(url: str, ttl: float = TTL) -> tuple[Accounts, Accounts]:
    """Two servers' accounts on one Redis: `ahead`'s clock SKEW fast, `behind`'s SKEW slow."""
    ahead = Accounts(AccountsConfig(url, hold_ttl_s=ttl, clock=lambda: time.time() + SKEW))
    behind = Accounts(AccountsConfig(url, hold_ttl_s=ttl, clock=lambda: time.time() - SKEW))
    return ahead, behind


async def server_time(url: str) -> float:
    client = aioredis.from_url(url)
    try:
        seconds, micros = await client.time()
    finally:
        await client.aclose()
    return seconds + micros / 1e6


def test_lua_utc_day_is_python_s(url: str) -> None:
    """The scripts name days with their own date arithmetic (Redis' Lua has no os.date); on the real server it
    must agree with `utc_day` at every midnight, leap days and century years included."""
    midnights = [dt.datetime(y, m, 1, tzinfo=dt.UTC).timestamp() for y in (1970, 1999, 2000, 2024, 2026, 2100, 2400)
                 for m in range(1, 13)]
    midnights += [dt.datetime(*d, tzinfo=dt.UTC).timestamp()  # type: ignore[misc]
                  for d in ((2000, 2, 29), (2024, 2, 29), (2100, 2, 28), (2100, 3, 1), (2026, 12, 31))]
    times = sorted({t + d for t in midnights for d in (-0.000001, 0.0, 0.5, 43200.0)} - {-0.000001})
    times += [1.0 + 7919.37 * i * i for i in range(2000)]  # spread over ~1970-2970
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        got = client.eval(_LIB + "local out = {} for i, t in ipairs(ARGV) do out[i] = utc_day(tonumber(t)) end "
                          "return out", 0, *(repr(t) for t in times))
    finally:
        client.close()
    assert got == [utc_day(t) for t in times]


def test_skewed_replicas_keep_each_other_s_holds_and_count_one_day(url: str) -> None:
    async def body() -> None:
        ahead, behind = replicas(url)
        try:
            t0 = await server_time(url)
            await ahead.ledger.add_key("k", "h", "free", "", ahead.now())
            record = await behind.ledger.get_key("k")
            assert record is not None and abs(record.created - t0) < 5  # the server's time, not ahead's

            # behind's hold would have been expired 72 h ago on ahead's clock; on the server's it is live
            slow = await behind.ledger.reserve("k", 3, 10, 5, behind.now(), TTL)
            assert abs(slow.expires - (t0 + TTL)) < 5 and slow.day == utc_day(t0)
            seen = await ahead.ledger.balance("k", 10, ahead.now())
            assert (seen.held, seen.remaining) == (3, 7)
            fast = await ahead.ledger.reserve("k", 4, 10, 5, ahead.now(), TTL)
            assert fast.remaining == 3 and fast.day == slow.day
            assert await behind.ledger.extend(slow.hold_id, behind.now(), TTL)
            assert (await behind.ledger.balance("k", 10, behind.now())).held == 7  # ahead's hold is live for behind
            assert await behind.ledger.commit(slow.hold_id, behind.now())
            assert await ahead.ledger.commit(fast.hold_id, ahead.now())

            # both spent on one (the server's) day, and a grant through one is the other's too
            granted = await behind.ledger.grant("k", 5, 10, behind.now())
            assert granted is not None and (granted.spent, granted.granted, granted.remaining) == (7, 5, 8)
            a, b = (await ahead.ledger.balance("k", 10, ahead.now()), await behind.ledger.balance("k", 10, behind.now()))
            t1 = await server_time(url)
            assert a == b and (a.spent, a.granted, a.held, a.remaining) == (7, 5, 0, 8)
            assert a.reset in {next_reset(t0), next_reset(t1)}  # the server's next midnight (t0, t1: same day but
            # for a run that straddles it), not either replica's
        finally:
            await ahead.close()
            await behind.close()

    asyncio.run(body())


def test_an_unextended_hold_expires_after_the_ttl_on_the_server_s_clock(url: str) -> None:
    async def body() -> None:
        ahead, behind = replicas(url, ttl=1.0)
        try:
            hold = await behind.ledger.reserve("k", 2, 5, 5, behind.now(), 1.0)
            assert (await ahead.ledger.balance("k", 5, ahead.now())).held == 2  # not expired early by ahead
            await asyncio.sleep(1.3)  # nobody extends it: the server's clock passes its expiry
            assert (await ahead.ledger.balance("k", 5, ahead.now())).held == 0
            assert not await behind.ledger.commit(hold.hold_id, behind.now())  # too late: given back
            assert not await behind.ledger.extend(hold.hold_id, behind.now(), 1.0)
        finally:
            await ahead.close()
            await behind.close()

    asyncio.run(body())


def test_skewed_replicas_share_one_rate_budget(url: str) -> None:
    async def body() -> None:
        ahead, behind = replicas(url)
        try:
            # 6 a minute, taken in turns: each admission counts against the other replica's too
            turns = [ahead, behind] * 3
            assert [await r.ledger.admit("k", 6, r.now()) for r in turns] == [5, 4, 3, 2, 1, 0]
            for r in (ahead, behind):  # and both refuse the 7th, with the same wait
                with pytest.raises(RateLimited) as e:
                    await r.ledger.admit("k", 6, r.now())
                assert e.value.retry_after_s == pytest.approx(10.0, abs=2.0)
        finally:
            await ahead.close()
            await behind.close()

    asyncio.run(body())
