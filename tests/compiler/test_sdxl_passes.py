"""Token merging and attention slicing on SDXL (tiny-sdxl): SDXL's highest-resolution level has no attention, so
ToMe merges at its first level that has (as ToMe for SD does on SD's first); slicing cuts or unpacks every
self-attention; outputs checked on real ONNX Runtime sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.compile import compile_model
from compiler.config import CompileConfig
from compiler.export import SDXL_COMPONENTS, export_component
from compiler.passes import attention_slicing, fusions, tome
from compiler.source import load_source
from model_store import Manifest, Store
from tests.compiler.byom import kiln_image

# tiny-sdxl: transformer blocks at levels 1 and 2 (1 and 2 deep) down, in the mid block, and 3 + 3 up
SIZES = [(16, 24), (8, 8)]  # latent height x width


def feed(h: int, w: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(h * 100 + w)
    return {"sample": rng.standard_normal((2, 4, h, w), dtype=np.float32),
            "timestep": np.array([10, 700], np.int64),
            "encoder_hidden_states": rng.standard_normal((2, 77, 64), dtype=np.float32),
            "text_embeds": rng.standard_normal((2, 32), dtype=np.float32),
            "time_ids": np.array([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w]] * 2, np.float32)}


def run(model: onnx.ModelProto | Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    types = {i.name: np.int64 if i.type == "tensor(int64)" else np.float32 for i in session.get_inputs()}
    return session.run(None, {k: v.astype(types[k]) for k, v in inputs.items()})[0]


def test_tome_merges_sdxls_first_level_with_attention(tiny_sdxl_source: Path) -> None:
    unet = load_source(tiny_sdxl_source).module("unet")
    assert tome.first_attention_downsample(unet) == 2
    with tome.patched(unet, 0.5) as blocks:  # tomesd's default: the latent-size level, which has no attention
        assert blocks == 0
    with tome.patched(unet, 0.5, max_downsample=2) as blocks:
        assert blocks == 1 + 2  # down level 1's transformer block, and the two of the up level of its size


@pytest.fixture(scope="module")
def passes_bundle(tiny_sdxl_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sdxl compiled as `kiln compile --tome 0.5 --attention-slicing auto` ships it."""
    store = tmp_path_factory.mktemp("sdxl-passes")
    return compile_model(tiny_sdxl_source, store, CompileConfig(name="xl-passes", tome=0.5, attention_slicing="auto"),
                         progress=False).path


def test_compile_with_tome_and_slicing_matches_pytorch_and_serves(passes_bundle: Path, tiny_sdxl_store: Path) -> None:
    m = Manifest.read(passes_bundle)
    unet = m.components["unet"]
    assert unet.passes == ["fusions", "tome", "attention_slicing=auto"]
    # the compile's parity check ran the graph against the merged PyTorch UNet
    assert unet.parity["max_abs_diff"] <= unet.parity["threshold"]
    counts = fusions.op_counts(onnx.load(str(passes_bundle / "unet.onnx"), load_external_data=False))
    assert counts.get("ScatterND", 0) > 0  # the merge
    assert "Attention" not in counts and counts["MultiHeadAttention"] > 0  # self-attention on the tiled kernel
    plain = Store(tiny_sdxl_store).latest("tiny-sdxl").path
    for h, w in SIZES:
        got, want = run(passes_bundle / "unet.onnx", feed(h, w)), run(plain / "unet.onnx", feed(h, w))
        diff = np.abs(got - want)
        assert 0 < diff.mean() < 0.2 * np.abs(want).mean()  # merged: close to, not equal to, the full UNet
    latents = np.random.default_rng(2).standard_normal((1, 4, 16, 16), dtype=np.float32)
    image = kiln_image(passes_bundle, latents, "a red circle")
    assert image.shape == (128, 128, 3) and image.std() > 5


def test_plain_sdxl_self_attention_is_sliced_and_keeps_outputs(tiny_sdxl_source: Path, tmp_path: Path) -> None:
    """`--no-fusions --attention-slicing 3`: every self-attention cut in three along its queries, the
    cross-attentions left whole; same outputs at every size."""
    path = export_component(SDXL_COMPONENTS["unet"], load_source(tiny_sdxl_source), tmp_path / "unet.onnx", 17)
    before = onnx.load(str(path))
    sliced, n = attention_slicing.apply(onnx.load(str(path)), 3)
    a, b = fusions.op_counts(before), fusions.op_counts(sliced)
    transformer_blocks = a["Softmax"] // 2  # one self- and one cross-attention each
    assert n == transformer_blocks > 0
    assert b["Softmax"] == 3 * transformer_blocks + transformer_blocks
    for h, w in SIZES:
        np.testing.assert_allclose(run(sliced, feed(h, w)), run(before, feed(h, w)), atol=1e-4, rtol=0)
