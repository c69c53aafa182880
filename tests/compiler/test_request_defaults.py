"""A bundle's request defaults: `--preset turbo`, `--default-size` and kiln.json's `defaults.size` (issue 23)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compiler.compile import compile_model
from compiler.config import PRESETS, CompileConfig
from model_store import Manifest, Store
from tests.conftest import kiln


def test_a_preset_fills_the_defaults_left_unset_and_explicit_ones_win() -> None:
    c = CompileConfig(name="t", preset="turbo")
    assert (c.default_steps, c.default_guidance_scale, c.default_sampler, c.default_size) == (1, 0.0, "turbo", 512)
    c = CompileConfig(name="t", preset="turbo", default_steps=4, default_size=768)
    assert (c.default_steps, c.default_guidance_scale, c.default_sampler, c.default_size) == (4, 0.0, "turbo", 768)
    assert c.to_dict()["preset"] == "turbo"
    assert c.hash() == CompileConfig(name="t").hash()  # defaults do not change the graphs


@pytest.mark.parametrize(("kw", "message"), [
    ({"default_size": 100}, "default_size=100 must be a multiple of 8 between 64 and max_size=1024"),
    ({"default_size": 32}, "default_size=32 must be a multiple of 8 between 64 and max_size=1024"),
    ({"default_size": 1024, "max_size": 768}, "default_size=1024 must be a multiple of 8 between 64 and max_size=768"),
    ({"preset": "fast"}, "preset='fast' is not one of: turbo"),
    ({"preset": "turbo", "default_guidance_scale": 31.0}, "default_guidance_scale=31.0 must be between 0 and 30"),
])
def test_bad_defaults_are_named(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompileConfig(name="t", **kw)


def test_cli_preset_turbo_with_an_override(tiny_source: Path, tmp_path: Path) -> None:
    """`kiln compile --preset turbo --default-steps 2`: the manifest records the preset and the defaults the
    bundle serves with; the compile says them."""
    store = tmp_path / "store"
    r = kiln("compile", str(tiny_source), "--name", "turbo", "--store", str(store), "--preset", "turbo",
             "--default-steps", "2", "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "request defaults: 512x512, turbo, 2 steps, guidance 0 (preset turbo)" in r.stdout
    m = Store(store).latest("turbo").manifest
    assert m.defaults == {"width": 512, "height": 512, "steps": 2, "guidance_scale": 0.0, "sampler": "turbo"}
    assert (m.compile_config["preset"], m.compile_config["default_size"]) == ("turbo", 512)
    # the turbo sampler's 1-4 steps are checked before anything is exported
    r = kiln("compile", str(tiny_source), "--name", "bad", "--store", str(store), "--preset", "turbo",
             "--default-steps", "8")
    assert r.returncode == 2 and "default steps=8 must be between 1 and 4 for default sampler 'turbo'" in r.stderr
    assert "export" not in r.stderr and Store(store).versions("bad") == []


def test_kiln_json_size_then_default_size(tiny_source: Path, tmp_path: Path) -> None:
    """kiln.json's `defaults.size` replaces the UNet's native size (tiny: 64); `default_size` wins over it; a
    size off the 8-pixel grid is refused naming it, and so is an unknown key."""
    src = tmp_path / "src"
    shutil.copytree(tiny_source, src)
    (src / "kiln.json").write_text(json.dumps({"defaults": {"size": 80, "steps": 6}}))
    store = tmp_path / "store"
    m = compile_model(src, store, CompileConfig(name="a"), progress=False).manifest
    assert (m.defaults["width"], m.defaults["height"], m.defaults["steps"]) == (80, 80, 6)
    m = compile_model(src, store, CompileConfig(name="b", default_size=96), progress=False).manifest
    assert (m.defaults["width"], m.defaults["height"], m.defaults["steps"]) == (96, 96, 6)
    assert Manifest.read(Store(store).latest("b").path).limits["min_size"] == 64
    (src / "kiln.json").write_text(json.dumps({"defaults": {"size": 100}}))
    with pytest.raises(ValueError, match="default_size=100 must be a multiple of 8"):
        compile_model(src, store, CompileConfig(name="c"), progress=False)
    (src / "kiln.json").write_text(json.dumps({"defaults": {"size": "512"}}))
    with pytest.raises(ValueError, match="default size='512' must be a whole number of pixels"):
        compile_model(src, store, CompileConfig(name="c"), progress=False)
    (src / "kiln.json").write_text(json.dumps({"defaults": {"width": 512}}))
    with pytest.raises(ValueError, match=r"unknown defaults \['width'\]; allowed: steps, guidance_scale, sampler, "
                                         "size"):
        compile_model(src, store, CompileConfig(name="c"), progress=False)
    assert set(PRESETS["turbo"]) <= set(CompileConfig.__dataclass_fields__)
