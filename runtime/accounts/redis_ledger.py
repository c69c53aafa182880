"""The ledger for several replicas: one Redis server, every credit operation one Lua script (Redis runs a
script atomically, so no two replicas interleave inside one).

Layout (prefix `kiln:`): `key:<id>` hash and `keys` sorted set (by creation) for API keys;
`usage:<id>:<day>` hash (spent, granted); `holds:<id>` sorted set of a key's running holds scored by expiry,
and `hold:<hold id>` hash per hold; `idem:<id>:<idempotency key>` -> "<hold id>|<created>"; `rate:<id>` the
GCRA arrival time.

Time is the Redis server's (`TIME` inside every script), never a caller's: replicas run on hosts whose clocks
may disagree, and with callers' clocks a replica running ahead by more than the hold TTL would expire the live
holds of the others, lock them out of the rate budget and count their credits on another UTC day. The `now`
the `Ledger` methods take is ignored here. Expiry is decided by comparing scores with that time, never by
Redis' own TTLs, which only collect garbage long after. Scripts that read `TIME` and then write need effects
replication, the default from Redis 5 on (tested on 7.0).
"""

from __future__ import annotations

import secrets
import urllib.parse
from typing import Any, ClassVar

from runtime.accounts.ledger import (
    IDEMPOTENCY_WINDOW_S,
    Balance,
    ConcurrencyLimited,
    CreditsExhausted,
    Hold,
    IdempotencyDone,
    IdempotencyInProgress,
    IdempotencyMismatch,
    KeyRecord,
    Ledger,
    RateLimited,
    gcra_remaining,
    next_reset,
)

GARBAGE_TTL_S = 3 * 86400
"""Redis-side expiry of holds, usage and idempotency records: cleanup only, well past any use."""

SERVER_CLOCK = """
local function ledger_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""
"""Where every script's `now` comes from: the Redis server's clock, the one all replicas share."""

_LIB = """
local function fmt(t) return string.format('%.6f', t) end
-- the UTC day (YYYY-MM-DD) of Unix time t: days since 1970-01-01 to a Gregorian date (H. Hinnant's
-- civil_from_days), since Redis' Lua has no os.date
local function utc_day(t)
  local z = math.floor(t / 86400) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02d', y, m, d)
end
local function expire_stale(kid, now)
  local holds = 'kiln:holds:' .. kid
  for _, h in ipairs(redis.call('ZRANGEBYSCORE', holds, '-inf', now)) do
    if redis.call('HGET', 'kiln:hold:' .. h, 'state') == 'held' then
      redis.call('HSET', 'kiln:hold:' .. h, 'state', 'expired')
    end
  end
  redis.call('ZREMRANGEBYSCORE', holds, '-inf', now)
end
local function figures(kid, day)
  local u = redis.call('HMGET', 'kiln:usage:' .. kid .. ':' .. day, 'spent', 'granted')
  local held = 0
  for _, h in ipairs(redis.call('ZRANGE', 'kiln:holds:' .. kid, 0, -1)) do
    local v = redis.call('HMGET', 'kiln:hold:' .. h, 'day', 'cost')
    if v[1] == day then held = held + tonumber(v[2]) end
  end
  return tonumber(u[1] or '0'), tonumber(u[2] or '0'), held
end
"""
"""Shared by every script, after the clock. Times go to Redis and back as '%.6f' strings: a Lua number returned
to Redis is cut to an integer, and tostring keeps only 14 digits."""

RESERVE = """
local kid, cost, daily, maxc = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl, idem, rhash, hid = tonumber(ARGV[5]), ARGV[6], ARGV[7], ARGV[8]
local window, gc = tonumber(ARGV[9]), tonumber(ARGV[10])
local now = ledger_now()
local day = utc_day(now)
expire_stale(kid, now)
local ik = 'kiln:idem:' .. kid .. ':' .. idem
if idem ~= '' then
  local prev = redis.call('GET', ik)
  if prev then
    local sep = string.find(prev, '|', 1, true)
    local phid, created = string.sub(prev, 1, sep - 1), tonumber(string.sub(prev, sep + 1))
    if created > now - window then
      local st = redis.call('HMGET', 'kiln:hold:' .. phid, 'state', 'rhash')
      if st[2] ~= rhash then return {'mismatch'} end
      if st[1] == 'held' then return {'in_progress'} end
      if st[1] == 'committed' then return {'done', phid} end
    end
  end
end
if redis.call('ZCARD', 'kiln:holds:' .. kid) >= maxc then return {'concurrency'} end
local spent, granted, held = figures(kid, day)
local remaining = daily + granted - spent - held
if cost > remaining then return {'exhausted', tostring(math.max(remaining, 0))} end
local expires = now + ttl
redis.call('HSET', 'kiln:hold:' .. hid, 'key_id', kid, 'day', day, 'cost', cost, 'expires', fmt(expires),
           'state', 'held', 'rhash', rhash)
redis.call('EXPIRE', 'kiln:hold:' .. hid, gc)
redis.call('ZADD', 'kiln:holds:' .. kid, fmt(expires), hid)
if idem ~= '' then redis.call('SET', ik, hid .. '|' .. fmt(now), 'EX', gc) end
return {'ok', tostring(remaining - cost), fmt(expires), day}
"""

EXTEND = """
local hid, ttl = ARGV[1], tonumber(ARGV[2])
local now = ledger_now()
local v = redis.call('HMGET', 'kiln:hold:' .. hid, 'state', 'key_id')
if v[1] ~= 'held' then return 0 end
local score = redis.call('ZSCORE', 'kiln:holds:' .. v[2], hid)
if not score or tonumber(score) <= now then return 0 end
redis.call('ZADD', 'kiln:holds:' .. v[2], fmt(now + ttl), hid)
redis.call('HSET', 'kiln:hold:' .. hid, 'expires', fmt(now + ttl))
return 1
"""

COMMIT = """
local hid, gc = ARGV[1], tonumber(ARGV[2])
local now = ledger_now()
local v = redis.call('HMGET', 'kiln:hold:' .. hid, 'state', 'key_id', 'day', 'cost')
if v[1] ~= 'held' then return 0 end
local score = redis.call('ZSCORE', 'kiln:holds:' .. v[2], hid)
if not score or tonumber(score) <= now then return 0 end
redis.call('HSET', 'kiln:hold:' .. hid, 'state', 'committed')
redis.call('ZREM', 'kiln:holds:' .. v[2], hid)
local usage = 'kiln:usage:' .. v[2] .. ':' .. v[3]
redis.call('HINCRBY', usage, 'spent', tonumber(v[4]))
redis.call('EXPIRE', usage, gc)
return 1
"""

RELEASE = """
local hid = ARGV[1]
local v = redis.call('HMGET', 'kiln:hold:' .. hid, 'state', 'key_id')
if v[1] ~= 'held' then return 0 end
redis.call('HSET', 'kiln:hold:' .. hid, 'state', 'released')
redis.call('ZREM', 'kiln:holds:' .. v[2], hid)
return 1
"""

BALANCE = """
local kid = ARGV[1]
local now = ledger_now()
expire_stale(kid, now)
local spent, granted, held = figures(kid, utc_day(now))
return {spent, granted, held, fmt(now)}
"""

GRANT = """
local kid, credits, gc = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = ledger_now()
if redis.call('EXISTS', 'kiln:key:' .. kid) == 0 then return {'missing'} end
local day = utc_day(now)
local usage = 'kiln:usage:' .. kid .. ':' .. day
redis.call('HINCRBY', usage, 'granted', credits)
redis.call('EXPIRE', usage, gc)
expire_stale(kid, now)
local spent, granted, held = figures(kid, day)
return {'ok', spent, granted, held, fmt(now)}
"""

ADMIT = """
local kid, per_minute = ARGV[1], tonumber(ARGV[2])
local now = ledger_now()
local interval = 60.0 / per_minute
local tolerance = 60.0 - interval
local tat = tonumber(redis.call('GET', 'kiln:rate:' .. kid) or '0')
if tat < now then tat = now end
if tat - now > tolerance then return {0, fmt(tat - now - tolerance)} end
redis.call('SET', 'kiln:rate:' .. kid, fmt(tat + interval), 'EX', 120)
return {1, fmt(tat + interval), fmt(now)}
"""

ADD_KEY = """
local now = ledger_now()
if redis.call('EXISTS', 'kiln:key:' .. ARGV[1]) == 1 then return 0 end
redis.call('HSET', 'kiln:key:' .. ARGV[1], 'secret_hash', ARGV[2], 'tier', ARGV[3], 'label', ARGV[4], 'created',
           fmt(now))
redis.call('ZADD', 'kiln:keys', fmt(now), ARGV[1])
return 1
"""

REVOKE = """
local now = ledger_now()
if redis.call('EXISTS', 'kiln:key:' .. ARGV[1]) == 0 then return 0 end
redis.call('HSETNX', 'kiln:key:' .. ARGV[1], 'revoked', fmt(now))
return 1
"""

SCRIPTS = {"reserve": RESERVE, "extend": EXTEND, "commit": COMMIT, "release": RELEASE, "balance": BALANCE,
           "grant": GRANT, "admit": ADMIT, "add_key": ADD_KEY, "revoke": REVOKE}


def _num(x: float) -> str:
    return repr(float(x))


TLS_QUERY = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
"""`rediss://HOST:PORT/DB?ssl_ca_certs=CA.pem[&ssl_certfile=C.pem&ssl_keyfile=K.pem]`: the CA the Redis server's
certificate chains to, and a client certificate where it requires one (redis-py takes them as arguments only)."""


def _tls_query(url: str) -> tuple[str, dict[str, str]]:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    tls = {k: v for k, v in query if k in TLS_QUERY}
    if tls and parts.scheme != "rediss":
        raise ValueError(f"{', '.join(tls)} needs a rediss:// URL (Redis over TLS)")
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k not in TLS_QUERY])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), tls


class RedisLedger(Ledger):
    """`Ledger` on one Redis server. Every method's `now` is ignored: the scripts read the server's clock."""

    clock: ClassVar[str] = SERVER_CLOCK
    """Lua defining `ledger_now()`, put before every script so that one place says where time comes from (the
    ledger tests swap it for the caller's `now`, to move time as a real server's clock cannot be moved)."""

    def __init__(self, url: str):
        import redis.asyncio as redis

        self.url = url
        url, tls = _tls_query(url)
        self._redis: Any = redis.from_url(url, decode_responses=True, **tls)  # str replies (its stubs say bytes | str)
        self._scripts: dict[str, Any] = {
            name: self._redis.register_script(self.clock + _LIB + body) for name, body in SCRIPTS.items()}

    def _clock_args(self, now: float) -> tuple[float, ...]:
        """Script arguments that carry the caller's time, after the script's own: none, the server's clock decides."""
        return ()

    async def _call(self, name: str, now: float | None, *args: object) -> Any:
        if now is not None:
            args = (*args, *self._clock_args(now))
        return await self._scripts[name](args=[str(a) if not isinstance(a, float) else _num(a) for a in args])

    # keys ---------------------------------------------------------------------------------------------------------
    async def add_key(self, key_id: str, secret_hash: str, tier: str, label: str, now: float) -> None:
        if not await self._call("add_key", now, key_id, secret_hash, tier, label):
            raise ValueError(f"key id {key_id!r} exists")

    async def get_key(self, key_id: str) -> KeyRecord | None:
        v = await self._redis.hgetall(f"kiln:key:{key_id}")
        return self._record(key_id, v) if v else None

    @staticmethod
    def _record(key_id: str, v: dict[str, str], secret: bool = True) -> KeyRecord:
        revoked = float(v["revoked"]) if v.get("revoked") else None
        return KeyRecord(key_id, v["tier"], v.get("label", ""), float(v["created"]), revoked,
                         v["secret_hash"] if secret else "")

    async def revoke_key(self, key_id: str, now: float) -> bool:
        return bool(await self._call("revoke", now, key_id))

    async def list_keys(self) -> list[KeyRecord]:
        ids = await self._redis.zrange("kiln:keys", 0, -1)
        out = []
        for key_id in ids:
            v = await self._redis.hgetall(f"kiln:key:{key_id}")
            if v:
                out.append(self._record(key_id, v, secret=False))
        return out

    # credits ------------------------------------------------------------------------------------------------------
    async def reserve(self, key_id: str, cost: int, daily: int, max_concurrent: int, now: float, ttl: float,
                      idempotency_key: str = "", request_hash: str = "") -> Hold:
        hold_id = secrets.token_hex(8)
        out = await self._call("reserve", now, key_id, cost, daily, max_concurrent, float(ttl), idempotency_key,
                               request_hash, hold_id, IDEMPOTENCY_WINDOW_S, GARBAGE_TTL_S)
        status = out[0]
        if status == "ok":
            return Hold(hold_id, key_id, cost, out[3], float(out[2]), int(out[1]))
        if status == "exhausted":
            raise CreditsExhausted(int(out[1]), cost)
        if status == "concurrency":
            raise ConcurrencyLimited(max_concurrent)
        if status == "mismatch":
            raise IdempotencyMismatch(idempotency_key)
        if status == "in_progress":
            raise IdempotencyInProgress(idempotency_key)
        if status == "done":
            raise IdempotencyDone(idempotency_key, out[1])
        raise RuntimeError(f"unexpected reply from the reserve script: {out!r}")

    async def extend(self, hold_id: str, now: float, ttl: float) -> bool:
        return bool(await self._call("extend", now, hold_id, float(ttl)))

    async def commit(self, hold_id: str, now: float) -> bool:
        return bool(await self._call("commit", now, hold_id, GARBAGE_TTL_S))

    async def release(self, hold_id: str) -> bool:
        return bool(await self._call("release", None, hold_id))

    async def balance(self, key_id: str, daily: int, now: float) -> Balance:
        spent, granted, held, server_now = await self._call("balance", now, key_id)
        return self._balance(daily, int(spent), int(granted), int(held), float(server_now))

    async def grant(self, key_id: str, credits: int, daily: int, now: float) -> Balance | None:
        out = await self._call("grant", now, key_id, credits, GARBAGE_TTL_S)
        if out[0] != "ok":
            return None
        return self._balance(daily, int(out[1]), int(out[2]), int(out[3]), float(out[4]))

    @staticmethod
    def _balance(daily: int, spent: int, granted: int, held: int, server_now: float) -> Balance:
        return Balance(max(daily + granted - spent - held, 0), spent, held, granted, daily, next_reset(server_now))

    # rate ---------------------------------------------------------------------------------------------------------
    async def admit(self, key_id: str, per_minute: int, now: float) -> int:
        out = await self._call("admit", now, key_id, per_minute)
        if not int(out[0]):
            raise RateLimited(float(out[1]), per_minute)
        return gcra_remaining(float(out[1]), per_minute, float(out[2]))

    async def close(self) -> None:
        await self._redis.aclose()

    def __repr__(self) -> str:
        return f"RedisLedger({self.url!r})"
