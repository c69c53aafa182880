"""The bundle manifest: what a compiled bundle holds and how it was made (JSON, versioned)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest that is missing, malformed, or of an unknown format version."""


@dataclass
class FileEntry:
    path: str
    """Path relative to the bundle folder."""
    sha256: str
    size: int
    """Size in bytes."""


@dataclass
class ComponentEntry:
    file: str
    """The .onnx file, relative to the bundle folder."""
    inputs: list[str]
    outputs: list[str]
    precision: str
    """fp32 | fp16 | int8 | nf4 | int4."""
    external_data: str | None = None
    """The one `.onnx.data` file holding weights when the model passes 2 GB, else None."""
    passes: list[str] = field(default_factory=list)
    """Optimization passes applied, in order."""
    parity: dict[str, float] = field(default_factory=dict)
    """max_abs_diff / mean_abs_diff against PyTorch fp32 on fixed inputs, and the threshold used."""
    op_counts: dict[str, int] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    """How the component was quantized (method, formats, nodes kept fp32 and why); empty for fp32, or a
    `fallback` entry when a tried precision failed the fidelity gate."""
    fidelity: dict[str, Any] = field(default_factory=dict)
    """Against fp32: `rel_error` of its output, final-image `psnr`/`psnr_min`/`ssim` with only it quantized."""
    gpu_only: bool = False
    """True when ONNX Runtime's CPU provider cannot run it (fp16); the runtime refuses it on CPU."""


@dataclass
class Manifest:
    name: str
    version: str
    created_at: str
    """UTC ISO-8601 time the bundle was written."""
    kiln_version: str
    source: dict[str, Any]
    """{"path": ..., "sha256": ...}: the source model and its content hash."""
    compile_config: dict[str, Any]
    config_hash: str
    """Hash over the compile-config fields that change the exported graphs."""
    opset: int
    onnxruntime_version: str
    components: dict[str, ComponentEntry]
    files: list[FileEntry]
    scheduler_config: dict[str, Any]
    tokenizer: dict[str, Any]
    """{"file": "tokenizer/tokenizer.json", "files": [...], "max_length": 77, "pad_id", "bos_id", "eos_id"}, and
    `embeddings` when textual-inversion tokens were added: [{"token": as prompts write it, "tokens": [what it
    expands to, one per vector]}] in the order they were added."""
    model: dict[str, Any]
    """Shapes the runtime needs: latent_channels, vae_scale_factor, vae_scaling_factor, unet_in_channels,
    text_hidden_size; `vae_class` (AutoencoderKL or AutoencoderTiny) and `decoders` ({"full": {"component",
    "scaling_factor"}, and "tiny" with `--tiny-decoder`; absent in older bundles: the full decoder only)."""
    defaults: dict[str, Any]
    """width, height, steps, guidance_scale, sampler."""
    limits: dict[str, Any]
    """min_size, max_size, max_steps, max_images, max_guidance_scale."""
    tool_versions: dict[str, str] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    """Quantized bundles: final images vs fp32 (psnr, psnr_min, ssim), prompts, seed, steps, thresholds,
    `passed` and `low_fidelity` (published with --allow-low-fidelity despite failures)."""
    compile_stats: dict[str, Any] = field(default_factory=dict)
    """How the compile ran: `stages`, in order, each `{"stage", "seconds", "peak_rss_bytes"}` (the compiling
    process's highest resident memory during that stage; null where the platform cannot measure it), and
    `peak_rss_bytes`, the largest of them. Empty in bundles compiled before Kiln recorded it."""
    format_version: int = FORMAT_VERSION

    @property
    def precision(self) -> dict[str, str]:
        return {name: c.precision for name, c in self.components.items()}

    @property
    def low_fidelity(self) -> bool:
        return bool(self.fidelity.get("low_fidelity"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"manifest format_version={d.get('format_version')!r}; this Kiln reads {FORMAT_VERSION}: recompile"
            )
        names = {f.name for f in fields(cls)}
        missing = names - d.keys() - {"tool_versions", "format_version", "fidelity", "compile_stats"}
        if missing:
            raise ManifestError(f"manifest lacks {', '.join(sorted(missing))}")
        kw = {k: v for k, v in d.items() if k in names}
        kw["components"] = {k: ComponentEntry(**v) for k, v in d["components"].items()}
        kw["files"] = [FileEntry(**f) for f in d["files"]]
        return cls(**kw)

    @classmethod
    def read(cls, bundle_dir: Path) -> Manifest:
        path = bundle_dir / MANIFEST_NAME
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ManifestError(f"{path} does not exist") from None
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ManifestError(f"{path} is malformed: {e}") from None
