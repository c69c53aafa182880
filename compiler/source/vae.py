"""Swap a model's VAE (`kiln compile --vae PATH`) and check a tiny decoder (`--tiny-decoder PATH`).

A VAE is a diffusers folder (AutoencoderKL or AutoencoderTiny, the TAESD design, by its config's `_class_name`)
or one `.safetensors` VAE in the original (CompVis) layout, which diffusers' single-file loader reads against a
local config: the model's own VAE config when the file fits it, else SD v1's (compiler/source/configs/sd-v1/vae);
nothing is fetched from a hub. Before any weights load, the VAE's latent space is checked against the model's
(latent channels, and the image-to-latent scale factor the UNet's sizes rest on) and every tensor's shape against
the architecture, so a file that does not fit fails with a SourceError naming it and its first tensor that does
not fit, instead of deep inside diffusers or, worse, as a bundle that draws noise.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.source.errors import SourceError
from compiler.source.init import CONFIGS
from compiler.source.load import VAE_CLASSES
from model_store import sha256_file

SD_VAE_CONFIG = CONFIGS / "sd-v1" / "vae"
"""The shipped config a single-file VAE is read against when it does not fit the model's own VAE."""
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
"""A diffusers VAE folder's weights file, preferred first (`.bin` is read with PyTorch's weights_only loader)."""
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


@dataclass(frozen=True)
class LatentSpace:
    """What a VAE must agree on with the UNet it serves."""

    channels: int
    """Latent channels (SD 1.x/2.x: 4)."""
    scale_factor: int
    """Image pixels per latent pixel, per side (SD: 8)."""

    def __str__(self) -> str:
        return f"{self.channels}-channel latents at 1/{self.scale_factor} of the image size"


def latent_space(config: dict[str, Any]) -> LatentSpace:
    """The latent space a diffusers VAE config (AutoencoderKL or AutoencoderTiny) encodes to and decodes from."""
    cls = config.get("_class_name", "AutoencoderKL")
    channels = int(config.get("latent_channels", 4))
    if cls == "AutoencoderTiny":
        enc = len(config.get("encoder_block_out_channels", (64,) * 4))
        dec = len(config.get("decoder_block_out_channels", (64,) * 4))
        up = int(config.get("upsampling_scaling_factor", 2))
        if 2 ** (enc - 1) != up ** (dec - 1):
            raise SourceError(f"AutoencoderTiny config: its encoder downsamples by {2 ** (enc - 1)} but its decoder "
                              f"upsamples by {up ** (dec - 1)}")
        return LatentSpace(channels, 2 ** (enc - 1))
    return LatentSpace(channels, 2 ** (len(config["block_out_channels"]) - 1))


def swap(pipe: Any, path: Path) -> dict[str, Any]:
    """Replace `pipe.vae` with the VAE at `path` (a diffusers folder or a single file); returns its provenance
    for the manifest: path, layout, class, sha256 (a folder: over its files, each also listed)."""
    path = Path(path)
    own = dict(pipe.vae.config)
    want = latent_space(own)
    if path.is_dir():
        vae, info = load_folder(path, want, VAE_CLASSES)
        _check_scaling(path, dict(vae.config), own)
    else:
        vae, info = load_single_file(path, want, own)
    pipe.vae = vae.eval()
    return info


def _check_scaling(path: Path, new: dict[str, Any], own: dict[str, Any]) -> None:
    """Two AutoencoderKLs with the same shapes but other latent scalings are for different latent spaces (SD
    1.x/2.x's 0.18215, SDXL's 0.13025): the UNet's latents would decode to noise. (TAESD's 1.0 is its own
    design: it decodes the UNet's scaled latents.)"""
    kl = "AutoencoderKL"
    if new.get("_class_name", kl) != kl or own.get("_class_name", kl) != kl:
        return
    got, want = float(new.get("scaling_factor", 0.18215)), float(own.get("scaling_factor", 0.18215))
    if abs(got - want) > 1e-6:
        raise SourceError(f"VAE {path}: its config scales latents by {got}, the model's VAE by {want}: a VAE for "
                          "another model family's latent space (an SD 1.x/2.x VAE on an SDXL model, or the other "
                          "way round?); pass a VAE of the model's family (SDXL: an SDXL VAE such as the fp16-fix one)")


def check_tiny_decoder(path: Path, vae_config: dict[str, Any]) -> dict[str, Any]:
    """Check that `path` is an AutoencoderTiny folder for the latent space of the model whose VAE config is
    `vae_config` (shapes from the file header, no weights loaded); returns its provenance and config."""
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"--tiny-decoder {path}: not a folder; pass a diffusers AutoencoderTiny folder "
                          "(config.json and diffusion_pytorch_model.safetensors), e.g. madebyollin/taesd")
    config = _folder_config(path, ("AutoencoderTiny",))
    _check_latent_space(path, config, latent_space(vae_config))
    weights = _folder_weights(path)
    _check_shapes(weights, _tensor_shapes(weights), _expected_shapes(config))
    return {**_folder_info(path, config), "scaling_factor": float(config.get("scaling_factor", 1.0))}


def load_folder(path: Path, want: LatentSpace, classes: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    """A diffusers VAE folder as an fp32 module, after checking its class, latent space and tensor shapes."""
    import diffusers
    import torch

    config = _folder_config(path, classes)
    _check_latent_space(path, config, want)
    weights = _folder_weights(path)
    _check_shapes(weights, _tensor_shapes(weights), _expected_shapes(config))
    cls = getattr(diffusers, config["_class_name"])
    try:
        vae = cls.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise SourceError(f"VAE {path}: diffusers could not load it: {e}") from None
    return vae, _folder_info(path, config)


def load_single_file(path: Path, want: LatentSpace, own: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A single-file AutoencoderKL in the original layout, read with diffusers' `from_single_file` against the
    first local config it fits: the model's own VAE config (when an AutoencoderKL), then SD v1's."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS, convert_ldm_vae_checkpoint

    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise SourceError(f"VAE {path}: not a folder and not a {'/'.join(SINGLE_FILE_SUFFIXES)} file")
    checkpoint = _read_checkpoint(path)
    prefixes = ("", *LDM_VAE_KEYS)
    if not any(f"{p}encoder.conv_in.weight" in checkpoint for p in prefixes):
        first = next(iter(checkpoint), "none")
        raise SourceError(
            f"VAE {path}: unknown layout: no encoder.conv_in.weight (bare, or under first_stage_model. or vae.), so "
            f"it is not an AutoencoderKL in the original layout (its first tensor: {first}). A TAESD or other "
            "diffusers VAE goes in as a diffusers folder (config.json beside its weights)")
    candidates: list[tuple[str, dict[str, Any]]] = []
    if own.get("_class_name", "AutoencoderKL") == "AutoencoderKL":
        candidates.append(("model", own))
    candidates.append(("sd-v1", json.loads((SD_VAE_CONFIG / "config.json").read_text())))
    problems = []
    for label, config in candidates:
        config = {k: v for k, v in config.items() if not k.startswith("_")} | {"_class_name": "AutoencoderKL"}
        converted = convert_ldm_vae_checkpoint(checkpoint, config)  # diffusers' own original-to-diffusers names
        try:
            _check_latent_space(path, config, want)
            _check_shapes(path, {k: tuple(v.shape) for k, v in converted.items()}, _expected_shapes(config),
                          names=_original_names(converted, checkpoint))
        except SourceError as e:
            problems.append(f"against {LABELS[label]}, {str(e).removeprefix(f'VAE {path}: ')}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            try:
                vae = AutoencoderKL.from_single_file(checkpoint, config=tmp, local_files_only=True,
                                                     torch_dtype=torch.float32)
            except (OSError, ValueError, RuntimeError) as e:
                raise SourceError(f"VAE {path}: diffusers could not load it: {e}") from None
        info = {"path": str(path.resolve()), "layout": "single-file", "class": "AutoencoderKL",
                "sha256": sha256_file(path), "config": label}
        return vae, info
    raise SourceError(f"VAE {path} fits no local AutoencoderKL config: " + "; ".join(problems))


LABELS = {"model": "the model's own VAE config", "sd-v1": "SD v1's (compiler/source/configs/sd-v1/vae)"}


# checks ------------------------------------------------------------------------------------------------------------
def _folder_config(path: Path, classes: tuple[str, ...]) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        hint = f" ({path} looks like a whole pipeline: pass its vae/ folder)" if (path / "vae/config.json").is_file() \
            else ""
        raise SourceError(f"VAE {path}: no config.json; a diffusers VAE folder holds config.json beside "
                          f"diffusion_pytorch_model.safetensors{hint}")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"VAE {file}: not valid JSON ({e})") from None
    cls = config.get("_class_name") if isinstance(config, dict) else None
    if cls not in classes:
        raise SourceError(f"VAE {file}: _class_name={cls!r} is not one of: {', '.join(classes)}")
    return config


def _folder_weights(path: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return path / name
    raise SourceError(f"VAE {path}: no weights; a diffusers VAE folder holds {' or '.join(WEIGHT_NAMES)}")


def _check_latent_space(path: Path, config: dict[str, Any], want: LatentSpace) -> None:
    got = latent_space(config)
    if got.channels != want.channels:
        # the first tensor that says so: one sized by latent_channels, in the architecture built for the model's
        expected = _expected_shapes({**config, "latent_channels": want.channels})
        actual = _expected_shapes(config)
        first = next((n for n in actual if expected.get(n) != actual[n]), "?")
        raise SourceError(f"VAE {path} is for {got} but the model's UNet works on {want}: its tensor {first} has "
                          f"shape {list(actual[first])}, the model needs {list(expected.get(first, ()))}")
    if got.scale_factor != want.scale_factor:
        raise SourceError(f"VAE {path} is for {got} but the model's UNet works on {want}: its config has "
                          f"{_blocks(config)} blocks")


def _blocks(config: dict[str, Any]) -> int:
    return len(config.get("block_out_channels") or config.get("encoder_block_out_channels") or ())


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the architecture `config` describes (built on the meta device: no memory)."""
    import diffusers
    import torch

    cls = getattr(diffusers, config.get("_class_name", "AutoencoderKL"))
    with torch.device("meta"):
        model = cls.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_shapes(file: Path, got: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]],
                  names: dict[str, str] | None = None) -> None:
    """Raise SourceError naming `file` and its first tensor that does not fit `want` (wrong shape, or missing).
    `names` maps a diffusers name to the file's own (original layout) name for the message."""
    names = names or {}
    if not set(got) & set(want):
        first = next(iter(got), "none")
        raise SourceError(f"VAE {file}: unknown layout: none of its {len(got)} tensors is one of the VAE's (first: "
                          f"{first})")
    for name, shape in got.items():
        if name in want and want[name] != shape:
            raise SourceError(f"VAE {file}: tensor {names.get(name, name)} has shape {list(shape)}, the architecture "
                              f"needs {list(want[name])}")
    missing = [n for n in want if n not in got]
    if missing:
        raise SourceError(f"VAE {file}: tensor {missing[0]} is missing ({len(missing)} of {len(want)} missing): "
                          "truncated, or another architecture")


def _original_names(converted: dict[str, Any], checkpoint: dict[str, Any]) -> dict[str, str]:
    """diffusers name -> the checkpoint's own name, matched by tensor identity."""
    by_id = {id(v): k for k, v in checkpoint.items()}
    return {k: by_id[id(v)] for k, v in converted.items() if id(v) in by_id}


# files ---------------------------------------------------------------------------------------------------------------
def _tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a weights file; a safetensors file is read from its header alone."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), "np") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except (SafetensorError, OSError, ValueError) as e:
            raise SourceError(f"VAE {file}: not a readable safetensors file ({e})") from None
    return {k: tuple(v.shape) for k, v in _read_checkpoint(file).items()}


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """Every tensor of a single file, upcast to fp32 (single_file.read_checkpoint reads it: safetensors, or a
    pickle through PyTorch's weights_only loader)."""
    from compiler.source.single_file import read_checkpoint

    tensors = read_checkpoint(path)
    if not tensors:
        raise SourceError(f"VAE {path}: holds no tensors")
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _folder_info(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    files = {str(f.relative_to(path)): sha256_file(f) for f in sorted(path.rglob("*")) if f.is_file()}
    h = hashlib.sha256()
    for rel, digest in files.items():
        h.update(rel.encode() + b"\0" + digest.encode())
    return {"path": str(path.resolve()), "layout": "diffusers-folder", "class": config["_class_name"],
            "sha256": h.hexdigest(), "files": files}
