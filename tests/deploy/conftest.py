"""What the deploy tests share: Debian's `haproxy`, required the way tests/conftest.py requires redis-server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import untested_banner

HAPROXY_MISSING = "haproxy is not installed here"
"""The skip reason of every HAProxy test on a machine without haproxy; the run's end counts them."""


def haproxy_binary() -> str:
    """Debian's `haproxy` (in /usr/sbin, which a non-root PATH may lack). Where none is installed: a failure when
    KILN_REQUIRE_HAPROXY is set (`make test` sets it once haproxy is there, after `make haproxy` installed it if it
    could; CI always does), else a skip that the end of the run reports in a banner (`pytest_unconfigure` below)."""
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                             if Path(p).is_file() and os.access(p, os.X_OK)), None)
    if found is None:
        if os.environ.get("KILN_REQUIRE_HAPROXY"):
            pytest.fail("haproxy is missing and KILN_REQUIRE_HAPROXY is set; Debian: apt-get install haproxy "
                        "(`make haproxy`)")
        pytest.skip(HAPROXY_MISSING)
    return found


def pytest_unconfigure(config: pytest.Config) -> None:
    """As tests/conftest.py does for Redis: a passing run that never put replicas behind a real load balancer
    must not look like one that did."""
    untested_banner(config, HAPROXY_MISSING, "THE REPLICAS BEHIND HAPROXY WENT UNTESTED", (
        "haproxy is not installed, so deploy/haproxy.cfg was neither checked",
        "(`haproxy -c`) nor run in front of two `kiln serve` replicas on one Redis (credits across",
        "replicas, a replica killed mid-load, health checks, idempotent retries). Install it (Debian:",
        "sudo apt-get install haproxy, or `make haproxy`) and run `make test` again: it requires HAProxy",
        "once installed, and CI (.ci/run) always does.",
    ))
