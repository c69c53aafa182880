"""Turn what the user has into the diffusers folder the exporter reads.

A diffusers folder with nothing added is compiled as it is. Anything else (a single-file checkpoint, LoRAs
to fuse, textual-inversion embeddings, a swapped VAE) is loaded into a diffusers pipeline with diffusers' own
loaders, changed there, and written as a diffusers folder into a work folder the compile removes afterwards.
What was applied is returned for the manifest (`source` section).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compiler.source.errors import SourceError
from compiler.source.options import SourceOptions

FOLDER_FAMILY = "diffusers-folder"


@dataclass
class Prepared:
    path: Path
    """The diffusers folder to export from."""
    info: dict[str, Any] = field(default_factory=dict)
    """Provenance for the manifest: `family`, and `file_sha256`, `loras`, `embeddings`, `vae` when used."""


Stage = Callable[[str], AbstractContextManager[object]]


def stage_count(source: str | Path, options: SourceOptions) -> int:
    """Progress stages `prepare` shows for these arguments."""
    path = Path(source)
    if path.is_dir() and not options.changes_weights:
        return 0
    return 2 + bool(options.vae) + bool(options.embeddings) + bool(options.loras)


def prepare(source: str | Path, options: SourceOptions, work: Path, stage: Stage) -> Prepared:
    """The folder to compile from `source` with `options` applied; `work` receives a rebuilt folder."""
    path = Path(source)
    if not path.exists():
        raise SourceError(f"source model {path}: no such file or folder")
    if path.is_dir():
        if options.prediction_type or options.model_config:
            raise SourceError("--prediction-type and --model-config apply to single-file checkpoints only; "
                             f"{path} is a folder (its scheduler/ and unet/ configs say what they would)")
        if not options.changes_weights:
            return Prepared(path, {"family": FOLDER_FAMILY})
    info: dict[str, Any]
    if path.is_file():
        from compiler.source import single_file

        with stage("load the single-file checkpoint"):
            pipe, info, scheduler_config = single_file.load_pipeline(path, options)
    else:
        with stage("load the source folder"):
            pipe = _load_folder(path)
        info = {"family": FOLDER_FAMILY}
        scheduler_config = json.loads((path / "scheduler/scheduler_config.json").read_text())
    if options.vae:
        from compiler.source import vae

        with stage(f"swap the VAE for {Path(options.vae).name}"):
            info["vae"] = vae.swap(pipe, Path(options.vae))
    if options.embeddings:
        from compiler.source import embeddings

        with stage(f"add {len(options.embeddings)} textual-inversion embedding(s)"):
            info["embeddings"] = embeddings.add(pipe, options.embeddings)
    if options.loras:
        from compiler.source import lora

        with stage(f"fuse {len(options.loras)} LoRA(s)"):
            info["loras"] = lora.fuse(pipe, options.loras)
    with stage("write the prepared diffusers folder"):
        shutil.rmtree(work, ignore_errors=True)
        pipe.save_pretrained(work, safe_serialization=True)
        # the source's own scheduler config: diffusers writes its scheduler's defaults out (PNDM's "leading"
        # spacing, say), which would then hold for every sampler built from it
        (work / "scheduler/scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n")
        if path.is_dir() and (path / "kiln.json").exists():
            shutil.copy(path / "kiln.json", work / "kiln.json")
        (work / "kiln_source.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    del pipe
    return Prepared(work, info)


def _load_folder(path: Path) -> Any:
    """The folder's pipeline in fp32 (StableDiffusionPipeline, or the inpainting one for 9-channel UNets; the
    SDXL ones for an SDXL design)."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    unet = json.loads((path / "unet/config.json").read_text())
    if unet.get("addition_embed_type") == "text_time":
        from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

        xl = StableDiffusionXLInpaintPipeline if int(unet.get("in_channels", 4)) == 9 else StableDiffusionXLPipeline
        return xl.from_pretrained(path, torch_dtype=torch.float32, add_watermarker=False, local_files_only=True)
    cls = StableDiffusionInpaintPipeline if int(unet.get("in_channels", 4)) == 9 else StableDiffusionPipeline
    return cls.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False, local_files_only=True)
