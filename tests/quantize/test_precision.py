"""Parsing `--precision` into a per-component plan, and the compile config around it."""

from __future__ import annotations

import pytest

from compiler.config import CompileConfig
from quantize.config import QuantizeConfig
from quantize.precision import parse


def test_bundle_wide_plans() -> None:
    assert parse("fp32") == dict.fromkeys(("text_encoder", "unet", "vae_decoder", "vae_encoder"), "fp32")
    assert parse("int8") == {"text_encoder": "int8", "unet": "int8", "vae_decoder": "int8?", "vae_encoder": "int8?"}
    assert parse("nf4")["unet"] == "nf4" and parse("int4")["text_encoder"] == "int4"
    assert set(parse("fp16").values()) == {"fp16"}


def test_overrides() -> None:
    assert parse("unet=int8,text_encoder=int8") == {
        "text_encoder": "int8", "unet": "int8", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    assert parse("int8, vae_decoder=fp32")["vae_decoder"] == "fp32"
    assert parse("int8,vae_decoder=int8")["vae_decoder"] == "int8"  # explicit: a requirement, no fallback


@pytest.mark.parametrize(("spec", "message"), [
    ("int3", "precision='int3' is not one of: fp32, int8, nf4, int4, fp16"),
    ("unet=int9", "precision: unet='int9' is not one of"),
    ("unet=int8,unet=fp32", "unet is given twice"),
    ("vae=int8", "component='vae' is not one of: text_encoder, text_encoder_2, unet, vae_decoder, vae_encoder"),
    ("unet=int8,int8", "a bundle-wide precision ('int8') must come first"),
    ("", "is empty"),
])
def test_bad_specs_name_the_value(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(spec)
    with pytest.raises(ValueError):
        CompileConfig(name="x", precision=spec)


def test_hash_tracks_plan_and_quantize_settings() -> None:
    fp32 = CompileConfig(name="x")
    assert fp32.hash() == CompileConfig(name="x", quantize=QuantizeConfig(nf4_block_size=32)).hash()
    int8 = CompileConfig(name="x", precision="int8")
    assert int8.hash() != fp32.hash()
    assert int8.hash() != CompileConfig(name="x", precision="int8", quantize=QuantizeConfig(int8_activations="s8")).hash()
    assert int8.hash() != CompileConfig(name="x", precision="int8", quantize=QuantizeConfig(calibration_size=256)).hash()
    assert int8.hash() != CompileConfig(name="x", precision="int8", quantize=QuantizeConfig(int8_weight_bits=8)).hash()
    # the gate's thresholds decide whether a bundle is published, not what is in it
    assert int8.hash() == CompileConfig(name="x", precision="int8", quantize=QuantizeConfig(min_psnr=40)).hash()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"calibration_prompts": 0}, "calibration_prompts=0 must be between 1 and 256"),
    ({"nf4_block_size": 48}, "nf4_block_size=48 must be one of 16, 32, 64, 128, 256"),
    ({"int8_activations": "u4"}, "int8_activations='u4' is not one of: u8, s8"),
    ({"int8_weight_bits": 4}, "int8_weight_bits=4 is not one of: 7, 8"),
    ({"min_psnr": 0}, "min_psnr=0 must be between 0 and 99 dB"),
    ({"fidelity_prompts": 100}, "fidelity_prompts=100 must be between 1 and 64"),
    ({"calibration_size": 100}, "calibration_size=100 must be a multiple of 8 between 8 and 4096"),
])
def test_quantize_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizeConfig(**kwargs)
