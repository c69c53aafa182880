"""`python -m bench latency --variants ...` (cold-start mode) on the tiny model, Kiln variants only: `--restart`
measures a restart over the caches a first start wrote, the `+geF` modifier reaches the worker's request, the
`+tiny` modifier compiles with a random TAESD-design decoder that fits the source and draws with it, and the report
names its model and modifiers. Session bundles stand in for the bench's own, so nothing is compiled here."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import kiln_worker, latency, workspace
from bench.__main__ import main
from model_store import Store


def test_restart_cold_start_with_guidance_end(bench_tiny_workspace: Path, tmp_path: Path) -> None:
    work = bench_tiny_workspace
    out = tmp_path / "latency.md"

    assert main(["latency", "--arch", "tiny", "--size", "64", "--steps", "2", "--repeats", "1", "--restart",
                 "--variants", "kiln-fp32+ge0.5", "--out", str(out)]) == 0

    text = out.read_text()
    assert "Model: `tiny` architecture (random weights), 64x64, 2 steps" in text
    assert "Kiln's cold start is a restart's (`--restart`)" in text
    assert "Variant modifiers: `+geF`: classifier-free guidance on the first F" in text
    assert re.search(r"^\| Kiln `kiln-fp32\+ge0\.5` \| [\d.]+ \|", text, re.M), text
    assert re.search(r"kiln-fp32\+ge0\.5: interpreter [\d.]+, import [\d.]+, load [\d.]+, first_image [\d.]+ "
                     r"\(first start's load [\d.]+\)", text), text
    result = json.loads((work / "latency" / "kiln-fp32+ge0.5-tiny-64px-2steps-euler.json").read_text())
    # the measured process opened every component from the graph cache its first start wrote
    assert set(result["graph_cache"].values()) == {"hit"}, result["graph_cache"]
    assert (work / "latency" / "cache-kiln-fp32+ge0.5" / "graphs").is_dir()
    assert result["stages"]["denoise"] > 0 and not result["torch_imported"]
    assert result["first_image_stages"]["denoise"] > 0
    assert re.search(r"^\| Kiln `kiln-fp32\+ge0\.5`, first image \| [\d.]+ \|", text, re.M), text
    assert [p.name for p in (work / "store").iterdir()] == ["bench-tiny"]  # nothing compiled


def test_worker_draws_with_the_decoder_asked_for(vae_store: Path, tmp_path: Path) -> None:
    """kiln_worker --decoder: the tiny decoder of a bundle that has one draws a different image than the full one,
    from the same latents, and much of the time is the decoder's."""
    bundle = Store(vae_store).latest("swapped").path
    latents = tmp_path / "latents.npy"
    np.save(latents, np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32))
    images = {}
    for decoder in ("full", "tiny"):
        out = tmp_path / f"{decoder}.json"
        assert kiln_worker.main(["--bundle", str(bundle), "--size", "64", "--steps", "2", "--latents", str(latents),
                                 "--repeats", "1", "--decoder", decoder, "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["stages"]["decode"] > 0
        images[decoder] = np.asarray(Image.open(result["image"]), dtype=int)
    assert np.abs(images["full"] - images["tiny"]).mean() > 10


def test_tiny_modifier_compiles_a_tiny_decoder_that_fits(tiny_source: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from compiler.source.vae import check_tiny_decoder

    monkeypatch.setattr(workspace, "WORK", tmp_path / "work")
    compiled: list[tuple[str, tuple[str, ...]]] = []
    monkeypatch.setattr(workspace, "bundle", lambda source, name, *flags: compiled.append((name, flags)) or tmp_path)
    args = argparse.Namespace(steps=4, calibration_prompts=2, calibration_size=None, fidelity_size=None)
    latency._kiln_bundle(tiny_source, "tiny", "kiln-int8+ge0.5+tiny", args)
    (name, flags), = compiled
    assert name == "bench-tiny-int8-tiny" and flags[:2] == ("--precision", "int8")
    taesd = Path(flags[flags.index("--tiny-decoder") + 1])
    # a random AutoencoderTiny with as many blocks as the tiny model's VAE: the compiler's own check accepts it
    check_tiny_decoder(taesd, json.loads((tiny_source / "vae" / "config.json").read_text()))
    assert workspace.tiny_decoder(tiny_source) == taesd  # made once, then reused


@pytest.mark.parametrize("variant", ["kiln-fp32+ge0", "kiln-fp32+ge1.5", "kiln-fp32+small", "kiln-int8+gex"])
def test_unknown_modifier_is_refused(variant: str) -> None:
    with pytest.raises(SystemExit, match=r"unknown modifier \+\w.*modifiers: \+geF: .*; \+tiny: "):
        latency._modifiers(variant)


def test_modifiers_parse() -> None:
    assert latency._modifiers("kiln-openvino-int8+ge0.5+tiny") == {"geF": "0.5", "tiny": ""}
    assert latency._base("kiln-openvino-int8+ge0.5+tiny") == "kiln-openvino-int8"
    assert latency._modifiers("kiln-int8") == {}


def test_static_modifier_is_for_openvino_variants(tiny_source: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert latency._modifiers("kiln-openvino-int8+static+ge0.5") == {"static": "", "geF": "0.5"}
    monkeypatch.setattr(workspace, "WORK", tmp_path / "work")
    monkeypatch.setattr(workspace, "source_model", lambda arch, source: tiny_source)
    with pytest.raises(SystemExit, match=r"--variants kiln-int8\+static: \+static is for OpenVINO variants"):
        main(["latency", "--arch", "tiny", "--variants", "kiln-int8+static"])
