"""`kiln compile --lora FILE[:SCALE]`: kohya and PEFT LoRA files fused before export, against diffusers' own
LoRA loading; LoRAs for another architecture refused by key; the manifest and ListModels list what was fused."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from compiler.compile import compile_model
from compiler.config import CompileConfig
from compiler.source.errors import SourceError
from compiler.source.options import LoraSpec, SourceOptions
from model_store import Manifest, Store, sha256_file
from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from tests.compiler.byom import assert_images_match, diffusers_image, diffusers_pipe, kiln_image
from tests.conftest import kiln, start_server
from tests.lora_files import LOCON_TARGETS, UNET_TARGETS, write_kohya, write_peft

PROMPT = "a small green square, on the left"


@pytest.fixture(scope="module")
def loras(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    (d / "peft").mkdir()
    # rank 4, alpha 2 (not the rank: alpha must be honoured), LoCon convolutions included
    return {"kohya": write_kohya(tiny_source, d / "style-kohya.safetensors", seed=1, rank=4, alpha=2.0,
                                 unet_targets=UNET_TARGETS + LOCON_TARGETS),
            "peft": write_peft(tiny_source, d / "peft", seed=2, rank=4)}


@pytest.fixture(scope="module")
def latents() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)


def _compile(source: Path, store: Path, name: str, *specs: LoraSpec) -> Path:
    return compile_model(source, store, CompileConfig(name=name), progress=False,
                         options=SourceOptions(loras=list(specs))).path


def test_kohya_lora_with_convolutions_matches_diffusers_loading_it(tiny_source: Path, tiny_bundle: Path,
                                                                    loras: dict[str, Path], latents: np.ndarray,
                                                                    tmp_path: Path) -> None:
    kohya = loras["kohya"]
    assert any(k.endswith("conv1.lora_down.weight") for k in load_file(str(kohya)))  # LoCon layers present
    bundle = _compile(tiny_source, tmp_path, "styled", LoraSpec(str(kohya), 0.8))
    m = Manifest.read(bundle)
    (entry,) = m.source["loras"]
    assert entry["sha256"] == sha256_file(kohya) and entry["scale"] == 0.8 and entry["rank"] == 4
    assert entry["convolutions"] > 0 and entry["layers"]["text_encoder"] > 0

    pipe = diffusers_pipe(tiny_source)
    pipe.load_lora_weights(str(kohya), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])  # unfused: diffusers applies the pairs at run time
    got = kiln_image(bundle, latents, PROMPT)
    assert_images_match(got, diffusers_image(pipe, latents, PROMPT))
    base = kiln_image(tiny_bundle, latents, PROMPT)
    assert np.abs(got.astype(int) - base.astype(int)).mean() > 2  # the LoRA changed the picture


def test_two_loras_of_both_formats_fuse_at_their_own_scales(tiny_source: Path, loras: dict[str, Path],
                                                            latents: np.ndarray, tmp_path: Path) -> None:
    bundle = _compile(tiny_source, tmp_path, "two", LoraSpec(str(loras["kohya"]), 0.5),
                      LoraSpec(str(loras["peft"]), -1.0))
    assert [(lo["name"], lo["scale"]) for lo in Manifest.read(bundle).source["loras"]] == \
        [("style-kohya", 0.5), ("pytorch_lora_weights", -1.0)]
    pipe = diffusers_pipe(tiny_source)
    pipe.load_lora_weights(str(loras["kohya"]), adapter_name="a")
    pipe.load_lora_weights(str(loras["peft"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, -1.0])
    assert_images_match(kiln_image(bundle, latents, PROMPT), diffusers_image(pipe, latents, PROMPT))


def test_lora_for_another_architecture_is_refused_by_key(tiny_source: Path, loras: dict[str, Path],
                                                         tmp_path: Path) -> None:
    import torch

    good = load_file(str(loras["kohya"]))
    cases = {}
    key = next(k for k in good if k.endswith("attn2_to_k.lora_down.weight"))
    cases["wider cross-attention"] = ({**good, key: torch.zeros(4, 64)}, r"has shape \[4, 64\], which does not fit")
    cases["a block this model lacks"] = (
        {k.replace("lora_unet_down_blocks_0_", "lora_unet_down_blocks_5_"): v for k, v in good.items()},
        r"LoRA key unet.down_blocks.5.\S+ names no layer of this model's unet")
    cases["SDXL's second text encoder"] = (
        {k.replace("lora_te_", "lora_te2_"): v for k, v in good.items()}, r"LoRA key text_encoder_2\.")
    cases["random bytes"] = (None, r"not a LoRA file diffusers can read")
    cases["no LoRA at all"] = ({"model.weight": torch.ones(2)}, r"holds no LoRA weights")
    for what, (sd, message) in cases.items():
        path = tmp_path / f"{what.replace(' ', '-')}.safetensors"
        if sd is None:
            path.write_bytes(np.random.default_rng(1).bytes(1000))
        else:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        with pytest.raises(SourceError, match=message) as e:
            _compile(tiny_source, tmp_path / "store", "bad", LoraSpec(str(path)))
        assert str(path) in str(e.value), what
        assert Store(tmp_path / "store").versions("bad") == [], what
        assert list((tmp_path / "store/bad").iterdir()) == [], what


def test_list_models_reports_family_and_fused_loras(tiny_source: Path, loras: dict[str, Path],
                                                    tmp_path: Path) -> None:
    from tests.compiler.ldm_layout import to_ldm

    ckpt = tmp_path / "tiny.safetensors"
    save_file(to_ldm(tiny_source), str(ckpt))
    store = tmp_path / "store"
    _compile(ckpt, store, "file-lora", LoraSpec(str(loras["peft"]), 0.6))
    server = start_server(store, tmp_path / "serve.log")
    try:
        with grpc.insecure_channel(server.target) as ch:
            (info,) = pb_grpc.KilnStub(ch).ListModels(pb.ListModelsRequest(), timeout=30).models
        listed = kiln("models", "list", "--target", server.target)
        assert listed.returncode == 0 and "\tfrom tiny\tloras pytorch_lora_weights:0.6" in listed.stdout, listed
    finally:
        server.stop()
    assert info.source_family == "tiny"
    (lora,) = info.fused_loras
    assert (lora.name, lora.sha256, lora.rank) == ("pytorch_lora_weights", sha256_file(loras["peft"]), 4)
    assert lora.scale == pytest.approx(0.6)


def test_a_fused_lora_under_lora_inputs_matches_diffusers(tiny_source: Path, loras: dict[str, Path],
                                                          latents: np.ndarray, tmp_path: Path) -> None:
    """`--lora` and `--lora-inputs` together: the fused style is the base that per-request adapters add to; with
    no adapter selected the image is the fused one."""
    bundle = compile_model(tiny_source, tmp_path, CompileConfig(name="both", lora_inputs=True), progress=False,
                           options=SourceOptions(loras=[LoraSpec(str(loras["kohya"]), 0.5)])).path
    m = Manifest.read(bundle)
    assert m.source["loras"][0]["scale"] == 0.5 and m.limits["max_loras"] == 4
    pipe = diffusers_pipe(tiny_source)
    pipe.load_lora_weights(str(loras["kohya"]), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    assert_images_match(kiln_image(bundle, latents, PROMPT), diffusers_image(pipe, latents, PROMPT))
