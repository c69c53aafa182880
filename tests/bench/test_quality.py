"""The quality scenario end to end on a small prompt set: shipped shapes model -> compile -> gRPC -> checker."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from bench import quality
from compiler.source.init import PRETRAINED


@pytest.mark.skipif(not (PRETRAINED / "shapes" / "model_index.json").exists(), reason="no shipped shapes weights")
def test_quality_scenario_small_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.workspace.WORK", tmp_path / "work")
    out = tmp_path / "quality.md"
    parser = argparse.ArgumentParser()
    quality.add_args(parser)  # the scenario's own defaults for every option not given here
    engines = "onnxruntime,openvino" if importlib.util.find_spec("openvino") else "onnxruntime"
    args = parser.parse_args(["--steps", "4", "--count", "24", "--seed", "1", "--engine", engines, "--out", str(out)])
    path = quality.run(args)
    text = path.read_text()
    assert path == out and "| shapes fp32, euler, 4 steps |" in text  # the shipped kiln.json's sampler
    if "openvino" in engines:
        assert "| shapes fp32, on OpenVINO (`kiln serve --engine openvino`" in text
    assert len(quality.run.results) == len(engines.split(","))
    for acc in quality.run.results.values():
        # the shipped model follows colours, size and position (chance: 1/8, 1/7, 1/2, 1/3) and the shape kind
        # well above chance (1/3); bench/results/quality.md has the full-size figures
        assert acc["background"] >= 0.9 and acc["color"] >= 0.9, acc
        assert acc["size"] >= 0.8 and acc["position"] >= 0.8, acc
        assert acc["shape"] >= 0.45 and acc["all"] >= 0.4, acc
    with pytest.raises(SystemExit, match="--engine tensorrt: choose from onnxruntime, openvino"):
        quality.run(parser.parse_args(["--engine", "tensorrt", "--out", str(out)]))

def test_prompt_set_is_fixed_and_distinct() -> None:
    a, b = quality.prompt_set(200, 0), quality.prompt_set(200, 0)
    assert a == b and len({scene for scene, _, _ in a}) == 200
    assert len({seed for _, _, seed in a}) == 200
