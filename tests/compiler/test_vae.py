"""`kiln compile --vae PATH` and `--tiny-decoder DIR` (compiler/source/vae.py): real VAE files read exactly, the
bundle compiled with a swapped VAE equals the one compiled from a folder that already has it, TAESD as the VAE
matches diffusers, and files that do not fit fail naming the file and tensor, with nothing published."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from compiler.source.errors import SourceError
from model_store import Manifest, Store, sha256_file
from proto.kiln.v1 import kiln_pb2 as pb
from runtime.pipeline import Pipeline
from runtime.validate import validate
from tests.compiler.vae_files import tiny_vae_config, write_kl, write_single_file, write_taesd
from tests.conftest import VaeFiles, kiln, load_latest


@pytest.fixture(scope="module")
def pipe(tiny_source: Path):  # type: ignore[no-untyped-def]
    from compiler.source.prepare import _load_folder

    return _load_folder(tiny_source)


def _state(module) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def test_swap_reads_a_folder_and_an_fp16_single_file_exactly(pipe, vae_files: VaeFiles) -> None:  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL

    from compiler.source import vae

    own = pipe.vae
    want = _state(AutoencoderKL.from_pretrained(vae_files.kl_folder))
    try:
        info = vae.swap(pipe, vae_files.kl_single)
        got = _state(pipe.vae)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
        assert all(v.dtype == np.float32 for v in got.values())  # fp16 file, upcast for export
        assert info == {"path": str(vae_files.kl_single.resolve()), "layout": "single-file", "class": "AutoencoderKL",
                        "sha256": sha256_file(vae_files.kl_single), "config": "model"}

        info = vae.swap(pipe, vae_files.taesd)
        assert type(pipe.vae).__name__ == "AutoencoderTiny"
        assert info["class"] == "AutoencoderTiny" and info["layout"] == "diffusers-folder"
        assert info["files"]["diffusion_pytorch_model.safetensors"] == \
            sha256_file(vae_files.taesd / "diffusion_pytorch_model.safetensors")
    finally:
        pipe.vae = own


def test_single_file_vae_bundle_equals_the_folder_bundle(vae_store: Path, vae_files: VaeFiles) -> None:
    """The bundle compiled with `--vae FILE` against the one compiled from a diffusers folder that already has that
    VAE: each VAE graph's outputs on the same inputs within the compile's parity threshold, and the final images."""
    swapped, folder = load_latest(vae_store, "swapped"), load_latest(vae_store, "with-vae")
    rng = np.random.default_rng(0)
    feeds = {"vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 9, 7), dtype=np.float32)},
             "vae_encoder": {"sample": rng.uniform(-1, 1, (1, 3, 72, 56)).astype(np.float32)}}
    for name, feed in feeds.items():
        threshold = swapped.manifest.components[name].parity["threshold"]
        a = next(iter(swapped.sessions[name].run(feed).values()))
        b = next(iter(folder.sessions[name].run(feed).values()))
        assert np.abs(a - b).max() <= threshold, name
    # euler: a sampler whose timesteps depend on the scheduler config's defaults, which the rebuild must keep
    request = pb.GenerateRequest(model="m", prompt="a red circle", steps=6, seed=3, width=64, height=64,
                                 sampler="euler")
    images = []
    for model in (swapped, folder):
        params = validate(request, model.manifest.defaults, model.manifest.limits)
        images.append(Pipeline(model).run(params)[0][0])
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 1
    assert images[0].std() > 5
    source = swapped.manifest.source
    assert source["vae"]["sha256"] == sha256_file(vae_files.kl_single) and source["vae"]["layout"] == "single-file"
    assert source["tiny_decoder"]["class"] == "AutoencoderTiny"


def test_taesd_as_the_vae_matches_diffusers(vae_store: Path, vae_files: VaeFiles, tiny_source: Path) -> None:
    """TAESD in place of the VAE: scaling factor 1 (it works on the UNet's latents), and Kiln's image and
    img2img latents match diffusers' pipeline with `pipe.vae = AutoencoderTiny(...)`."""
    import torch
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    model = load_latest(vae_store, "taesd")
    m = model.manifest
    assert m.model["vae_class"] == "AutoencoderTiny" and m.model["vae_scaling_factor"] == 1.0
    assert m.model["decoders"] == {"full": {"component": "vae_decoder", "scaling_factor": 1.0}}
    assert all(c.parity["max_abs_diff"] <= c.parity["threshold"] for c in m.components.values())

    pipe = StableDiffusionPipeline.from_pretrained(tiny_source, safety_checker=None, requires_safety_checker=False)
    pipe.vae = AutoencoderTiny.from_pretrained(vae_files.taesd)
    pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(5).standard_normal((1, 4, 8, 10), dtype=np.float32)
    request = pb.GenerateRequest(model="taesd", prompt="a blue square", width=80, height=64, steps=8, seed=0,
                                 sampler="euler")
    params = validate(request, m.defaults, m.limits)
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.inference_mode():
        ref = pipe(request.prompt, height=64, width=80, num_inference_steps=8, guidance_scale=params.guidance_scale,
                   latents=torch.from_numpy(latents.copy()), output_type="np").images
    ref = (ref * 255).round().astype(np.uint8)
    got = np.stack(Pipeline(model).run(params, latents=latents)[0])
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() <= 1.0 and diff.max() <= 3, (diff.mean(), diff.max())
    assert ref.std() > 5

    # the encoder: TAESD's latents themselves (diffusers' retrieve_latents takes `.latents`, no sampling)
    image = np.random.default_rng(1).uniform(-1, 1, (1, 3, 64, 80)).astype(np.float32)
    noise = lambda k, shape: np.random.default_rng(k).standard_normal(shape, dtype=np.float32)  # noqa: E731
    ours = Pipeline(model).vae_encode(image, noise, 1)
    with torch.inference_mode():
        theirs = pipe.vae.encode(torch.from_numpy(image)).latents.numpy() * pipe.vae.config.scaling_factor
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.fixture(scope="module")
def bad_files(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files `--vae` or `--tiny-decoder` must refuse, each of a different kind."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bad-vae")
    cfg = tiny_vae_config(tiny_source)
    out: dict[str, Path] = {}
    out["random"] = root / "random.safetensors"
    out["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    good = write_single_file(root / "good.safetensors", write_kl(root / "good", cfg, seed=1))
    out["truncated"] = root / "truncated.safetensors"
    out["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    # another architecture's VAE: fits neither the model's VAE config nor SD v1's
    out["wrong_shapes"] = write_single_file(root / "wide.safetensors",
                                            write_kl(root / "wide", {**cfg, "block_out_channels": [16, 32, 32, 48]}, 2))
    out["unknown_layout"] = root / "unknown.safetensors"
    save_file({"model.layers.0.weight": torch.zeros(4, 4), "model.layers.0.bias": torch.zeros(4)},
              str(out["unknown_layout"]))
    out["latent16_folder"] = root / "latent16"
    write_kl(out["latent16_folder"], {**cfg, "latent_channels": 16}, seed=3)
    out["latent16_taesd"] = write_taesd(root / "taesd16", seed=4, latent_channels=16)
    out["not_weights"] = root / "not_weights.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "callback": Path("x")}, out["not_weights"])
    out["kl_as_tiny"] = out["latent16_folder"].with_name("kl-not-tiny")
    shutil.copytree(root / "good", out["kl_as_tiny"])
    return out


BAD = [
    ("random", "not a readable safetensors file"),
    ("truncated", "not a readable safetensors file"),
    ("wrong_shapes", "fits no local AutoencoderKL config: against the model's own VAE config, tensor "
                     "encoder.conv_out.weight has shape [8, 48, 3, 3], the architecture needs [8, 32, 3, 3]; against "
                     "SD v1's"),
    ("unknown_layout", "unknown layout: no encoder.conv_in.weight"),
    ("latent16_folder", "is for 16-channel latents at 1/8 of the image size but the model's UNet works on 4-channel "
                        "latents at 1/8 of the image size: its tensor encoder.conv_out.weight has shape [32, 32, 3, 3], the model "
                        "needs [8, 32, 3, 3]"),
    ("latent16_taesd", "is for 16-channel latents"),
    ("not_weights", "PyTorch's weights_only loader refused it"),
]


@pytest.mark.parametrize(("kind", "message"), BAD)
def test_bad_vae_files_raise_source_error(pipe, bad_files: dict[str, Path], kind: str, message: str) -> None:  # type: ignore[no-untyped-def]
    from compiler.source import vae

    own = pipe.vae
    with pytest.raises(SourceError) as e:
        vae.swap(pipe, bad_files[kind])
    assert str(bad_files[kind]) in str(e.value) and message in str(e.value), str(e.value)
    assert pipe.vae is own


def test_tiny_decoder_must_be_an_autoencoder_tiny_for_the_models_latents(tiny_source: Path,
                                                                         bad_files: dict[str, Path]) -> None:
    from compiler.source import vae

    config = tiny_vae_config(tiny_source)
    with pytest.raises(SourceError, match=r"_class_name='AutoencoderKL' is not one of: AutoencoderTiny"):
        vae.check_tiny_decoder(bad_files["kl_as_tiny"], config)
    with pytest.raises(SourceError, match=r"is for 16-channel latents .* its tensor encoder\.layers\.\d+\.weight has shape \[16, "):
        vae.check_tiny_decoder(bad_files["latent16_taesd"], config)
    with pytest.raises(SourceError, match="not a folder"):
        vae.check_tiny_decoder(bad_files["random"], config)
    with pytest.raises(SourceError, match=r"no config.json; .* looks like a whole pipeline: pass its vae/ folder"):
        vae.check_tiny_decoder(tiny_source, config)


def test_bad_vae_or_tiny_decoder_publishes_nothing(tiny_source: Path, bad_files: dict[str, Path],
                                                   tmp_path: Path) -> None:
    """Through the CLI as a user runs it: exit 5, the file and tensor named, no bundle, no staging left."""
    store = tmp_path / "store"
    r = kiln("compile", str(tiny_source), "--name", "bad", "--store", str(store), "--quiet",
             "--vae", str(bad_files["wrong_shapes"]))
    assert r.returncode == 5, r.stderr
    assert "nothing was published" in r.stderr and str(bad_files["wrong_shapes"]) in r.stderr
    assert "encoder.conv_out.weight" in r.stderr
    r = kiln("compile", str(tiny_source), "--name", "bad", "--store", str(store), "--quiet",
             "--tiny-decoder", str(bad_files["latent16_taesd"]))
    assert r.returncode == 5 and "is for 16-channel latents" in r.stderr, r.stderr
    assert Store(store).versions("bad") == []
    assert not list((store / "bad").iterdir())  # neither the staging folder nor the rebuilt source is left


def test_tiny_decoder_bundle(vae_store: Path) -> None:
    """The tiny decoder beside the full VAE: its own component, fp32, parity checked, listed in `decoders` with
    scaling factor 1 (TAESD decodes the UNet's latents as they are)."""
    m = Manifest.read(Store(vae_store).latest("swapped").path)
    tiny = m.components["vae_decoder_tiny"]
    assert tiny.precision == "fp32" and tiny.inputs == ["latent_sample"] and tiny.outputs == ["sample"]
    assert tiny.parity["max_abs_diff"] <= tiny.parity["threshold"] == m.components["vae_decoder"].parity["threshold"]
    assert m.model["decoders"] == {"full": {"component": "vae_decoder", "scaling_factor": 0.18215},
                                   "tiny": {"component": "vae_decoder_tiny", "scaling_factor": 1.0}}
    files = m.source["tiny_decoder"]["files"]
    assert files["diffusion_pytorch_model.safetensors"] == sha256_file(
        Path(m.source["tiny_decoder"]["path"]) / "diffusion_pytorch_model.safetensors")
