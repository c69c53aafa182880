"""What a server with accounts holds: the ledger, the tiers, the clock and the hold TTL."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runtime.accounts import keys
from runtime.accounts.ledger import KeyRecord, Ledger, open_ledger
from runtime.accounts.tiers import DEFAULT_TIERS, Tier, load_tiers


@dataclass
class AccountsConfig:
    auth_db: str
    """`sqlite:///PATH` (one server, or several on one host) or `redis://HOST:PORT/DB` (several replicas)."""
    tiers_file: Path = DEFAULT_TIERS
    """TOML file of `[tiers.NAME]` tables; the default ships `free`, `pro` and `admin`."""
    hold_ttl_s: float = 60.0
    """How long a reservation outlives its server's last heartbeat (running requests extend theirs every
    third of this); after it the credits of a request whose server died come back."""
    result_cache_bytes: int = 256 << 20
    """Responses of finished requests kept for idempotent retries (per server process); the oldest go first."""
    clock: Callable[[], float] = field(default=time.time, repr=False)
    """This server's Unix time, the `now` it passes to the ledger (tests move it). The SQLite ledger decides hold
    expiry, rates and days with it; the Redis ledger ignores it for the Redis server's clock, which replicas on
    several hosts share."""

    def __post_init__(self) -> None:
        if not self.hold_ttl_s > 0:
            raise ValueError(f"hold_ttl_s={self.hold_ttl_s} must be above 0 seconds")
        if self.result_cache_bytes < 0:
            raise ValueError(f"result_cache_bytes={self.result_cache_bytes} must be 0 or more")


@dataclass(frozen=True)
class Account:
    """The caller of one RPC."""

    key_id: str
    tier: Tier


class Accounts:
    def __init__(self, config: AccountsConfig, ledger: Ledger | None = None):
        self.config = config
        self.tiers = load_tiers(config.tiers_file)
        self.ledger = ledger or open_ledger(config.auth_db)

    def now(self) -> float:
        return self.config.clock()

    async def lookup(self, token: str) -> tuple[Account | None, str]:
        """(the account, "") for a valid key, else (None, why): malformed, unknown, revoked or its tier gone."""
        parsed = keys.parse(token)
        if parsed is None:
            return None, "MALFORMED_KEY"
        key_id, secret = parsed
        record: KeyRecord | None = await self.ledger.get_key(key_id)
        if record is None or not keys.matches(secret, record.secret_hash):
            return None, "UNKNOWN_KEY"
        if record.revoked is not None:
            return None, "REVOKED_KEY"
        tier = self.tiers.get(record.tier)
        if tier is None:
            return None, "UNKNOWN_TIER"
        return Account(key_id, tier), ""

    async def create_key(self, tier: str, label: str = "") -> keys.NewKey:
        if tier not in self.tiers:
            raise ValueError(f"tier {tier!r} is not in {self.config.tiers_file}; tiers: {', '.join(self.tiers)}")
        new = keys.new_key()
        await self.ledger.add_key(new.key_id, new.secret_hash, tier, label, self.now())
        return new

    async def close(self) -> None:
        await self.ledger.close()
