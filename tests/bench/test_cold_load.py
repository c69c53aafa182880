"""`python -m bench cold-load` end to end on the tiny model: fresh-process loads on both engines in every situation,
what each hashed, and the result file's rows. The session's compiled tiny bundle stands in for the bench's own, so
nothing is compiled here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import cold_load
from bench.__main__ import main


def test_cold_load_scenario_small(bench_tiny_workspace: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="the openvino rows need the kiln[openvino] extra")
    work = bench_tiny_workspace
    out = tmp_path / "cold.md"

    assert main(["cold-load", "--arch", "tiny", "--precisions", "fp32", "--repeats", "1", "--out", str(out)]) == 0

    text = out.read_text()
    assert text.startswith("# Cold load per precision and engine (tiny)") and "- kiln commit: " in text
    rows = re.findall(r"^\| fp32 \| (\w+) \| ([a-z ()]+) \| ([\d.]+) \| (\d+) of (\d+) \| ([a-z/-]+) \| ([\d.]+) \| "
                      r"([\d.]+) \| ([\d.]+)-([\d.]+) \| (-?[\d.]+) \| (-?[\d.]+) \|$", text, re.M)
    assert {(r[0], r[1]) for r in rows} == {(e, s) for e in cold_load.ENGINES for s in cold_load.SITUATIONS}, text
    files = len(cold_load.bundle_files(cold_load.bundle("tiny", "fp32")))
    for engine, situation, verify, hashed, of, graphs, opened, load, lo, hi, rss, peak in rows:
        assert int(of) == files
        # a cold hash cache hashes every file; a warm one none (the size checks remain)
        assert int(hashed) == (files if situation.startswith("first start") else 0), (engine, situation, hashed)
        # the graph cache: written by a first start, read by a restart or reload, not there without it
        want = "-" if "no graph cache" in situation else "written" if situation == "first start" else "hit"
        assert graphs == want, (engine, situation, graphs)
        assert float(opened) > 0 and abs(float(load) - float(verify) - float(opened)) < 0.015
        assert float(lo) == float(hi) == float(load)  # one repeat
        assert float(peak) >= float(rss)
    assert "[latency-cold-sd-v1.md](latency-cold-sd-v1.md)" in text
    assert [p.name for p in (work / "store").iterdir()] == ["bench-tiny"]  # nothing compiled
