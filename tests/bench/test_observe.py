"""`python -m bench observe` end to end at a tiny size: real `kiln serve` processes (plain, metrics + JSON logs, and
tracing where `kiln serve` has `--otlp-endpoint`), both concurrency levels, the checks on what each server counted
and logged, and the result file's rows. The session's compiled tiny bundle stands in for the bench's own (same
source, same compile settings), so nothing is compiled here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import observe
from bench.__main__ import main


def test_observe_scenario_small(tiny_workspace: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    work = tiny_workspace
    monkeypatch.setattr(observe, "MODEL", "tiny")
    out = tmp_path / "observe.md"

    assert main(["observe", "--clients", "1,2", "--requests", "4", "--rounds", "2", "--block", "1", "--warmup", "1",
                 "--sink-calls", "200", "--scrape-s", "0.2", "--out", str(out)]) == 0

    text = out.read_text()
    assert text.startswith("# Observability overhead") and "- command: `python -m bench " in text
    tracing = "--otlp-endpoint" in observe.serve_flags()
    configs = {observe.PLAIN, observe.CONTROL, observe.METRICS_JSON} | ({observe.TRACING} if tracing else set())
    rows = re.findall(r"^\| (\d) \| ([a-zA-Z +,]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+)? \| "
                      r"([+-][\d.]+)? \| ([\d.]+) \|$", text, re.M)
    assert {(r[0], r[1]) for r in rows} == {(n, c) for n in "12" for c in configs}, text
    for clients, config, requests, p50, p99, added50, added99, cpu in rows:
        assert int(requests) == 4 and 0 < float(p50) <= float(p99) < 10_000, (clients, config, p50, p99)
        assert bool(added50) == bool(added99) == (config != observe.PLAIN)
        assert float(cpu) > 0
    # every server counted (metrics) and logged (access lines) exactly the 1 + 2 + 2 requests of its round
    assert "counted exactly the requests sent (plain: 10, second plain server: 10, metrics + JSON logs: 10" in text, text
    assert re.search(r"A/A control \(second plain server vs plain, the same flags\), 2 clients: p50 [+-][\d.]+ ms, "
                     r"p99 [+-][\d.]+ ms", text), text
    assert re.search(r"metrics \+ JSON logs, 1 client: p50 [+-][\d.]+ ms \((met|missed by [\d.]+ ms)\), p99", text)
    assert ("not measured: `kiln serve` has no `--otlp-endpoint`" in text) != tracing
    # the traced server's spans reached the bench's OTLP receiver (at the latest when it flushed on SIGTERM)
    assert bool(re.search(r"The OTLP receiver took [1-9]\d* export calls", text)) == tracing, text
    sinks = dict(re.findall(r"^\| ([^|]+?) \| ([\d.]+) \|$", text, re.M))
    assert len(sinks) == 4 and all(float(us) > 0 for us in sinks.values()), sinks
    added_us = float(sinks[observe.SINK_BOTH]) - float(sinks[observe.SINK_TEXT])
    m = re.search(r"metrics \+ JSON logs add (-?\d+) µs per request of CPU over plain's text log "
                  r"\((met|missed): -?\d+% of the target\)", text)
    assert m and abs(int(m.group(1)) - added_us) <= 1, text  # the table's figures are rounded
    for r in (1, 2):  # a fresh server per round
        json_log = (work / "observe" / f"metrics-json-logs-round{r}.log").read_text().splitlines()
        assert sum('"logger": "kiln.access"' in line for line in json_log) == 5
    assert not list(work.glob("store/tiny-fp32"))  # nothing compiled
