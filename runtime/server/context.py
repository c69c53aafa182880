"""Per-RPC context shared between interceptors and the servicer (contextvars follow the RPC's task)."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.accounts.accounts import Account

REQUEST_ID: ContextVar[str] = ContextVar("kiln_request_id", default="")
ACCOUNT: ContextVar[Account | None] = ContextVar("kiln_account", default=None)
"""The authenticated caller (servers with accounts), set by the auth interceptor."""
RESPONSE_METADATA: ContextVar[dict[str, str] | None] = ContextVar("kiln_response_metadata", default=None)
"""Metadata for the response's trailers (x-credits-remaining, ...), filled by the interceptors."""
COST: ContextVar[int] = ContextVar("kiln_cost", default=0)
"""Credits the running Generate costs, set by the quota interceptor (the servicer reports it in Started)."""
