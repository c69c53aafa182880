"""`python -m bench gateway` end to end at a tiny size: a real `kiln serve` and `kiln gateway`, every path and
concurrency level measured, and the result file's rows. The session's compiled tiny bundle stands in for the
bench's own (same source, same compile settings), so nothing is compiled here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import gateway as gateway_bench
from bench.__main__ import main


def test_gateway_scenario_small(tiny_workspace: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    work = tiny_workspace
    monkeypatch.setattr(gateway_bench, "MODEL", "tiny")
    out = tmp_path / "gateway.md"

    assert main(["gateway", "--clients", "1,2", "--requests", "4", "--rounds", "2", "--warmup", "1",
                 "--out", str(out)]) == 0

    text = out.read_text()
    assert text.startswith("# Gateway overhead") and "- command: `python -m bench " in text and "- machine: " in text
    rows = re.findall(r"^\| (\d) \| ([a-z_, +]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+)? \| ([\d.]+) \| "
                      r"([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert {(r[0], r[1]) for r in rows} == {(c, p) for c in "12" for p in gateway_bench.PATHS}, text
    for clients, path, requests, p50, p99, added, server, gateway, clients_cpu in rows:
        assert int(requests) == 4 and 0 < float(p50) <= float(p99) < 10_000, (clients, path, p50, p99)
        assert bool(added) == (path != "direct")
        # a generation costs the server tens of ms of CPU (/proc counts 10 ms ticks: a few ms of the gateway's may
        # read as 0 in a run this short); the clients' time is the bench process's own, counted exactly
        assert float(server) > 0 and float(clients_cpu) > 0 and float(gateway) >= 0, text
    for base in ("direct", "direct, omit_progress"):
        assert re.search(rf"vs {base}: 1 client: [+-][\d.]+ ms \((met|missed)\), 2 clients: [+-][\d.]+ ms", text), text
    assert not list(work.glob("store/tiny-fp32")) and len(list((work / "store").iterdir())) == 1  # nothing compiled
