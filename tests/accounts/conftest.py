"""Helpers for the ledger tests (the per-backend `auth_db` fixture is in tests/conftest.py)."""

from __future__ import annotations

import asyncio

from runtime.accounts.ledger import Ledger, open_ledger
from runtime.accounts.redis_ledger import RedisLedger


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


class CallerClockRedisLedger(RedisLedger):
    """The Redis ledger with its scripts' `ledger_now()` reading the caller's `now` (their last argument) instead of
    the server's TIME: the shared suite moves time (hold expiry, rates, 24 h idempotency, UTC midnight) by passing
    `now`, and a real server's clock cannot be moved. Everything but that one Lua function is the shipped ledger;
    test_redis_clock.py runs the shipped one, on the server's clock, with replicas whose clocks disagree."""

    clock = "local function ledger_now() return tonumber(ARGV[#ARGV]) end\n"

    def _clock_args(self, now: float) -> tuple[float, ...]:
        return (float(now),)


def open_test_ledger(url: str) -> Ledger:
    """`open_ledger`, but Redis on the caller's clock (above)."""
    return CallerClockRedisLedger(url) if url.startswith("redis://") else open_ledger(url)


async def with_ledger(url: str, body):  # type: ignore[no-untyped-def]
    ledger = open_test_ledger(url)
    try:
        return await body(ledger)
    finally:
        await ledger.close()
