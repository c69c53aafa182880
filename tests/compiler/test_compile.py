"""Compile the tiny model: manifest contents, fused op counts, numeric parity, dynamic shapes, atomicity."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.compile import compile_model
from compiler.config import CompileConfig
from compiler.verify import ParityError
from model_store import BundleRef, Manifest, Store, sha256_file


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_manifest_lists_every_file_with_hash_and_size(tiny_bundle: Path, tiny_source: Path) -> None:
    m = Manifest.read(tiny_bundle)
    on_disk = sorted(str(p.relative_to(tiny_bundle)) for p in tiny_bundle.rglob("*") if p.is_file())
    assert sorted(f.path for f in m.files) == [p for p in on_disk if p != "manifest.json"]
    for f in m.files:
        assert sha256_file(tiny_bundle / f.path) == f.sha256
        assert (tiny_bundle / f.path).stat().st_size == f.size
    assert m.opset == 17 and m.onnxruntime_version == ort.__version__
    assert m.precision == {"text_encoder": "fp32", "unet": "fp32", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    assert m.scheduler_config == json.loads((tiny_source / "scheduler/scheduler_config.json").read_text())
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= set(m.tokenizer["files"])
    assert m.defaults["width"] == m.defaults["height"] == 64
    assert len(m.source["sha256"]) == 64 and m.config_hash == CompileConfig(name="x").hash()
    for c in m.components.values():
        assert 0 <= c.parity["max_abs_diff"] < c.parity["threshold"]
        assert c.parity["mean_abs_diff"] <= c.parity["max_abs_diff"]


def test_unet_fusions_use_cpu_attention_kernels_only(tiny_bundle: Path) -> None:
    m = Manifest.read(tiny_bundle)
    ops = m.components["unet"].op_counts
    # tiny UNet: 4 transformer blocks, each with one self-attention and one cross-attention
    assert ops["Attention"] == 4 and ops["MultiHeadAttention"] == 4
    assert ops.get("Softmax", 0) == 0
    assert m.components["text_encoder"].op_counts["SkipLayerNormalization"] == 4
    cuda_only = {"GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv"}
    for name, c in m.components.items():
        assert not cuda_only & set(c.op_counts), name
    model = onnx.load(str(tiny_bundle / "unet.onnx"))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}


def test_fused_unet_matches_unfused_export(tiny_source: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    plain = compile_model(tiny_source, tmp_path, CompileConfig(name="plain", fusions=False), progress=False)
    assert plain.manifest.components["unet"].op_counts.get("Attention", 0) == 0
    fused = BundleRef(tiny_bundle, Manifest.read(tiny_bundle))  # the session's bundle: fusions are the default
    assert fused.manifest.components["unet"].op_counts.get("Attention", 0) > 0
    rng = np.random.default_rng(0)
    feed = {
        "sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
        "timestep": np.array([999.0, 10.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    a = session(plain.path / "unet.onnx").run(None, feed)[0]
    b = session(fused.path / "unet.onnx").run(None, feed)[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("hw", [(8, 8), (9, 10), (16, 12)])
def test_unet_serves_any_latent_size_and_mixed_timesteps(tiny_bundle: Path, tiny_source: Path, hw) -> None:
    import torch

    from compiler.source import load_source

    unet = load_source(tiny_source).module("unet")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, *hw), dtype=np.float32)
    t = np.array([981.0, 500.5, 1.0], dtype=np.float32)
    e = rng.standard_normal((3, 77, 32), dtype=np.float32)
    got = session(tiny_bundle / "unet.onnx").run(None, {"sample": x, "timestep": t, "encoder_hidden_states": e})[0]
    with torch.inference_mode():
        ref = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(e)).sample.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # a batch mixing timesteps equals each sample run alone
    one = session(tiny_bundle / "unet.onnx").run(
        None, {"sample": x[1:2], "timestep": t[1:2], "encoder_hidden_states": e[1:2]})[0]
    np.testing.assert_allclose(got[1:2], one, atol=1e-5)


def test_parity_failure_names_component_and_publishes_nothing(tiny_source: Path, tmp_path: Path) -> None:
    config = CompileConfig(name="strict", parity_threshold={"text_encoder": 1e-12})
    with pytest.raises(ParityError, match=r"text_encoder: .*max_abs_diff=.*allowed maximum is 1e-12"):
        compile_model(tiny_source, tmp_path, config, progress=False)
    assert list((tmp_path / "strict").iterdir()) == []  # staging removed, no version published
    assert Store(tmp_path).versions("strict") == []


def test_bad_config_values_are_named() -> None:
    with pytest.raises(ValueError, match=r"name='Bad Name!' must be"):
        CompileConfig(name="Bad Name!")
    with pytest.raises(ValueError, match=r"opset=12 must be between 17 and 21"):
        CompileConfig(name="ok", opset=12)
    with pytest.raises(ValueError, match=r"precision='int3' is not one of: fp32"):
        CompileConfig(name="ok", precision="int3")


def test_missing_source_parts_are_reported(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks unet, vae, text_encoder, tokenizer, scheduler"):
        compile_model(tmp_path, tmp_path / "store", CompileConfig(name="x"), progress=False)


def test_cli_compile_shows_stages_and_fails_cleanly(tiny_source: Path, tmp_path: Path) -> None:
    from tests.conftest import kiln

    r = kiln("compile", str(tiny_source), "--name", "cli", "--store", str(tmp_path))
    assert r.returncode == 0, r.stderr
    for stage in ("hash source model", "export unet", "optimize unet", "verify unet", "tokenizer and manifest"):
        assert re.search(rf"{stage} done in \d+\.\ds, peak RSS \d+\.\d\d GiB\n", r.stderr), r.stderr
    assert "bundle cli version " in r.stdout and "unet          fp32  max|diff| vs PyTorch" in r.stdout
    r = kiln("compile", str(tiny_source), "--name", "strict", "--store", str(tmp_path),
             "--parity-threshold", "vae_decoder=1e-12", "--quiet")
    assert r.returncode == 3
    assert "compile failed, nothing was published: vae_decoder: ONNX Runtime differs" in r.stderr
    assert Store(tmp_path).versions("strict") == []


def test_request_defaults_come_from_config_then_kiln_json_then_builtin(tiny_source: Path, tmp_path: Path) -> None:
    import shutil

    from compiler.config import SAMPLER_NAMES
    from runtime.samplers import SAMPLERS

    assert set(SAMPLER_NAMES) == set(SAMPLERS)
    src = tmp_path / "src"
    shutil.copytree(tiny_source, src)
    (src / "kiln.json").write_text(json.dumps({"defaults": {"steps": 8, "sampler": "euler_a"}}))
    m = compile_model(src, tmp_path / "s", CompileConfig(name="d", default_steps=12), progress=False).manifest
    assert (m.defaults["steps"], m.defaults["sampler"], m.defaults["guidance_scale"]) == (12, "euler_a", 7.5)
    (src / "kiln.json").write_text(json.dumps({"defaults": {"sampler": "plms"}}))
    with pytest.raises(ValueError, match="default_sampler='plms' is not one of"):
        compile_model(src, tmp_path / "s", CompileConfig(name="e"), progress=False)


def test_tome_and_slicing_switches_change_the_unet_and_the_bundle_identity(tiny_source: Path, tiny_store: Path,
                                                                          tmp_path: Path) -> None:
    """`--tome` and `--attention-slicing` on a real compile: a fresh UNet export (never a donor's plain one),
    the passes recorded, parity verified against the token-merged PyTorch UNet, a new config hash, and a
    bundle whose UNet still serves any size."""
    from runtime.model import load_bundle

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)  # the session's plain fp32 bundle, a donor for what ToMe does not change
    plain = Store(store).latest("tiny").manifest
    merged = compile_model(tiny_source, store, CompileConfig(name="merged", tome=0.5, attention_slicing="auto"),
                           progress=False)
    m = merged.manifest
    unet = m.components["unet"]
    assert unet.passes == ["fusions", "tome", "attention_slicing=auto"]
    assert unet.parity["max_abs_diff"] <= 1e-3
    assert unet.op_counts.get("ScatterElements", 0) > 0 and "Attention" not in unet.op_counts
    assert m.config_hash != plain.config_hash
    assert m.components["text_encoder"].passes == plain.components["text_encoder"].passes  # reused as before
    assert "reused_exports_from" in m.source
    model = load_bundle(Store(store).latest("merged"))
    for hw in ((8, 8), (12, 20)):
        x = np.random.default_rng(0).standard_normal((2, 4, *hw), dtype=np.float32)
        out = model.sessions["unet"].run({"sample": x, "timestep": np.array([999.0, 1.0], np.float32),
                                          "encoder_hidden_states": np.zeros((2, 77, 32), np.float32)})
        assert out["out_sample"].shape == x.shape and np.isfinite(out["out_sample"]).all()
    with pytest.raises(ValueError, match="tome ratio=1.0 must be"):
        CompileConfig(name="x", tome=1.0)
    with pytest.raises(ValueError, match="attention_slicing='many' must be 'auto' or an integer from 2 to 64"):
        CompileConfig(name="x", attention_slicing="many")
