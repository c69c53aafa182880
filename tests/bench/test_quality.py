"""The quality scenario end to end on a small prompt set: shipped shapes model -> compile -> gRPC -> checker."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import quality
from compiler.source.init import PRETRAINED


@pytest.mark.skipif(not (PRETRAINED / "shapes" / "model_index.json").exists(), reason="no shipped shapes weights")
def test_quality_scenario_small_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.workspace.WORK", tmp_path / "work")
    out = tmp_path / "quality.md"
    args = argparse.Namespace(source=None, steps="20", sampler="", guidance=None, count=24, seed=1, out=str(out),
                              precision="fp32")
    path = quality.run(args)
    text = path.read_text()
    assert path == out and "| shapes fp32, dpmpp_2m_karras, 20 steps |" in text
    (acc,) = quality.run.results.values()
    # the shipped model follows the prompt's colours far above chance (1/8 background, 1/7 shape colour);
    # shape kind and position are not learned well enough yet (see bench/results/quality.md)
    assert acc["background"] >= 0.9 and acc["color"] >= 0.35, acc


def test_prompt_set_is_fixed_and_distinct() -> None:
    a, b = quality.prompt_set(200, 0), quality.prompt_set(200, 0)
    assert a == b and len({scene for scene, _, _ in a}) == 200
    assert len({seed for _, _, seed in a}) == 200
