"""Single-file checkpoints in the original (CompVis / AUTOMATIC1111 / Civitai) layout -> a diffusers pipeline.

The family is read from tensor names and shapes and matched against the configs Kiln ships
(compiler/source/configs); diffusers' own converters (`diffusers.loaders.single_file_utils`) map the keys;
nothing is fetched from a hub. Tensors are checked against the family's modules before anything is built,
so a file that does not fit fails naming the first tensor that does not.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.source.errors import SourceError
from compiler.source.options import SourceOptions
from model_store import sha256_file

CONFIGS = Path(__file__).parent / "configs"
CLIP_TOKENIZER = CONFIGS / "sd-v1" / "tokenizer"
UNET_PREFIX = "model.diffusion_model."
FIRST_CONV = UNET_PREFIX + "input_blocks.0.0.weight"
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
"""SDXL (Stability's SGM layout): CLIP ViT-L in transformers' names."""
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
"""SDXL: OpenCLIP bigG, with its text projection."""
REFINER_PREFIX = "conditioner.embedders.0.model."
"""The SDXL refiner: OpenCLIP bigG as its only text encoder."""
ADD_EMBEDDING = UNET_PREFIX + "label_emb.0.0.weight"
"""SDXL's `text_time` added conditioning: pooled text embedding and size/crop embeddings in, time embedding out."""
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CROSS_ATTENTION_KEY = re.compile(r"^model\.diffusion_model\..*\.attn2\.to_k\.weight$")


@dataclass(frozen=True)
class Family:
    name: str
    unet: str
    """Config folder (under compiler/source/configs) of the UNet."""
    rest: str
    """Config folder of the text encoder, VAE, scheduler and tokenizer."""
    text_encoder: str
    """`clip` (SD 1.x: the checkpoint holds transformers' CLIP keys), `open_clip` (SD 2.x) or `sdxl` (both:
    CLIP ViT-L and OpenCLIP bigG with projection, under `conditioner.embedders.*`)."""
    prediction_type: str | None
    """What the UNet predicts, or None where the tensors cannot tell (SD 2.x: the 512 base predicts epsilon,
    the 768 model v)."""


# detection order: the first whose UNet config fits the tensors wins
FAMILIES = (
    Family("sd-v1", "sd-v1", "sd-v1", "clip", "epsilon"),
    Family("sd-v1-inpainting", "sd-v1-inpainting", "sd-v1", "clip", "epsilon"),
    Family("sd-v2", "sd-v2", "sd-v2", "open_clip", None),
    Family("tiny", "tiny", "tiny", "clip", "epsilon"),
    Family("tiny-inpainting", "tiny-inpainting", "tiny", "clip", "epsilon"),
    Family("tiny-v2", "tiny-v2", "tiny-v2", "open_clip", None),
    Family("sdxl", "sdxl", "sdxl", "sdxl", "epsilon"),
    Family("tiny-sdxl", "tiny-sdxl", "tiny-sdxl", "sdxl", "epsilon"),
)
V_FAMILY_UNET = {"sd-v2": "sd-v2-768"}
"""v-prediction variants with their own default size (SD 2.x 768-v)."""


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Every tensor in the file, as PyTorch tensors. `.ckpt` and other pickles load only through PyTorch's
    `weights_only` loader; a nested `state_dict` is unwrapped and non-tensor entries dropped."""
    import torch

    suffix = path.suffix.lower()
    try:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            data: dict[str, Any] = load_file(str(path))
        elif suffix in PICKLE_SUFFIXES:
            try:
                data = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as e:  # UnpicklingError for objects, RuntimeError/EOFError for damaged files
                raise SourceError(
                    f"{path}: PyTorch's weights_only loader refused it ({type(e).__name__}: {_first_line(e)}); "
                    "Kiln loads pickles only as plain weights. Convert it to .safetensors with a tool you trust, "
                    "or use the .safetensors release of the model") from None
        else:
            raise SourceError(f"{path}: unknown checkpoint suffix {suffix!r}; use .safetensors "
                              f"(or {', '.join(PICKLE_SUFFIXES)} read with PyTorch's weights_only loader)")
    except SourceError:
        raise
    except Exception as e:  # safetensors: truncated, random bytes, a header that lies
        raise SourceError(f"{path}: not a readable safetensors file (truncated or damaged?): "
                          f"{type(e).__name__}: {_first_line(e)}") from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise SourceError(f"{path}: holds a {type(data).__name__}, not a dictionary of tensors")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def names_sdxl(path: Path) -> bool:
    """Whether a `.safetensors` file's header names SDXL's second text encoder (read without loading any
    tensor; other files: False). Only for counting compile stages: `detect` decides."""
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith(SDXL_OPEN_CLIP_PREFIX) for k in f.keys())  # noqa: SIM118 - a safe_open handle, not a dict
    except Exception:  # noqa: BLE001 - a damaged file is refused by read_checkpoint, with its reason
        return False


def detect(path: Path, ckpt: dict[str, Any], options: SourceOptions) -> tuple[Family, str, str]:
    """(family, prediction type, where the prediction type came from) for the checkpoint's tensors."""
    if FIRST_CONV not in ckpt:
        first = ", ".join(sorted(ckpt)[:3]) or "no tensors at all"
        raise SourceError(f"{path}: unknown layout: no {FIRST_CONV} (first tensors: {first}); expected an SD 1.x, "
                          "SD 2.x or SDXL checkpoint in the original layout (model.diffusion_model.*, "
                          "first_stage_model.*, cond_stage_model.* or conditioner.embedders.*)")
    conv = tuple(ckpt[FIRST_CONV].shape)
    context = next((int(ckpt[k].shape[1]) for k in sorted(ckpt) if CROSS_ATTENTION_KEY.match(k)), None)
    added = int(ckpt[ADD_EMBEDDING].shape[1]) if ADD_EMBEDDING in ckpt and ckpt[ADD_EMBEDDING].ndim == 2 else None
    text = _text_encoders(path, ckpt)
    if options.model_config:
        family = Family("custom", "", "", text, None)
    else:
        for family in FAMILIES:
            unet = _read(CONFIGS / family.unet / "unet/config.json")
            if (family.text_encoder == text and len(conv) == 4 and conv[0] == unet["block_out_channels"][0]
                    and conv[1] == unet["in_channels"] and context == unet["cross_attention_dim"]
                    and added == unet.get("projection_class_embeddings_input_dim")):
                break
        else:
            more = f", added-conditioning width {added}" if added is not None else ""
            encoders = "SDXL's two text encoders" if text == "sdxl" else f"a {text} text encoder"
            raise SourceError(
                f"{path}: {FIRST_CONV} has shape {list(conv)} with cross-attention width {context}{more} and "
                f"{encoders}, which fits none of the families Kiln ships configs for "
                f"({', '.join(f.name for f in FAMILIES)}); pass --model-config DIR with a diffusers folder's configs")
    prediction, origin = _prediction_type(path, family, options)
    return family, prediction, origin


def _text_encoders(path: Path, ckpt: dict[str, Any]) -> str:
    """`clip`, `open_clip` or `sdxl`, from the text encoders' key prefixes."""
    has = {p: any(k.startswith(p) for k in ckpt)
           for p in (CLIP_PREFIX, OPEN_CLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX, REFINER_PREFIX)}
    if has[REFINER_PREFIX] and not has[SDXL_OPEN_CLIP_PREFIX]:
        raise SourceError(f"{path}: an SDXL refiner checkpoint (OpenCLIP bigG as its only text encoder, "
                          f"{REFINER_PREFIX}*); Kiln compiles SDXL base-design checkpoints (two text encoders), "
                          "not the refiner")
    if has[SDXL_CLIP_PREFIX] or has[SDXL_OPEN_CLIP_PREFIX]:
        lacking = [p for p in (SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX) if not has[p]]
        if lacking:
            which = "first" if lacking[0] == SDXL_CLIP_PREFIX else "second"
            raise SourceError(f"{path}: an SDXL checkpoint without its {which} text encoder (no {lacking[0]}* "
                              "tensors); is the file complete?")
        return "sdxl"
    if has[OPEN_CLIP_PREFIX]:
        return "open_clip"
    if has[CLIP_PREFIX]:
        return "clip"
    raise SourceError(f"{path}: no text encoder (none of {CLIP_PREFIX}*, {OPEN_CLIP_PREFIX}*, "
                      f"{SDXL_CLIP_PREFIX}* with {SDXL_OPEN_CLIP_PREFIX}*)")


def load_pipeline(path: Path, options: SourceOptions) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The checkpoint as an fp32 diffusers pipeline (EMA weights when present), provenance for the manifest,
    and the scheduler config as the family's file has it (diffusers would write out its scheduler's defaults,
    which other schedulers built from the config must not inherit)."""
    from diffusers.loaders import single_file_utils as sfu

    ckpt = read_checkpoint(path)
    family, prediction, origin = detect(path, ckpt, options)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in ckpt.values() if v.is_floating_point()})
    ema = sum(k.startswith("model_ema.") for k in ckpt) > 100
    with tempfile.TemporaryDirectory(prefix="kiln-config-") as tmp:
        configs = _config_dir(family, prediction, options, Path(tmp))
        unet_cfg = _read(configs / "unet/config.json")
        vae_cfg = _read(configs / "vae/config.json")
        text_cfg = _read(configs / "text_encoder/config.json")
        logging.getLogger("diffusers.loaders.single_file_utils").setLevel(logging.ERROR)  # its EMA advice
        try:
            unet_sd = sfu.convert_ldm_unet_checkpoint(ckpt, unet_cfg, extract_ema=ema)
            vae_sd = sfu.convert_ldm_vae_checkpoint(ckpt, vae_cfg)
        except (KeyError, IndexError, ValueError, RuntimeError) as e:
            raise SourceError(f"{path}: does not convert as a {family.name} checkpoint: "
                              f"{type(e).__name__}: {_first_line(e)}") from None
        from accelerate import init_empty_weights
        from diffusers import (
            AutoencoderKL,
            StableDiffusionInpaintPipeline,
            StableDiffusionPipeline,
            StableDiffusionXLPipeline,
            UNet2DConditionModel,
        )
        from diffusers.schedulers import EulerDiscreteScheduler, PNDMScheduler
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        sdxl = family.text_encoder == "sdxl"
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(unet_cfg)
            vae = AutoencoderKL.from_config(vae_cfg)
            text_encoder = CLIPTextModel(_text_config(text_cfg))
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(_read(configs / "text_encoder_2/config.json"))) \
                if sdxl else None
        if family.text_encoder == "open_clip":
            text_sd = sfu.convert_open_clip_checkpoint(text_encoder, ckpt)
        else:  # SD 1.x's cond_stage_model.transformer.* or SDXL's conditioner.embedders.0.transformer.*
            text_sd = sfu.convert_ldm_clip_checkpoint(ckpt)
        parts = [(unet, unet_sd, "unet"), (vae, vae_sd, "vae"), (text_encoder, text_sd, "text_encoder")]
        if text_encoder_2 is not None:
            parts.append((text_encoder_2, sfu.convert_open_clip_checkpoint(text_encoder_2, ckpt,
                                                                           prefix=SDXL_OPEN_CLIP_PREFIX),
                          "text_encoder_2"))
        del ckpt
        for module, sd, name in parts:
            if name.startswith("text_encoder"):
                sd.pop("text_model.embeddings.position_ids", None)
                if not any(k.startswith("text_model.") for k in module.state_dict()):  # CLIPTextModel, transformers 5
                    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
            _load_checked(path, family, name, module, sd)
        scheduler_config = _read(configs / "scheduler/scheduler_config.json")
        tokenizer = CLIPTokenizer.from_pretrained(str(configs / "tokenizer"))
        pipe: Any
        if text_encoder_2 is not None:
            pipe = StableDiffusionXLPipeline(
                vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
                tokenizer=tokenizer, tokenizer_2=CLIPTokenizer.from_pretrained(str(configs / "tokenizer_2")),
                unet=unet.eval(), scheduler=EulerDiscreteScheduler.from_config(scheduler_config),
                force_zeros_for_empty_prompt=True, add_watermarker=False)
        else:
            cls = StableDiffusionInpaintPipeline if int(unet_cfg["in_channels"]) == 9 else StableDiffusionPipeline
            pipe = cls(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                       scheduler=PNDMScheduler.from_config(scheduler_config), safety_checker=None,
                       feature_extractor=None, requires_safety_checker=False)
    info = {"family": family.name, "file": path.name, "file_sha256": sha256_file(path), "file_dtypes": dtypes,
            "ema": ema, "prediction_type": prediction, "prediction_type_from": origin}
    if options.model_config:
        info["model_config"] = str(Path(options.model_config).resolve())
    return pipe, info, scheduler_config


def _text_config(config: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"})


def _load_checked(path: Path, family: Family, name: str, module: Any, sd: dict[str, Any]) -> None:
    """Load `sd` (upcast to fp32) into `module`, whose parameters are still empty; the first tensor that is
    missing, extra or of the wrong shape is named."""
    import torch

    expected = module.state_dict()
    for key, want in expected.items():
        got = sd.get(key)
        if got is None:
            raise SourceError(f"{path}: {name} tensor {key} is missing (a {family.name} checkpoint needs it; "
                              "is the file complete and of this family?)")
        if tuple(got.shape) != tuple(want.shape):
            raise SourceError(f"{path}: {name} tensor {key} has shape {list(got.shape)}, a {family.name} "
                              f"checkpoint has {list(want.shape)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise SourceError(f"{path}: {name} tensor {extra[0]} is not part of a {family.name} model "
                          f"({len(extra)} such tensors)")
    # one tensor at a time, dropping each fp16/bf16 original as its fp32 copy is made (the originals are pages
    # of the file, mapped read-only by safetensors: clean page cache until the file is closed)
    state = {}
    for key in list(sd):
        v = sd.pop(key)
        state[key] = v.to(torch.float32) if v.is_floating_point() else v
        del v
    module.load_state_dict(state, strict=True, assign=True)


def _prediction_type(path: Path, family: Family, options: SourceOptions) -> tuple[str, str]:
    yaml_says = _yaml_parameterization(path)
    if options.prediction_type:
        return options.prediction_type, "--prediction-type"
    if yaml_says:
        return yaml_says, path.with_suffix(".yaml").name
    if family.prediction_type:
        return family.prediction_type, f"family {family.name}"
    raise SourceError(
        f"{path}: a {family.name} checkpoint may predict epsilon (512 base models) or v (768 models) and its "
        f"tensors cannot tell; put the model's {path.with_suffix('.yaml').name} beside it or pass "
        "--prediction-type epsilon|v_prediction")


def _yaml_parameterization(path: Path) -> str | None:
    """AUTOMATIC1111's convention: NAME.yaml beside NAME.safetensors; `parameterization: v` means v-prediction."""
    cfg = path.with_suffix(".yaml")
    if not cfg.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(cfg.read_text())
        params = (data.get("model") or {}).get("params") or {}
    except (yaml.YAMLError, AttributeError) as e:
        raise SourceError(f"{cfg}: not a readable model config: {_first_line(e)}") from None
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


def _config_dir(family: Family, prediction: str, options: SourceOptions, tmp: Path) -> Path:
    """A folder with unet/, vae/, text_encoder/, scheduler/ and tokenizer/ configs for this checkpoint."""
    if options.model_config:
        src = Path(options.model_config)
        for part in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                     "scheduler/scheduler_config.json"):
            if not (src / part).is_file():
                raise SourceError(f"--model-config {src}: lacks {part}")
        unet_dir, rest = src, src
    else:
        unet_dir = CONFIGS / (V_FAMILY_UNET.get(family.name, family.unet) if prediction == "v_prediction"
                              else family.unet)
        rest = CONFIGS / family.rest
    for part in ("vae", "text_encoder", "scheduler"):
        shutil.copytree(rest / part, tmp / part)
    if family.text_encoder == "sdxl":
        if not (rest / "text_encoder_2/config.json").is_file():
            raise SourceError(f"--model-config {rest}: lacks text_encoder_2/config.json (an SDXL checkpoint)")
        shutil.copytree(rest / "text_encoder_2", tmp / "text_encoder_2")
    shutil.copytree(unet_dir / "unet", tmp / "unet")
    for name in ("tokenizer", "tokenizer_2") if family.text_encoder == "sdxl" else ("tokenizer",):
        # families share CLIP's vocabulary; a family's folder may hold its own settings (SDXL's second: "!" padding)
        if (rest / name / "tokenizer.json").exists() or (rest / name / "vocab.json").exists():
            shutil.copytree(rest / name, tmp / name)
        else:
            shutil.copytree(CLIP_TOKENIZER, tmp / name)
            if (rest / name).is_dir():
                shutil.copytree(rest / name, tmp / name, dirs_exist_ok=True)
    sched = _read(tmp / "scheduler/scheduler_config.json")
    sched["prediction_type"] = prediction
    (tmp / "scheduler/scheduler_config.json").write_text(json.dumps(sched, indent=2))
    return tmp


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
