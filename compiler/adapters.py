"""`kiln lora add`: a LoRA file -> an adapter requests can select on a bundle compiled with `--lora-inputs`.

The file is read and applied the way diffusers does it (`lora_state_dict`, then `load_lora_into_unet` and
`load_lora_into_text_encoder`, which handle the kohya / AUTOMATIC1111 and diffusers / PEFT formats and their
alphas) onto weightless copies of the bundle's UNet and text encoder, built from the configs the bundle keeps.
Each adapted layer's PEFT pair is then read by module path, which is also the name of the bundle's LoRA inputs
for that layer: no key map of our own. `up` takes PEFT's scaling (alpha / rank). The adapter is written
beside the model's versions (runtime/adapters.py describes the files); nothing is written when the LoRA has a
layer the bundle takes no input for (conv layers of LoCon, another architecture's keys, other shapes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from compiler.config import NAME_RE
from compiler.lora_inputs import unused_layer
from compiler.source.errors import SourceError
from model_store import Store, sha256_file
from runtime.adapters import ADAPTERS_DIR, COMPONENTS, DOWN, UP, tensor_key

ADAPTER_NAME = "kiln"


def default_name(path: Path) -> str:
    """The file name's stem as an adapter name: lowercase, other characters as `-`."""
    return re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-._")[:64] or "adapter"


def add_adapter(file: str | Path, store_root: str | Path, model: str, name: str | None = None) -> dict[str, Any]:
    """Write `STORE/MODEL/adapters/NAME.safetensors` and `NAME.json` from a LoRA file; returns the JSON's dict.
    Raises SourceError (naming the file and the first layer or key that does not fit) with nothing written."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    name = name or default_name(path)
    if not NAME_RE.match(name):
        raise ValueError(f"--name {name!r} must be 1-64 characters of lowercase letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    store = Store(store_root)
    ref = store.latest(model)
    lora = ref.manifest.model.get("lora_inputs")
    if not lora:
        raise ValueError(f"model {model} (version {ref.manifest.version}) was compiled without --lora-inputs: it "
                         "takes no per-request adapters. Recompile it with --lora-inputs, or fuse the LoRA at "
                         "compile time with --lora FILE:SCALE")
    folder = store.root / model / ADAPTERS_DIR
    out = folder / f"{name}.safetensors"
    if out.exists():
        raise FileExistsError(f"adapter {name!r} of {model} exists ({out}); remove it first or pass another --name")
    modules = {"unet": _empty_unet(ref.path / lora["unet_config"]),
               "text_encoder": _empty_text_encoder(ref.path / lora["text_encoder_config"])}
    if lora.get("text_encoder_2_config"):  # SDXL
        modules["text_encoder_2"] = _empty_text_encoder(ref.path / lora["text_encoder_2_config"], projection=True)
    pairs = _read_lora(path, modules)
    present = [c for c in COMPONENTS if c in modules]
    inputs = {c: set(ref.manifest.components[c].inputs) for c in present}
    tensors: dict[str, Any] = {}
    targets: dict[str, int] = {c: 0 for c in present}
    rank = 0
    # SDXL's first text encoder ends at its penultimate layer: pairs in its last change nothing (no inputs there)
    unused = {"text_encoder": unused_layer(modules["text_encoder"])} if "text_encoder_2" in modules else {}
    for component, layers in pairs.items():
        for layer, (down, up) in layers.items():
            if component in unused and layer.startswith(unused[component]):
                continue
            if DOWN + layer not in inputs[component]:
                raise SourceError(f"{path}: layer {component}.{layer} has no LoRA input in bundle {model} "
                                  f"{ref.manifest.version} (per-request LoRA covers the attention, feed-forward and "
                                  "projection layers of the UNet's transformer blocks and the text encoder's layers; "
                                  "fuse this LoRA at compile time with --lora FILE:SCALE instead)")
            tensors[tensor_key(component, DOWN + layer)] = down
            tensors[tensor_key(component, UP + layer)] = up
            targets[component] += 1
            rank = max(rank, down.shape[0])
    info = {"name": name, "model": model, "file": path.name, "sha256": sha256_file(path), "rank": rank,
            "targets": targets, "bundle_version": ref.manifest.version,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write(folder, name, tensors, info)
    return info


def _write(folder: Path, name: str, tensors: dict[str, Any], info: dict[str, Any]) -> None:
    """Both files under temporary names, then renamed: the JSON last, so a reader never sees half an adapter."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp_t, tmp_j = folder / f".tmp-{name}.safetensors", folder / f".tmp-{name}.json"
    try:
        save_file(tensors, str(tmp_t))
        info["file_sha256"] = sha256_file(tmp_t)
        tmp_j.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        os.rename(tmp_t, folder / f"{name}.safetensors")
        os.rename(tmp_j, folder / f"{name}.json")
    finally:
        tmp_t.unlink(missing_ok=True)
        tmp_j.unlink(missing_ok=True)


def _empty_unet(config: Path) -> Any:
    """The bundle's UNet architecture with uninitialised weights (pages never touched: little memory)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads(config.read_text()))
    return unet.to_empty(device="cpu").eval()


def _empty_text_encoder(config: Path, projection: bool = False) -> Any:
    """CLIPTextModel, or CLIPTextModelWithProjection (`projection`: SDXL's second text encoder)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = {k: v for k, v in json.loads(config.read_text()).items() if k not in ("architectures",)}
    with init_empty_weights():
        te = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**cfg))
    return te.to_empty(device="cpu").eval()


class _Unexpected(logging.Handler):
    """Collects diffusers' warnings about LoRA keys the model has no layer for."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "unexpected keys" in text.lower():
            self.messages.append(text)


def _read_lora(path: Path, modules: dict[str, Any]) -> dict[str, dict[str, tuple[Any, Any]]]:
    """component -> layer path -> (down [r, in], up [out, r] with the scaling folded in), as numpy float32."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    sdxl = "text_encoder_2" in modules
    loader = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline  # SDXL: lora_te1_/lora_te2_ names
    try:
        state, alphas = loader.lora_state_dict(str(path))
    except Exception as e:  # noqa: BLE001 -- any reader failure means the file is no LoRA Kiln can read
        raise SourceError(f"{path}: not a LoRA file diffusers can read ({type(e).__name__}: {e})") from None
    if not state:
        raise SourceError(f"{path}: holds no LoRA weights")
    handler = _Unexpected()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with torch.no_grad():
            loader.load_lora_into_unet(state, alphas, unet=modules["unet"], adapter_name=ADAPTER_NAME)
            loader.load_lora_into_text_encoder(state, alphas, text_encoder=modules["text_encoder"],
                                               prefix="text_encoder", adapter_name=ADAPTER_NAME)
            if sdxl:
                loader.load_lora_into_text_encoder(state, alphas, text_encoder=modules["text_encoder_2"],
                                                   prefix="text_encoder_2", adapter_name=ADAPTER_NAME)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{path}: does not fit this model's UNet / text encoder: {first}") from None
    finally:
        logger.removeHandler(handler)
    if handler.messages:  # diffusers: "... unexpected keys found in the model: KEY, KEY, ..."
        first = handler.messages[0].split(":", 1)[-1].split(",")[0].strip().rstrip(".")
        raise SourceError(f"{path}: LoRA key {first!r} fits no layer of this model (a LoRA for another "
                          "architecture?)")
    out: dict[str, dict[str, tuple[Any, Any]]] = {}
    loaded = 0
    for component, module in modules.items():
        layers: dict[str, tuple[Any, Any]] = {}
        for layer, m in module.named_modules():
            if not isinstance(m, LoraLayer) or ADAPTER_NAME not in m.lora_A:
                continue
            base = m.get_base_layer()
            if isinstance(base, torch.nn.Conv2d) and base.kernel_size != (1, 1):
                raise SourceError(f"{path}: layer {component}.{layer} is a {base.kernel_size[0]}x"
                                  f"{base.kernel_size[1]} convolution (LoCon); per-request LoRA covers linear and 1x1 "
                                  "layers only: fuse this LoRA at compile time with --lora FILE:SCALE")
            if m.use_dora.get(ADAPTER_NAME):
                raise SourceError(f"{path}: layer {component}.{layer} is a DoRA layer; per-request LoRA takes plain "
                                  "LoRA pairs only")
            a = m.lora_A[ADAPTER_NAME].weight.detach().float()
            b = m.lora_B[ADAPTER_NAME].weight.detach().float()
            down = a.reshape(a.shape[0], -1).numpy()
            up = (b.reshape(b.shape[0], -1) * float(m.scaling[ADAPTER_NAME])).numpy()
            layers[layer] = (down.copy(), up.copy())
            loaded += a.numel() + b.numel()
        if layers:
            out[component] = layers
    given = sum(v.numel() for k, v in state.items() if v.ndim >= 2 and "alpha" not in k)
    if not loaded:
        raise SourceError(f"{path}: no key fits a layer of this model's UNet or text encoder (first key: "
                          f"{next(iter(state))!r}); a LoRA for another architecture?")
    if loaded != given:
        raise SourceError(f"{path}: {given - loaded} LoRA weights fit no layer of this model's UNet or text "
                          f"encoder (first key: {_first_unloaded(state, out)!r})")
    return out


def _first_unloaded(state: dict[str, Any], loaded: dict[str, dict[str, Any]]) -> str:
    paths = [layer for layers in loaded.values() for layer in layers]
    for key in state:
        if "alpha" not in key and not any(p in key for p in paths):
            return key
    return next(iter(state))
