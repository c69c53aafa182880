"""`python -m bench latency --variants ...` (cold-start mode) end to end on the tiny model, Kiln variants only: the
`+geF` and `+tiny` modifiers reach the worker's requests, `--restart` measures a restart over the caches a first
start wrote, and the report names its model and modifiers. The session's tiny bundle stands in for the bench's
fp32 one; the `+tiny` variant compiles its own (the tiny model with a random TAESD-design decoder)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench import latency, workspace
from bench.__main__ import main
from model_store import Store


def test_latency_cold_modifiers_and_restart(tiny_source: Path, tiny_store: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "tiny-seed0").symlink_to(tiny_source, target_is_directory=True)
    (work / "store").mkdir()
    (work / "store" / "bench-tiny").symlink_to(tiny_store / "tiny", target_is_directory=True)
    monkeypatch.setattr(workspace, "WORK", work)
    out = tmp_path / "latency.md"

    assert main(["latency", "--arch", "tiny", "--size", "64", "--steps", "2", "--repeats", "1", "--restart",
                 "--variants", "kiln-fp32+ge0.5,kiln-fp32+tiny", "--out", str(out)]) == 0

    text = out.read_text()
    assert "Model: `tiny` architecture (random weights), 64x64, 2 steps" in text
    assert "Kiln's cold start is a restart's (`--restart`)" in text
    assert "`+geF`: classifier-free guidance on the first F" in text and "`+tiny`: the tiny" in text
    for v in ("kiln-fp32+ge0.5", "kiln-fp32+tiny"):
        assert re.search(rf"^\| Kiln `{re.escape(v)}` \| [\d.]+ \|", text, re.M), text
        assert re.search(rf"{re.escape(v)}: interpreter [\d.]+, import [\d.]+, load [\d.]+, first_image [\d.]+ "
                         rf"\(first start's load [\d.]+\)", text), text
        result = json.loads((work / "latency" / f"{v}-tiny-64px-2steps-euler.json").read_text())
        # the measured process opened every component from the graph cache its first start wrote
        assert set(result["graph_cache"].values()) == {"hit"}, result["graph_cache"]
        assert result["stages"]["decode"] > 0 and not result["torch_imported"]

    tiny = Store(work / "store").latest("bench-tiny-tiny")
    assert "vae_decoder_tiny" in tiny.manifest.components
    assert "vae_decoder_tiny" not in Store(work / "store").latest("bench-tiny").manifest.components
    assert f"`kiln-fp32+tiny` = bench-tiny-tiny/{tiny.path.name}" in text
    # the two requests differ as the modifiers say: a different decoder draws a different image
    images = [(work / "latency" / f"{v}-tiny-64px-2steps-euler.png").read_bytes()
              for v in ("kiln-fp32+ge0.5", "kiln-fp32+tiny")]
    assert images[0] != images[1]


@pytest.mark.parametrize("variant", ["kiln-fp32+ge0", "kiln-fp32+ge1.5", "kiln-fp32+small", "kiln-int8+gex"])
def test_unknown_modifier_is_refused(variant: str) -> None:
    with pytest.raises(SystemExit, match=r"unknown modifier \+\w.*modifiers: \+geF: .*; \+tiny: "):
        latency._modifiers(variant)


def test_modifiers_parse() -> None:
    assert latency._modifiers("kiln-openvino-int8+ge0.5+tiny") == {"geF": "0.5", "tiny": ""}
    assert latency._base("kiln-openvino-int8+ge0.5+tiny") == "kiln-openvino-int8"
    assert latency._modifiers("kiln-int8") == {}
