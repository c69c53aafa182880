"""The other source options on SDXL: `--vae` (an fp16-fix style SDXL VAE folder, a single-file SDXL VAE),
`--tiny-decoder` (a TAESDXL-design AutoencoderTiny) and `--embedding` (SDXL textual inversion: `clip_l` and
`clip_g`), against diffusers' SDXL pipeline with the same parts; files of the other family refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from compiler.compile import compile_model
from compiler.config import CompileConfig
from compiler.source.errors import SourceError
from compiler.source.options import EmbeddingSpec, SourceOptions
from model_store import Manifest
from tests.compiler.byom import assert_images_match, diffusers_image, diffusers_pipe, kiln_image
from tests.compiler.vae_files import tiny_vae_config, write_kl, write_single_file, write_taesd

TOKEN = "<xl-style>"
PROMPT = f"a photo of a cat in {TOKEN} style"


def _sdxl_embedding(path: Path, seed: int, vectors: int = 2, widths: tuple[int, int] = (32, 32)) -> Path:
    """An SDXL textual-inversion file as SDXL trainers write it: `clip_l` and `clip_g`, [vectors, width] each."""
    g = torch.Generator().manual_seed(seed)
    save_file({"clip_l": torch.randn(vectors, widths[0], generator=g),
               "clip_g": torch.randn(vectors, widths[1], generator=g)}, str(path))
    return path


@pytest.fixture(scope="module")
def files(tiny_sdxl_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sdxl-files")
    cfg = tiny_vae_config(tiny_sdxl_source)
    assert cfg["scaling_factor"] == 0.13025 and cfg["force_upcast"] is True
    write_kl(d / "fp16-fix-vae", {**cfg, "force_upcast": False}, seed=11)  # what the fp16-fix VAE's config says
    return {"vae": d / "fp16-fix-vae", "taesdxl": write_taesd(d / "taesdxl", seed=12),
            "embedding": _sdxl_embedding(d / "xl-style.safetensors", seed=13)}


@pytest.fixture(scope="module")
def bundle(tiny_sdxl_source: Path, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    options = SourceOptions(vae=str(files["vae"]), tiny_decoder=str(files["taesdxl"]),
                            embeddings=[EmbeddingSpec(str(files["embedding"]), TOKEN)])
    return compile_model(tiny_sdxl_source, tmp_path_factory.mktemp("sdxl-sources"), CompileConfig(name="xl"),
                         progress=False, options=options).path


@pytest.fixture(scope="module")
def reference(tiny_sdxl_source: Path, files: dict[str, Path]):  # type: ignore[no-untyped-def]
    """diffusers' SDXL pipeline with the same VAE and the embedding loaded into both text encoders."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    pipe = diffusers_pipe(tiny_sdxl_source)
    pipe.vae = AutoencoderKL.from_pretrained(files["vae"])
    state = load_file(str(files["embedding"]))
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    return pipe


def test_manifest_records_the_vae_decoders_and_both_tokenizers_embedding(bundle: Path, files: dict[str, Path]) -> None:
    m = Manifest.read(bundle)
    assert m.source["vae"]["path"] == str(files["vae"].resolve())
    assert m.source["tiny_decoder"]["class"] == "AutoencoderTiny"
    # the fp16-fix VAE says it need not be upcast: an fp16 plan may keep it fp16
    assert m.model["vae_force_upcast"] is False
    assert m.model["decoders"] == {"full": {"component": "vae_decoder", "scaling_factor": 0.13025},
                                   "tiny": {"component": "vae_decoder_tiny", "scaling_factor": 1.0}}
    (emb,) = m.source["embeddings"]
    assert emb["format"] == "sdxl" and emb["tokens"] == [TOKEN, f"{TOKEN}_1"] and len(emb["token_ids_2"]) == 2
    want = [{"token": TOKEN, "tokens": [TOKEN, f"{TOKEN}_1"]}]
    assert m.tokenizer["embeddings"] == want and m.tokenizer["second"]["embeddings"] == want


def test_full_decoder_image_with_the_embedding_matches_diffusers(bundle: Path, reference) -> None:  # type: ignore[no-untyped-def]
    latents = np.random.default_rng(8).standard_normal((1, 4, 8, 8), dtype=np.float32)
    got = kiln_image(bundle, latents, PROMPT)
    assert_images_match(got, diffusers_image(reference, latents, PROMPT))
    # the token's vectors matter: without them in the second encoder too, the images part
    plain = kiln_image(bundle, latents, PROMPT.replace(TOKEN, "pencil"))
    assert np.abs(got.astype(int) - plain.astype(int)).mean() > 2


def test_tiny_decoder_image_matches_diffusers_with_taesdxl(bundle: Path, reference, files: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderTiny

    full_vae = reference.vae
    reference.vae = AutoencoderTiny.from_pretrained(files["taesdxl"])
    try:
        latents = np.random.default_rng(9).standard_normal((1, 4, 8, 8), dtype=np.float32)
        got = kiln_image(bundle, latents, PROMPT, decoder="tiny")
        assert_images_match(got, diffusers_image(reference, latents, PROMPT))
    finally:
        reference.vae = full_vae


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_source: Path):  # type: ignore[no-untyped-def]
    from compiler.source.prepare import _load_folder

    return _load_folder(tiny_sdxl_source)


def test_single_file_sdxl_vae_is_read_against_the_models_own_config(pipe, tiny_sdxl_source: Path,  # type: ignore[no-untyped-def]
                                                                      tmp_path: Path) -> None:
    from compiler.source import vae

    fix = write_kl(tmp_path / "kl", {**tiny_vae_config(tiny_sdxl_source), "force_upcast": False}, seed=14)
    path = write_single_file(tmp_path / "sdxl_vae.safetensors", fix, dtype=torch.float16)
    own = pipe.vae
    try:
        info = vae.swap(pipe, path)
        assert info["config"] == "model" and pipe.vae.config.scaling_factor == 0.13025
        for k, v in fix.state_dict().items():
            assert torch.equal(pipe.vae.state_dict()[k], v.half().float()), k
    finally:
        pipe.vae = own


def test_other_family_vae_and_embeddings_are_refused(pipe, tiny_sdxl_source: Path, tiny_source: Path,  # type: ignore[no-untyped-def]
                                                     tmp_path: Path) -> None:
    from compiler.source import embeddings, vae

    sd_scaled = write_kl(tmp_path / "sd-vae", {**tiny_vae_config(tiny_sdxl_source), "scaling_factor": 0.18215}, 15)
    del sd_scaled
    with pytest.raises(SourceError, match=r"sd-vae: its config scales latents by 0\.18215, the model's VAE by "
                                          r"0\.13025: a VAE for another model family's latent space"):
        vae.swap(pipe, tmp_path / "sd-vae")
    sd1 = tmp_path / "sd1-emb.safetensors"
    save_file({"emb_params": torch.randn(1, 32)}, str(sd1))
    with pytest.raises(SourceError, match=r"sd1-emb\.safetensors: an SDXL model takes SDXL embeddings \(clip_l and "
                                          r"clip_g .*\['emb_params'\]"):
        embeddings.add(pipe, [EmbeddingSpec(str(sd1), "<a>")])
    uneven = tmp_path / "uneven.safetensors"
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(3, 32)}, str(uneven))
    with pytest.raises(SourceError, match=r"uneven\.safetensors: clip_l has 2 vectors, clip_g 3"):
        embeddings.add(pipe, [EmbeddingSpec(str(uneven), "<b>")])
    wide = _sdxl_embedding(tmp_path / "real-size.safetensors", seed=1, widths=(768, 1280))
    with pytest.raises(SourceError, match=r"real-size\.safetensors: vectors of shape \[2, 768\] do not fit"):
        embeddings.add(pipe, [EmbeddingSpec(str(wide), "<c>")])
    # and an SDXL embedding on an SD 1.x model
    from compiler.source.prepare import _load_folder

    with pytest.raises(SourceError, match=r"xl\.safetensors: keys \['clip_g', 'clip_l'\] are an SDXL embedding"):
        embeddings.add(_load_folder(tiny_source), [EmbeddingSpec(str(_sdxl_embedding(tmp_path / "xl.safetensors", 2)),
                                                                 "<d>")])
