"""The credit ledger: one authority for keys, daily credits, reservations, rate state and idempotency records.

Every request that costs credits goes through reserve -> (extend while it runs) -> commit on success or
release on failure. A reservation holds its credits until then; one whose server died stops being extended
and expires after the hold TTL, which gives its credits back (lazily: every read of a key's balance first
expires its stale holds). Each operation is one atomic transaction (SQLite) or one Lua script (Redis), so
concurrent requests on any number of servers sharing the ledger can never spend more than a key has.

Backends: `SqliteLedger` (`sqlite:///PATH`, WAL mode) and `RedisLedger` (`redis://HOST:PORT/DB`);
`open_ledger(url)` picks one. Both implement `Ledger` and pass the same test suite.

Time: hold expiry, the rate limit, the UTC day and the idempotency window are decided on one clock per ledger.
SQLite's is the `now` each caller passes: the servers sharing its file run on one host and read one clock.
Redis' is the Redis server's own, read inside every script; the `now` passed in is ignored, since replicas on
several hosts may disagree, and one running ahead by more than the hold TTL would expire the others' live holds.
"""

from __future__ import annotations

import abc
import datetime as dt
from dataclasses import dataclass

IDEMPOTENCY_WINDOW_S = 24 * 3600
"""How long a client's idempotency key is remembered."""


class LedgerError(Exception):
    """Base of the ledger's refusals; the quota interceptor maps each to a gRPC status."""


class CreditsExhausted(LedgerError):
    def __init__(self, remaining: int, cost: int):
        super().__init__(f"this request costs {cost} credit(s) and {remaining} remain today")
        self.remaining, self.cost = remaining, cost


class ConcurrencyLimited(LedgerError):
    def __init__(self, limit: int):
        super().__init__(f"{limit} request(s) of this key are already running, the most its tier allows")
        self.limit = limit


class RateLimited(LedgerError):
    def __init__(self, retry_after_s: float, per_minute: int):
        super().__init__(f"more than {per_minute} requests per minute; retry in {retry_after_s:.2f} s")
        self.retry_after_s, self.per_minute = retry_after_s, per_minute


class IdempotencyInProgress(LedgerError):
    def __init__(self, idempotency_key: str):
        super().__init__(f"a request with idempotency key {idempotency_key!r} is still running; retry after it ends")


class IdempotencyMismatch(LedgerError):
    def __init__(self, idempotency_key: str):
        super().__init__(f"idempotency key {idempotency_key!r} was used for a different request in the last 24 h")


class IdempotencyDone(LedgerError):
    """The request already ran to completion (and was charged): never charge it again."""

    def __init__(self, idempotency_key: str, hold_id: str):
        super().__init__(f"the request with idempotency key {idempotency_key!r} already completed")
        self.idempotency_key, self.hold_id = idempotency_key, hold_id


class UnknownKey(LedgerError):
    pass


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tier: str
    label: str
    created: float
    """Unix time."""
    revoked: float | None
    """Unix time of revocation, or None while the key is valid."""
    secret_hash: str = ""


@dataclass(frozen=True)
class Hold:
    hold_id: str
    key_id: str
    cost: int
    day: str
    """The UTC day (YYYY-MM-DD) whose credits it holds."""
    expires: float
    """Unix time on the ledger's clock (see the module docstring) when it expires unless extended."""
    remaining: int = 0
    """Credits left today once this hold is counted."""


@dataclass(frozen=True)
class Balance:
    remaining: int
    """Credits left today: the tier's daily credits plus today's grants, minus what was spent and what is held."""
    spent: int
    held: int
    granted: int
    daily: int
    reset: float
    """Unix time of the next UTC midnight on the ledger's clock, when the day's credits start again."""


def utc_day(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")


def next_reset(now: float) -> float:
    """Unix time of the UTC midnight after `now`."""
    day = dt.datetime.fromtimestamp(now, dt.UTC).date() + dt.timedelta(days=1)
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


class Ledger(abc.ABC):
    """What the interceptors and `kiln keys` need. Every `now` is the calling server's clock in Unix seconds
    (`Accounts.now`, which tests can move); whether the ledger decides with it or with a clock of its own is the
    backend's (module docstring)."""

    # keys
    @abc.abstractmethod
    async def add_key(self, key_id: str, secret_hash: str, tier: str, label: str, now: float) -> None: ...

    @abc.abstractmethod
    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    @abc.abstractmethod
    async def revoke_key(self, key_id: str, now: float) -> bool:
        """False if there is no such key (revoking twice is not an error)."""

    @abc.abstractmethod
    async def list_keys(self) -> list[KeyRecord]: ...

    # credits
    @abc.abstractmethod
    async def reserve(self, key_id: str, cost: int, daily: int, max_concurrent: int, now: float, ttl: float,
                      idempotency_key: str = "", request_hash: str = "") -> Hold:
        """Hold `cost` credits of today's; raises CreditsExhausted, ConcurrencyLimited or an Idempotency*
        refusal. A released or expired earlier attempt with the same idempotency key may be retried."""

    @abc.abstractmethod
    async def extend(self, hold_id: str, now: float, ttl: float) -> bool:
        """Push a running request's expiry to now + ttl; False if it is no longer held."""

    @abc.abstractmethod
    async def commit(self, hold_id: str, now: float) -> bool:
        """Spend the held credits; False if the hold is no longer held (released or expired)."""

    @abc.abstractmethod
    async def release(self, hold_id: str) -> bool:
        """Give the held credits back; False if the hold is no longer held."""

    @abc.abstractmethod
    async def balance(self, key_id: str, daily: int, now: float) -> Balance: ...

    @abc.abstractmethod
    async def grant(self, key_id: str, credits: int, daily: int, now: float) -> Balance | None:
        """Add `credits` to the key's credits for today; the key's balance after it (its tier gives `daily`),
        or None if there is no such key."""

    # rate
    @abc.abstractmethod
    async def admit(self, key_id: str, per_minute: int, now: float) -> int:
        """GCRA: admit one request and return how many more would be admitted right now, or raise RateLimited
        with the time until one would be. Bursts of up to `per_minute` requests pass; the sustained rate is
        `per_minute` per 60 s."""

    @abc.abstractmethod
    async def close(self) -> None: ...


def gcra(tat: float | None, per_minute: int, now: float) -> tuple[float | None, float]:
    """(new theoretical arrival time or None if refused, seconds to wait when refused). Shared by the backends'
    reference implementation and tests; the Redis script computes the same."""
    interval = 60.0 / per_minute
    tolerance = 60.0 - interval
    tat = max(tat or now, now)
    if tat - now > tolerance:
        return None, tat - now - tolerance
    return tat + interval, 0.0


def gcra_remaining(tat: float, per_minute: int, now: float) -> int:
    """Requests that would still be admitted at `now` after the one that set `tat`."""
    interval = 60.0 / per_minute
    return max(int((now + 60.0 - tat) / interval + 1e-9), 0)


def open_ledger(url: str) -> Ledger:
    """`sqlite:///PATH`, `redis://HOST:PORT/DB`, or `rediss://` for Redis over TLS."""
    if url.startswith("sqlite:///"):
        from runtime.accounts.sqlite_ledger import SqliteLedger

        return SqliteLedger(url.removeprefix("sqlite:///"))
    if url.startswith(("redis://", "rediss://")):
        from runtime.accounts.redis_ledger import RedisLedger

        return RedisLedger(url)
    raise ValueError(f"auth db {url!r}: expected sqlite:///PATH, redis://HOST:PORT/DB or rediss://HOST:PORT/DB")
