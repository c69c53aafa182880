"""Helpers for the ledger tests (the per-backend `auth_db` fixture is in tests/conftest.py)."""

from __future__ import annotations

import asyncio

from runtime.accounts.ledger import Ledger, open_ledger


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def with_ledger(url: str, body):  # type: ignore[no-untyped-def]
    ledger: Ledger = open_ledger(url)
    try:
        return await body(ledger)
    finally:
        await ledger.close()
