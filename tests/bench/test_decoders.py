"""`python -m bench decoders` at a small size: both decoders exported through Kiln's exporter, measured in child
processes, and the result file's table and ratios."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import decoders, workspace
from bench.__main__ import main


def test_decoders_scenario_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workspace, "WORK", tmp_path / "work")
    out = tmp_path / "decoders.md"
    assert main(["decoders", "--sizes", "64", "--repeats", "1", "--out", str(out)]) == 0
    text = out.read_text()
    rows = {m[0]: m for m in re.findall(r"^\| (full|tiny) \| 64x64 \| ([\d.]+) M \| (\d+) \| (\d+) \|", text, re.M)}
    assert set(rows) == set(decoders.DECODERS), text
    assert float(rows["full"][1]) > 40 and 1.0 < float(rows["tiny"][1]) < 1.5  # SD v1's decoder vs TAESD's
    ratio = re.search(r"^\| 64x64 \| ([\d.]+)x \| ([\d.]+)x \|", text, re.M)
    assert ratio and float(ratio[2]) > 1, text  # the full decoder's weights alone outweigh the tiny one's
    assert not (tmp_path / "work" / "decoders").exists()  # scratch graphs removed
