"""Rate: each key's Kiln calls per minute (GCRA in the ledger, so replicas share one budget)."""

from __future__ import annotations

from typing import Any

from runtime.accounts.accounts import Accounts
from runtime.accounts.ledger import RateLimited
from runtime.errors import ResourceExhausted
from runtime.server.context import ACCOUNT, RESPONSE_METADATA
from runtime.server.interceptors.base import CheckInterceptor


class RateInterceptor(CheckInterceptor):
    def __init__(self, accounts: Accounts):
        self.accounts = accounts

    async def check(self, method: str, request: Any, metadata: dict[str, str]) -> None:
        account = ACCOUNT.get()
        assert account is not None, "the auth interceptor runs first"
        out = RESPONSE_METADATA.get()
        try:
            left = await self.accounts.ledger.admit(account.key_id, account.tier.requests_per_minute,
                                                    self.accounts.now())
        except RateLimited as e:
            if out is not None:
                out["x-ratelimit-remaining"] = "0"
            raise ResourceExhausted(str(e), "RATE_LIMITED", f"key:{account.key_id}/requests_per_minute",
                                    e.retry_after_s, limit=str(e.per_minute)) from None
        if out is not None:
            out["x-ratelimit-remaining"] = str(left)
