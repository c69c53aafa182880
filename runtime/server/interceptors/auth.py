"""Authentication: every Kiln method needs an API key (`authorization: Bearer KEY` or `x-api-key`); admin
methods need a key of an admin tier. Sets the caller (`context.ACCOUNT`) for the interceptors after it."""

from __future__ import annotations

from typing import Any

from runtime.accounts.accounts import Accounts
from runtime.errors import PermissionDenied, Unauthenticated
from runtime.server.context import ACCOUNT
from runtime.server.interceptors.base import KILN_PREFIX, CheckInterceptor

ADMIN_METHODS = frozenset(KILN_PREFIX + m for m in ("GrantCredits", "CreateKey", "RevokeKey", "LoadModel",
                                                      "UnloadModel"))

_MESSAGES = {
    "MISSING_KEY": "no API key: send `authorization: Bearer KEY` or `x-api-key: KEY` metadata",
    "MALFORMED_KEY": "the API key is not a Kiln key (kiln_<id>_<secret>)",
    "UNKNOWN_KEY": "the API key is not known to this server",
    "REVOKED_KEY": "the API key was revoked",
    "UNKNOWN_TIER": "the API key's tier is not in this server's tiers file",
}


def presented_key(metadata: dict[str, str]) -> str:
    auth = metadata.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return metadata.get("x-api-key", "").strip()


class AuthInterceptor(CheckInterceptor):
    def __init__(self, accounts: Accounts):
        self.accounts = accounts

    async def check(self, method: str, request: Any, metadata: dict[str, str]) -> None:
        token = presented_key(metadata)
        account, reason = await self.accounts.lookup(token) if token else (None, "MISSING_KEY")
        if account is None:
            raise Unauthenticated(_MESSAGES[reason], reason)
        if method in ADMIN_METHODS and not account.tier.admin:
            raise PermissionDenied(f"{method.removeprefix(KILN_PREFIX)} needs an admin key; this key's tier is "
                                   f"{account.tier.name!r}", "ADMIN_ONLY", tier=account.tier.name)
        ACCOUNT.set(account)
