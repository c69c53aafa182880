"""The ledger for several replicas: one Redis server, every credit operation one Lua script (Redis runs a
script atomically, so no two replicas interleave inside one).

Layout (prefix `kiln:`): `key:<id>` hash and `keys` sorted set (by creation) for API keys;
`usage:<id>:<day>` hash (spent, granted); `holds:<id>` sorted set of a key's running holds scored by expiry,
and `hold:<hold id>` hash per hold; `idem:<id>:<idempotency key>` -> "<hold id>|<created>"; `rate:<id>` the
GCRA arrival time. Times come from the caller (the same clock as SQLite's backend), so expiry is decided by
comparing scores with `now`, never by Redis' own TTLs, which only collect garbage long after.
"""

from __future__ import annotations

import secrets
from typing import Any

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
    utc_day,
)

GARBAGE_TTL_S = 3 * 86400
"""Redis-side expiry of holds, usage and idempotency records: cleanup only, well past any use."""

_EXPIRE = """
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

RESERVE = _EXPIRE + """
local kid, cost, daily, maxc = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now, ttl, idem, rhash, day, hid = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local window, gc = tonumber(ARGV[11]), tonumber(ARGV[12])
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
redis.call('HSET', 'kiln:hold:' .. hid, 'key_id', kid, 'day', day, 'cost', cost, 'expires', tostring(expires),
           'state', 'held', 'rhash', rhash)
redis.call('EXPIRE', 'kiln:hold:' .. hid, gc)
redis.call('ZADD', 'kiln:holds:' .. kid, expires, hid)
if idem ~= '' then redis.call('SET', ik, hid .. '|' .. tostring(now), 'EX', gc) end
return {'ok', tostring(remaining - cost)}
"""

EXTEND = """
local hid, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', 'kiln:hold:' .. hid, 'state', 'key_id')
if v[1] ~= 'held' then return 0 end
local score = redis.call('ZSCORE', 'kiln:holds:' .. v[2], hid)
if not score or tonumber(score) <= now then return 0 end
redis.call('ZADD', 'kiln:holds:' .. v[2], now + ttl, hid)
redis.call('HSET', 'kiln:hold:' .. hid, 'expires', tostring(now + ttl))
return 1
"""

COMMIT = """
local hid, now, gc = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
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

BALANCE = _EXPIRE + """
local kid, now, day = ARGV[1], tonumber(ARGV[2]), ARGV[3]
expire_stale(kid, now)
local spent, granted, held = figures(kid, day)
return {spent, granted, held}
"""

GRANT = _EXPIRE + """
local kid, credits, now, day, gc = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
if redis.call('EXISTS', 'kiln:key:' .. kid) == 0 then return {'missing'} end
local usage = 'kiln:usage:' .. kid .. ':' .. day
redis.call('HINCRBY', usage, 'granted', credits)
redis.call('EXPIRE', usage, gc)
expire_stale(kid, now)
local spent, granted, held = figures(kid, day)
return {'ok', spent, granted, held}
"""

ADMIT = """
local kid, per_minute, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local interval = 60.0 / per_minute
local tolerance = 60.0 - interval
local tat = tonumber(redis.call('GET', 'kiln:rate:' .. kid) or '0')
if tat < now then tat = now end
if tat - now > tolerance then return {0, tostring(tat - now - tolerance)} end
redis.call('SET', 'kiln:rate:' .. kid, tostring(tat + interval), 'EX', 120)
return {1, tostring(tat + interval)}
"""

ADD_KEY = """
if redis.call('EXISTS', 'kiln:key:' .. ARGV[1]) == 1 then return 0 end
redis.call('HSET', 'kiln:key:' .. ARGV[1], 'secret_hash', ARGV[2], 'tier', ARGV[3], 'label', ARGV[4], 'created', ARGV[5])
redis.call('ZADD', 'kiln:keys', tonumber(ARGV[5]), ARGV[1])
return 1
"""

REVOKE = """
if redis.call('EXISTS', 'kiln:key:' .. ARGV[1]) == 0 then return 0 end
redis.call('HSETNX', 'kiln:key:' .. ARGV[1], 'revoked', ARGV[2])
return 1
"""


def _num(x: float) -> str:
    return repr(float(x))


class RedisLedger(Ledger):
    def __init__(self, url: str):
        import redis.asyncio as redis

        self.url = url
        self._redis: Any = redis.from_url(url, decode_responses=True)  # str replies (its stubs say bytes | str)
        self._scripts: dict[str, Any] = {
            name: self._redis.register_script(body)
            for name, body in (("reserve", RESERVE), ("extend", EXTEND), ("commit", COMMIT), ("release", RELEASE),
                               ("balance", BALANCE), ("grant", GRANT), ("admit", ADMIT), ("add_key", ADD_KEY),
                               ("revoke", REVOKE))
        }

    async def _call(self, name: str, *args: object) -> Any:
        return await self._scripts[name](args=[str(a) if not isinstance(a, float) else _num(a) for a in args])

    # keys ---------------------------------------------------------------------------------------------------------
    async def add_key(self, key_id: str, secret_hash: str, tier: str, label: str, now: float) -> None:
        if not await self._call("add_key", key_id, secret_hash, tier, label, float(now)):
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
        return bool(await self._call("revoke", key_id, float(now)))

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
        hold_id, day = secrets.token_hex(8), utc_day(now)
        out = await self._call("reserve", key_id, cost, daily, max_concurrent, float(now), float(ttl),
                               idempotency_key, request_hash, day, hold_id, IDEMPOTENCY_WINDOW_S, GARBAGE_TTL_S)
        status = out[0]
        if status == "ok":
            return Hold(hold_id, key_id, cost, day, now + ttl, int(out[1]))
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
        return bool(await self._call("extend", hold_id, float(now), float(ttl)))

    async def commit(self, hold_id: str, now: float) -> bool:
        return bool(await self._call("commit", hold_id, float(now), GARBAGE_TTL_S))

    async def release(self, hold_id: str) -> bool:
        return bool(await self._call("release", hold_id))

    async def balance(self, key_id: str, daily: int, now: float) -> Balance:
        spent, granted, held = (int(x) for x in await self._call("balance", key_id, float(now), utc_day(now)))
        return Balance(max(daily + granted - spent - held, 0), spent, held, granted, daily, next_reset(now))

    async def grant(self, key_id: str, credits: int, daily: int, now: float) -> Balance | None:
        out = await self._call("grant", key_id, credits, float(now), utc_day(now), GARBAGE_TTL_S)
        if out[0] != "ok":
            return None
        spent, granted, held = (int(x) for x in out[1:])
        return Balance(max(daily + granted - spent - held, 0), spent, held, granted, daily, next_reset(now))

    # rate ---------------------------------------------------------------------------------------------------------
    async def admit(self, key_id: str, per_minute: int, now: float) -> int:
        ok, value = await self._call("admit", key_id, per_minute, float(now))
        if not int(ok):
            raise RateLimited(float(value), per_minute)
        return gcra_remaining(float(value), per_minute, now)

    async def close(self) -> None:
        await self._redis.aclose()

    def __repr__(self) -> str:
        return f"RedisLedger({self.url!r})"
