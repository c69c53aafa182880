"""A ledger per backend: SQLite always; Redis where a `redis-server` binary is available (CI installs one)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.accounts.ledger import Ledger, open_ledger

BACKENDS = ["sqlite", "redis"]


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'auth.db'}"
        return
    if shutil.which("redis-server") is None:
        if os.environ.get("KILN_REQUIRE_REDIS"):
            pytest.fail("redis-server is missing; .ci/run installs it from Debian's packages")
        pytest.skip("redis-server is not installed here")
    from bench.redis_server import RedisServer

    with RedisServer(tmp_path) as server:
        yield server.url


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def with_ledger(url: str, body):  # type: ignore[no-untyped-def]
    ledger: Ledger = open_ledger(url)
    try:
        return await body(ledger)
    finally:
        await ledger.close()
