"""`python -m bench switch` on tiny bundles: the twin bundle the scenario makes is served as a second model, and
the whole scenario against real servers (a budget that fits one model forces
a load on every switch). The session's compiled tiny bundle stands in for the bench's own, so nothing is compiled."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import switch, workspace
from bench.__main__ import main


@pytest.fixture
def work(tiny_source: Path, tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bench work folder whose store holds the session's tiny bundle as `bench-tiny` (the name the scenario looks
    for; a twin, since a store serves a bundle only under its manifest's name)."""
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "tiny-seed0").symlink_to(tiny_source, target_is_directory=True)
    switch.twin(tiny_bundle, "bench-tiny", store=work / "store")
    monkeypatch.setattr(workspace, "WORK", work)
    return work


def test_twin_is_served_as_a_second_model(work: Path) -> None:
    from model_store import Manifest
    from runtime.model import load_store

    a = workspace.bundle(workspace.source_model("tiny", None), "bench-tiny")
    b = switch.twin(a, "bench-tiny-twin")
    assert b == work / "store" / "bench-tiny-twin" / a.name
    assert Manifest.read(b).name == "bench-tiny-twin" and Manifest.read(b).files == Manifest.read(a).files
    assert switch.twin(a, "bench-tiny-twin") == b  # reused
    models = load_store(work / "store")  # verifies every file of both against their manifests, then opens them
    assert {n: m.name for n, m in models.items()} == {"bench-tiny": "bench-tiny", "bench-tiny-twin": "bench-tiny-twin"}


def test_switch_scenario_small(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "switch.md"

    assert main(["switch", "--arch", "tiny", "--precision", "fp32", "--switches", "2", "--size", "0", "--steps", "2",
                 "--out", str(out)]) == 0

    text = out.read_text()
    assert text.startswith("# Model switch under a memory budget (tiny)") and "- kiln commit: " in text
    assert "ListModels after every request showed only the requested model loaded" in text
    rows = {r[0]: r[1:] for r in re.findall(r"^\| ([a-z, ]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \| ([\d.]+) \| "
                                            r"([\d.]+) \| (\d+) \| ([+-][\d.]+) \| (-?\d+)% \| ([\d.]+) \|$", text, re.M)}
    assert set(rows) == {"budget fits one", "no budget, both loaded"}, text
    switches, switch_s, switch_started, switch_loading, warm_s, warm_started, warm_loading, _, _, rss = \
        rows["budget fits one"]
    assert int(switches) == 2 and float(rss) > 0
    # every switch under the budget loads its model (loading events) before the request starts, no warm one does;
    # loading even a tiny bundle takes longer than the tiny model's text encoder
    assert int(switch_loading) == 2 and int(warm_loading) == 0, text
    assert float(switch_started) > float(warm_started) and float(switch_s) > float(warm_s), text
    assert rows["no budget, both loaded"][3] == rows["no budget, both loaded"][6] == "0", text  # nothing loads
    m = re.search(r"`--memory-budget (\d+)`", text)
    assert m and int(m.group(1)) > 0
