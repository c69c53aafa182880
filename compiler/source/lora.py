"""LoRA files fused into the UNet and text encoder weights before export (`kiln compile --lora FILE[:SCALE]`).

diffusers reads the file (kohya / AUTOMATIC1111 `lora_unet_*` / `lora_te_*` names, SDXL's `lora_te1_*` /
`lora_te2_*` for its two text encoders, LoCon convolutions and `alpha` included, or the diffusers / PEFT layout)
and PEFT fuses it. PEFT skips keys that name no layer of the model without a word, so every low-rank pair is
first checked against the pipeline's modules and shapes: a LoRA for another architecture fails naming its first
key that does not fit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from compiler.source.errors import SourceError
from compiler.source.options import LoraSpec
from model_store import sha256_file

PARTS = ("unet", "text_encoder")
"""Pipeline modules an SD 1.x / 2.x LoRA may change."""
SDXL_PARTS = (*PARTS, "text_encoder_2")
"""An SDXL LoRA's: the second text encoder (OpenCLIP bigG) too."""


def parts(pipe: Any) -> tuple[str, ...]:
    """The modules of `pipe` a LoRA may change."""
    return SDXL_PARTS if getattr(pipe, "text_encoder_2", None) is not None else PARTS


def read(path: Path, pipe: Any) -> tuple[dict[str, Any], dict[str, float] | None]:
    """diffusers' reading of a LoRA file: (state dict in diffusers names, network alphas or None)."""
    try:
        return type(pipe).lora_state_dict(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and diffusers' own format errors alike
        raise SourceError(f"{path}: not a LoRA file diffusers can read: {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None


def pairs(path: Path, state_dict: dict[str, Any], pipe: Any) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per part, each changed module's path -> the shape of its down (A) weight, after checking every pair
    names a layer of `pipe` with matching shapes."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    found: dict[str, dict[str, tuple[int, ...]]] = {}
    names = parts(pipe)
    if not any("lora" in k.lower() for k in state_dict):
        first = sorted(state_dict)[0] if state_dict else "none"
        raise SourceError(f"{path}: holds no LoRA weights (no key names a lora pair; first key: {first})")
    other = sorted(k for k in state_dict if k.split(".", 1)[0] not in names)
    if other:
        guess = "SD 1.x/2.x" if names == SDXL_PARTS else "SDXL?"
        raise SourceError(f"{path}: LoRA key {other[0]} is for a model part this model does not have "
                          f"(it has {', '.join(names)}): a LoRA for another architecture ({guess})")
    for part in names:
        sub = {k[len(part) + 1:]: v for k, v in state_dict.items() if k.startswith(part + ".")}
        if not sub:
            continue
        if not any(".lora_A." in k for k in sub):
            sub = convert_unet_state_dict_to_peft(sub) if part == "unet" else convert_state_dict_to_peft(sub)
        model = getattr(pipe, part)
        mods = found.setdefault(part, {})
        for key in sorted(sub):
            for side in (".lora_A.", ".lora_B."):
                if side not in key:
                    continue
                name = key.split(side)[0]
                try:  # transformers 5 dropped CLIPTextModel's `text_model` level; loaders map both
                    layer = model.get_submodule(name if _has(model, name) else name.removeprefix("text_model."))
                except AttributeError:
                    raise SourceError(f"{path}: LoRA key {part}.{key} names no layer of this model's {part} "
                                      f"({name}): a LoRA for another architecture?") from None
                w = tuple(sub[key].shape)
                fan_in = getattr(layer, "in_features", getattr(layer, "in_channels", None))
                fan_out = getattr(layer, "out_features", getattr(layer, "out_channels", None))
                want, got = (fan_in, w[1]) if side == ".lora_A." else (fan_out, w[0])
                if fan_in is None or want != got:
                    raise SourceError(f"{path}: LoRA key {part}.{key} has shape {list(w)}, which does not fit "
                                      f"{part} layer {name} ({type(layer).__name__} {fan_in} -> {fan_out}): a "
                                      "LoRA for another architecture?")
                if side == ".lora_A.":
                    mods[name] = w
    if not any(found.values()):
        raise SourceError(f"{path}: holds no LoRA pairs for {' or '.join(names)}")
    return found


def fuse(pipe: Any, specs: list[LoraSpec]) -> list[dict[str, Any]]:
    """Fuse every LoRA into `pipe` at its scale; provenance per LoRA for the manifest."""
    infos, names = [], []
    for i, spec in enumerate(specs):
        path = Path(spec.path)
        state_dict, alphas = read(path, pipe)
        found = pairs(path, state_dict, pipe)
        name = f"lora{i}"
        quiet = logging.getLogger("peft").level
        logging.getLogger("peft").setLevel(logging.ERROR)
        try:
            pipe.load_lora_weights(state_dict, network_alphas=alphas, adapter_name=name)
        except Exception as e:  # noqa: BLE001 - shape checks above catch the usual causes first
            raise SourceError(f"{path}: could not load it as a LoRA: {type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None
        finally:
            logging.getLogger("peft").setLevel(quiet)
        names.append(name)
        ranks = [shape[0] for mods in found.values() for shape in mods.values()]
        infos.append({
            "name": path.stem, "file": str(path.resolve()), "sha256": sha256_file(path), "scale": spec.scale,
            "rank": max(ranks), "layers": {part: len(mods) for part, mods in found.items()},
            "convolutions": sum(len(s) == 4 for mods in found.values() for s in mods.values()),
        })
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "several adapters in one model": that is the point here
        pipe.set_adapters(names, adapter_weights=[s.scale for s in specs])
        pipe.fuse_lora(components=list(parts(pipe)), lora_scale=1.0, adapter_names=names)
        pipe.unload_lora_weights()
    return infos


def _has(model: Any, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
