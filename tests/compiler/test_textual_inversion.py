"""`kiln compile --embedding`: textual-inversion files in the AUTOMATIC1111 (.pt `string_to_param`, .safetensors
`emb_params`) and diffusers (`learned_embeds.safetensors`) formats, single- and multi-vector, on the tiny model.

The bundle must tokenize and encode prompts with the tokens as diffusers' pipeline does after its own
`load_textual_inversion` (same files, loaded the diffusers way), draw the same image, list the tokens in a real
server's ListModels, and carry the rows in both the fp32 and the int8 embedding tables. Bad files fail the compile
with an error naming the file, and nothing is published.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import save_file

from compiler.compile import compile_model
from compiler.config import CompileConfig
from compiler.source.errors import SourceError
from compiler.source.options import EmbeddingSpec, SourceOptions
from model_store import Manifest, Store
from proto.kiln.v1 import kiln_pb2 as pb
from tests.conftest import kiln, start_server

WIDTH = 32  # the tiny text encoder's hidden size
VOCAB = 49408
# (file, FILE[:TOKEN] suffix, token prompts write, vectors); the order is the order rows are added in
FILES = [
    ("charturner.pt", "", "charturner", 3),  # AUTOMATIC1111 .pt: named after the file, as AUTOMATIC1111 does
    ("easyneg.safetensors", ":neg-style", "neg-style", 2),  # AUTOMATIC1111 .safetensors, token given
    ("learned_embeds.safetensors", "", "<cat-toy>", 1),  # diffusers: the file's own token
]
PROMPTS = [
    "a charturner portrait of a <cat-toy> on a table",
    "<cat-toy>, charturner, neg-style",
    "a red circle on a blue background",  # no tokens: unchanged by the added ones
]


def _vectors(seed: int, n: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real files in each format, and the vectors written into them."""
    d = tmp_path_factory.mktemp("embeddings")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(_vectors(1, 3))},
                "name": "charturner-v2", "step": 1500, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "v1-5"},
               d / "charturner.pt")
    save_file({"emb_params": _vectors(2, 2)}, d / "easyneg.safetensors")
    save_file({"<cat-toy>": _vectors(3, 1)[0]}, d / "learned_embeds.safetensors")
    return {name: d / name for name, *_ in FILES}


def _expected_rows() -> np.ndarray:
    return torch.cat([_vectors(1, 3), _vectors(2, 2), _vectors(3, 1)]).numpy()


@pytest.fixture(scope="module")
def ti_store(tiny_source: Path, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("ti-store")
    options = SourceOptions(embeddings=[EmbeddingSpec.parse(f"{files[name]}{suffix}") for name, suffix, *_ in FILES])
    compile_model(tiny_source, store, CompileConfig(name="ti"), progress=False, options=options)
    return store


@pytest.fixture(scope="module")
def ti_model(ti_store: Path):  # type: ignore[no-untyped-def]
    from runtime.model import load_bundle

    return load_bundle(Store(ti_store).latest("ti"))


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_source: Path, files: dict[str, Path]):  # type: ignore[no-untyped-def]
    """diffusers' pipeline with the same files loaded its own way."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_source, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(files["charturner.pt"]), token="charturner")
    pipe.load_textual_inversion(str(files["easyneg.safetensors"]), token="neg-style")
    pipe.load_textual_inversion(str(files["learned_embeds.safetensors"]))
    return pipe


def _table(bundle: Path, rows: int) -> dict[str, np.ndarray]:
    """The text encoder's initializers with `rows` rows (the token table, and in int8 bundles its scales)."""
    model = onnx.load(str(bundle / "text_encoder.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.dims and t.dims[0] == rows}


def test_manifest_records_each_embedding(ti_store: Path, files: dict[str, Path]) -> None:
    m = Store(ti_store).latest("ti").manifest
    added = m.source["embeddings"]
    assert [(e["file"], e["token"], e["vectors"]) for e in added] == [(f, t, n) for f, _, t, n in FILES]
    assert [e["format"] for e in added] == ["automatic1111-pt", "automatic1111-safetensors", "diffusers"]
    for e in added:
        assert e["sha256"] == hashlib.sha256(files[e["file"]].read_bytes()).hexdigest()
    assert added[0]["tokens"] == ["charturner", "charturner_1", "charturner_2"]
    assert [i for e in added for i in e["token_ids"]] == list(range(VOCAB, VOCAB + 6))
    assert m.tokenizer["embeddings"] == [
        {"token": "charturner", "tokens": ["charturner", "charturner_1", "charturner_2"]},
        {"token": "neg-style", "tokens": ["neg-style", "neg-style_1"]},
        {"token": "<cat-toy>", "tokens": ["<cat-toy>"]},
    ]


def test_fp32_table_holds_the_vectors(ti_store: Path) -> None:
    tables = _table(Store(ti_store).latest("ti").path, VOCAB + 6)
    (table,) = tables.values()
    np.testing.assert_array_equal(table[VOCAB:], _expected_rows())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_text_embeddings_match_diffusers(ti_model, diffusers_pipe, prompt: str) -> None:  # type: ignore[no-untyped-def]
    expanded = diffusers_pipe.maybe_convert_prompt(prompt, diffusers_pipe.tokenizer)
    ref_ids = diffusers_pipe.tokenizer(expanded, padding="max_length", max_length=77, truncation=True).input_ids
    ids = ti_model.tokenizer(prompt).ids
    assert ids.tolist() == ref_ids
    if prompt != PROMPTS[-1]:
        assert set(ids.tolist()) & set(range(VOCAB, VOCAB + 6))
    with torch.inference_mode():
        ref, _ = diffusers_pipe.encode_prompt(prompt, "cpu", 1, False)
    got = ti_model.sessions["text_encoder"].run({"input_ids": ids[None]})["last_hidden_state"]
    threshold = ti_model.manifest.components["text_encoder"].parity["threshold"]
    assert np.abs(got - ref.numpy()).max() <= threshold


def test_tokens_match_in_any_case_and_leave_other_words_alone(ti_model, tiny_model) -> None:  # type: ignore[no-untyped-def]
    """By id, so `CharTurner` expands like `charturner` (diffusers' string replace misses other cases)."""
    assert ti_model.tokenizer("a CharTurner cat").ids.tolist() == ti_model.tokenizer("a charturner cat").ids.tolist()
    assert ti_model.tokenizer("a charturner cat").kept_tokens == 2 + 3
    plain = "a photo of an astronaut riding a horse, concatenated words, 4k"
    assert ti_model.tokenizer(plain).ids.tolist() == tiny_model.tokenizer(plain).ids.tolist()
    assert ti_model.tokenizer.embedding_tokens == ["charturner", "neg-style", "<cat-toy>"]


def test_image_matches_diffusers(ti_model, diffusers_pipe) -> None:  # type: ignore[no-untyped-def]
    from diffusers import EulerDiscreteScheduler

    from runtime.pipeline import Pipeline
    from runtime.validate import validate

    prompt, negative = PROMPTS[0], "neg-style"
    diffusers_pipe.scheduler = EulerDiscreteScheduler.from_config(diffusers_pipe.scheduler.config)
    latents = np.random.default_rng(5).standard_normal((1, 4, 8, 8), dtype=np.float32)
    with torch.inference_mode():
        ref = diffusers_pipe(prompt, negative_prompt=negative, height=64, width=64, num_inference_steps=12,
                             guidance_scale=7.5, latents=torch.from_numpy(latents.copy()), output_type="np").images
    ref = (ref * 255).round().astype(np.uint8)
    request = pb.GenerateRequest(model="ti", prompt=prompt, negative_prompt=negative, width=64, height=64, steps=12,
                                 guidance_scale=7.5, sampler="euler", seed=0)
    params = validate(request, ti_model.manifest.defaults, ti_model.manifest.limits)
    images, _ = Pipeline(ti_model).run(params, latents=latents)
    diff = np.abs(np.stack(images).astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() <= 1.0 and diff.max() <= 3, (diff.mean(), diff.max())
    assert ref.std() > 5
    # the tokens changed the image: without them (their words dropped) it differs
    plain = validate(pb.GenerateRequest(model="ti", prompt="a portrait of a on a table", width=64, height=64,
                                        steps=12, guidance_scale=7.5, sampler="euler", seed=0),
                     ti_model.manifest.defaults, ti_model.manifest.limits)
    other, _ = Pipeline(ti_model).run(plain, latents=latents)
    assert np.abs(other[0].astype(np.int16) - images[0].astype(np.int16)).mean() > 1.0


def test_list_models_lists_the_tokens(ti_store: Path, tmp_path: Path) -> None:
    from runtime.client import list_models

    server = start_server(ti_store, tmp_path / "serve.log")
    try:
        (info,) = list_models(server.target).models
        assert info.name == "ti"
        assert list(info.embedding_tokens) == ["charturner", "neg-style", "<cat-toy>"]
        listed = kiln("models", "list", "--target", server.target)
        assert listed.returncode == 0 and "\tembeddings charturner neg-style <cat-toy>" in listed.stdout, listed
    finally:
        assert server.stop() == 0


def test_int8_compile_through_the_cli(tiny_source: Path, files: dict[str, Path], tmp_path: Path) -> None:
    """`kiln compile --embedding ... --precision text_encoder=int8`: the rows are in the int8 table, within half a
    step of each row's scale."""
    store = tmp_path / "store"
    r = kiln("compile", str(tiny_source), "--name", "ti8", "--store", str(store), "--precision", "text_encoder=int8",
             "--embedding", str(files["charturner.pt"]), "--embedding", f"{files['easyneg.safetensors']}:neg-style",
             "--calibration-prompts", "1", "--fidelity-prompts", "1", "--weight-min-elements", "0",
             "--min-psnr", "15", "--default-steps", "4", "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr
    ref = Store(store).latest("ti8")
    assert ref.manifest.precision["text_encoder"] == "int8"
    assert [e["token"] for e in ref.manifest.tokenizer["embeddings"]] == ["charturner", "neg-style"]
    tables = _table(ref.path, VOCAB + 5)
    (q,) = (v for k, v in tables.items() if k.endswith("_int8"))
    (scale,) = (v for k, v in tables.items() if k.endswith("_int8_scale"))
    assert q.dtype == np.int8 and scale.shape == (VOCAB + 5, 1)
    rows = q[VOCAB:].astype(np.float32) * scale[VOCAB:]
    want = _expected_rows()[:5]
    assert np.all(np.abs(rows - want) <= scale[VOCAB:] / 2 + 1e-7)
    assert np.abs(want).max() > 0.05  # rows of real size, not zeros


def _bad_files(d: Path) -> dict[str, tuple[str, str]]:
    """case -> (FILE[:TOKEN], what the error must say)."""
    torch.save({"string_to_param": {"*": _vectors(4, 2, width=64)}, "name": "sd2-style"}, d / "sd2-style.pt")
    save_file({"masterpiece": _vectors(5, 1)[0]}, d / "learned_embeds.safetensors")
    save_file({"emb_params": _vectors(6, 4)}, d / "whole.safetensors")
    (d / "truncated.safetensors").write_bytes((d / "whole.safetensors").read_bytes()[:-40])
    torch.save({"string_to_param": {"*": _vectors(11, 2)}, "name": "cut"}, d / "whole.pt")
    (d / "cut.pt").write_bytes((d / "whole.pt").read_bytes()[:600])
    (d / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.getcwd, ())

    torch.save({"string_to_param": {"*": _vectors(7, 1)}, "hook": Payload()}, d / "pickle.pt")
    save_file({"clip_l": _vectors(8, 2, width=768), "clip_g": _vectors(9, 2, width=1280)}, d / "sdxl.safetensors")
    save_file({"emb_params": _vectors(10, 1)}, d / "twin.safetensors")
    return {
        "another width": (str(d / "sd2-style.pt"), r"sd2-style\.pt: vectors of shape \[2, 64\] do not fit .* 32 wide"),
        "token in the vocabulary": (str(d / "learned_embeds.safetensors"),
                                    r"learned_embeds\.safetensors: token 'masterpiece' is already in the tokenizer's "
                                    r"vocabulary \(as 'masterpiece</w>'\)"),
        "special token": (f"{d / 'twin.safetensors'}:<|endoftext|>", r"twin\.safetensors: token '<\|endoftext\|>' is "
                          "already in the tokenizer's vocabulary"),
        "truncated": (str(d / "truncated.safetensors"), r"truncated\.safetensors: not a readable safetensors file"),
        "truncated .pt": (str(d / "cut.pt"), r"cut\.pt: not a readable PyTorch file"),
        "random bytes": (str(d / "noise.pt"), r"noise\.pt: not a readable PyTorch file"),
        "pickle that is not weights": (str(d / "pickle.pt"), r"pickle\.pt: a pickle that is not plain weights; "
                                       r"PyTorch's weights_only loader refused it .*getcwd"),
        "sdxl": (str(d / "sdxl.safetensors"), r"sdxl\.safetensors: keys \['clip_g', 'clip_l'\] .* SDXL embedding"),
        "same token twice": (f"{d / 'twin.safetensors'}:charturner", r"twin\.safetensors: token 'charturner' is "
                             r"also added by .*charturner\.pt"),
    }


BAD = ["another width", "token in the vocabulary", "special token", "truncated", "truncated .pt", "random bytes",
       "pickle that is not weights", "sdxl", "same token twice"]


@pytest.mark.parametrize("case", BAD)
def test_bad_file_fails_and_publishes_nothing(case: str, tiny_source: Path, files: dict[str, Path],
                                              tmp_path: Path) -> None:
    arg, message = _bad_files(tmp_path)[case]
    store = tmp_path / "store"
    specs = [EmbeddingSpec.parse(str(files["charturner.pt"])), EmbeddingSpec.parse(arg)]
    with pytest.raises(SourceError, match=message):
        compile_model(tiny_source, store, CompileConfig(name="bad"), progress=False,
                      options=SourceOptions(embeddings=specs))
    assert Store(store).refs("bad") == []
    assert [p for p in store.rglob("*") if p.is_file()] == []  # no staging or prepared-source leftovers


def test_cli_reports_a_bad_file(tiny_source: Path, tmp_path: Path) -> None:
    (tmp_path / "noise.safetensors").write_bytes(np.random.default_rng(1).bytes(512))
    store = tmp_path / "store"
    r = kiln("compile", str(tiny_source), "--name", "bad", "--store", str(store),
             "--embedding", str(tmp_path / "noise.safetensors"))
    assert r.returncode == 5
    assert "nothing was published" in r.stderr and "noise.safetensors: not a readable safetensors file" in r.stderr
    assert not store.exists() or [p for p in store.rglob("*") if p.is_file()] == []


def test_tokenizer_without_a_listed_token_is_refused(ti_store: Path) -> None:
    """A bundle whose tokenizer lacks a token its manifest lists is refused at load, not served half-working."""
    from runtime.tokenizer import PromptTokenizer

    bundle = Store(ti_store).latest("ti").path
    tok = Manifest.read(bundle).tokenizer
    with pytest.raises(ValueError, match="'<dog-toy>' expands to"):
        PromptTokenizer(bundle / tok["file"], 77, tok["bos_id"], tok["eos_id"], tok["pad_id"],
                        {"<dog-toy>": ["<dog-toy>", "<dog-toy>_1"]})


def test_compile_refuses_a_tokenizer_that_lost_a_token(tiny_bundle: Path) -> None:
    """The compile's last check: the bundle's tokenizer.json must encode each added token as its row's id."""
    from compiler.source.embeddings import tokenizer_section

    lost = [{"file": "charturner.pt", "token": "charturner", "tokens": ["charturner"], "token_ids": [VOCAB]}]
    with pytest.raises(SourceError, match=r"charturner\.pt: .* encodes token 'charturner' as \[\d+(, \d+)+\], not as "
                       r"the id its embedding row was written at \(49408\)"):
        tokenizer_section(tiny_bundle / "tokenizer/tokenizer.json", lost)
