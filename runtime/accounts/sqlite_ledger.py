"""The embedded ledger: one SQLite file in WAL mode. Every operation is one `BEGIN IMMEDIATE` transaction, so
servers sharing the file (on one host) serialize on its write lock and never overdraw a key.

A transaction first runs right on the event loop with a lock wait of zero: uncontended, it takes about 0.1 ms,
less than handing it to a thread and back. If another process holds the write lock, it is retried on the
ledger's worker thread, which waits for the lock, so the event loop never blocks on another server. Reads
(WAL readers never wait) always run on the loop.

Times are the callers' `now` (their process clock): every server sharing the file runs on its host, so they
read one clock. Replicas on several hosts use the Redis ledger, which keeps time on the Redis server."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

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
    gcra,
    gcra_remaining,
    next_reset,
    utc_day,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, tier TEXT NOT NULL, label TEXT NOT NULL,
    created REAL NOT NULL, revoked REAL);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL, day TEXT NOT NULL, spent INTEGER NOT NULL DEFAULT 0, granted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, day));
CREATE TABLE IF NOT EXISTS holds (
    hold_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, day TEXT NOT NULL, cost INTEGER NOT NULL,
    expires REAL NOT NULL, state TEXT NOT NULL, created REAL NOT NULL,
    idempotency_key TEXT, request_hash TEXT);
CREATE INDEX IF NOT EXISTS holds_by_key ON holds (key_id, state);
CREATE UNIQUE INDEX IF NOT EXISTS holds_by_idempotency ON holds (key_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS rate (key_id TEXT PRIMARY KEY, tat REAL NOT NULL);
"""


class SqliteLedger(Ledger):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-ledger")
        self._local = threading.local()
        with self._connect() as db:
            db.executescript(SCHEMA)
        self._fast = self._connect(wait_ms=0)

    def _connect(self, wait_ms: int = 30000) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=wait_ms / 1000, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout={wait_ms}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across process crashes, fsync at checkpoints
        return db

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    @staticmethod
    def _tx(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return self._tx(self._fast, fn)
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: self._tx(self._db(), fn))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A single read: no write lock (WAL readers never block the writer or each other)."""
        return fn(self._fast)

    # keys ---------------------------------------------------------------------------------------------------------
    async def add_key(self, key_id: str, secret_hash: str, tier: str, label: str, now: float) -> None:
        await self._run(lambda db: db.execute(
            "INSERT INTO keys (key_id, secret_hash, tier, label, created) VALUES (?, ?, ?, ?, ?)",
            (key_id, secret_hash, tier, label, now)))

    async def get_key(self, key_id: str) -> KeyRecord | None:
        row = await self._read(lambda db: db.execute(
            "SELECT key_id, tier, label, created, revoked, secret_hash FROM keys WHERE key_id = ?", (key_id,)).fetchone())
        return KeyRecord(*row) if row else None

    async def revoke_key(self, key_id: str, now: float) -> bool:
        def tx(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone() is None:
                return False
            db.execute("UPDATE keys SET revoked = ? WHERE key_id = ? AND revoked IS NULL", (now, key_id))
            return True

        return await self._run(tx)

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._read(lambda db: db.execute(
            "SELECT key_id, tier, label, created, revoked FROM keys ORDER BY created, key_id").fetchall())
        return [KeyRecord(*r) for r in rows]

    # credits ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _expire(db: sqlite3.Connection, key_id: str, now: float) -> None:
        db.execute("UPDATE holds SET state = 'expired' WHERE key_id = ? AND state = 'held' AND expires <= ?",
                   (key_id, now))

    @staticmethod
    def _figures(db: sqlite3.Connection, key_id: str, day: str) -> tuple[int, int, int]:
        row = db.execute("SELECT spent, granted FROM usage WHERE key_id = ? AND day = ?", (key_id, day)).fetchone()
        spent, granted = row if row else (0, 0)
        held = db.execute("SELECT COALESCE(SUM(cost), 0) FROM holds WHERE key_id = ? AND day = ? AND state = 'held'",
                          (key_id, day)).fetchone()[0]
        return spent, granted, held

    async def reserve(self, key_id: str, cost: int, daily: int, max_concurrent: int, now: float, ttl: float,
                      idempotency_key: str = "", request_hash: str = "") -> Hold:
        day = utc_day(now)

        def tx(db: sqlite3.Connection) -> Hold:
            self._expire(db, key_id, now)
            if idempotency_key:
                db.execute("DELETE FROM holds WHERE key_id = ? AND idempotency_key = ? AND created <= ?",
                           (key_id, idempotency_key, now - IDEMPOTENCY_WINDOW_S))
                row = db.execute("SELECT hold_id, state, request_hash FROM holds WHERE key_id = ? AND "
                                 "idempotency_key = ?", (key_id, idempotency_key)).fetchone()
                if row:
                    hold_id, state, seen_hash = row
                    if seen_hash != request_hash:
                        raise IdempotencyMismatch(idempotency_key)
                    if state == "held":
                        raise IdempotencyInProgress(idempotency_key)
                    if state == "committed":
                        raise IdempotencyDone(idempotency_key, hold_id)
                    # released or expired: the earlier attempt was refunded, so this one may run
                    db.execute("UPDATE holds SET idempotency_key = NULL WHERE hold_id = ?", (hold_id,))
            running = db.execute("SELECT COUNT(*) FROM holds WHERE key_id = ? AND state = 'held'", (key_id,)).fetchone()[0]
            if running >= max_concurrent:
                raise ConcurrencyLimited(max_concurrent)
            spent, granted, held = self._figures(db, key_id, day)
            remaining = daily + granted - spent - held
            if cost > remaining:
                raise CreditsExhausted(max(remaining, 0), cost)
            hold = Hold(secrets.token_hex(8), key_id, cost, day, now + ttl, remaining - cost)
            db.execute("INSERT INTO holds (hold_id, key_id, day, cost, expires, state, created, idempotency_key, "
                       "request_hash) VALUES (?, ?, ?, ?, ?, 'held', ?, ?, ?)",
                       (hold.hold_id, key_id, day, cost, hold.expires, now, idempotency_key or None, request_hash))
            return hold

        return await self._run(tx)

    async def extend(self, hold_id: str, now: float, ttl: float) -> bool:
        cur = await self._run(lambda db: db.execute(
            "UPDATE holds SET expires = ? WHERE hold_id = ? AND state = 'held' AND expires > ?",
            (now + ttl, hold_id, now)))
        return cur.rowcount == 1

    async def commit(self, hold_id: str, now: float) -> bool:
        def tx(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT key_id, day, cost FROM holds WHERE hold_id = ? AND state = 'held' AND expires > ?",
                             (hold_id, now)).fetchone()
            if row is None:
                return False
            key_id, day, cost = row
            db.execute("UPDATE holds SET state = 'committed' WHERE hold_id = ?", (hold_id,))
            db.execute("INSERT INTO usage (key_id, day, spent) VALUES (?, ?, ?) ON CONFLICT (key_id, day) "
                       "DO UPDATE SET spent = spent + excluded.spent", (key_id, day, cost))
            return True

        return await self._run(tx)

    async def release(self, hold_id: str) -> bool:
        cur = await self._run(lambda db: db.execute(
            "UPDATE holds SET state = 'released' WHERE hold_id = ? AND state = 'held'", (hold_id,)))
        return cur.rowcount == 1

    async def balance(self, key_id: str, daily: int, now: float) -> Balance:
        day = utc_day(now)

        def tx(db: sqlite3.Connection) -> Balance:
            self._expire(db, key_id, now)
            spent, granted, held = self._figures(db, key_id, day)
            return Balance(max(daily + granted - spent - held, 0), spent, held, granted, daily, next_reset(now))

        return await self._run(tx)

    async def grant(self, key_id: str, credits: int, daily: int, now: float) -> Balance | None:
        day = utc_day(now)

        def tx(db: sqlite3.Connection) -> Balance | None:
            if db.execute("SELECT 1 FROM keys WHERE key_id = ?", (key_id,)).fetchone() is None:
                return None
            db.execute("INSERT INTO usage (key_id, day, granted) VALUES (?, ?, ?) ON CONFLICT (key_id, day) "
                       "DO UPDATE SET granted = granted + excluded.granted", (key_id, day, credits))
            self._expire(db, key_id, now)
            spent, granted, held = self._figures(db, key_id, day)
            return Balance(max(daily + granted - spent - held, 0), spent, held, granted, daily, next_reset(now))

        return await self._run(tx)

    # rate ---------------------------------------------------------------------------------------------------------
    async def admit(self, key_id: str, per_minute: int, now: float) -> int:
        def tx(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT tat FROM rate WHERE key_id = ?", (key_id,)).fetchone()
            tat, wait = gcra(row[0] if row else None, per_minute, now)
            if tat is None:
                raise RateLimited(wait, per_minute)
            db.execute("INSERT INTO rate (key_id, tat) VALUES (?, ?) ON CONFLICT (key_id) DO UPDATE SET tat = "
                       "excluded.tat", (key_id, tat))
            return gcra_remaining(tat, per_minute, now)

        return await self._run(tx)

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._fast.close()

    def __repr__(self) -> str:
        return f"SqliteLedger({str(self.path)!r})"
