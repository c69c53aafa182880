"""Reuse exported fp32 graphs from a bundle already in the store, instead of exporting them again.

Compiling one source at several precisions (fp32, then int8, nf4, ...) would otherwise export and optimize
the same fp32 graphs each time: about 20 minutes for the SD v1 UNet on 2 cores. A bundle is a donor for a
component when the component is fp32 with exactly the passes a fresh export would get before any
precision-specific pass (`fusions` or none), and the bundle was made from the same source content, opset and
fusions setting by the same exporter: the same torch, onnx and onnxruntime versions and the same Kiln export
code (`export_code_hash`, a hash over the modules that produce the graphs). Its files are copied into the
new bundle: not hard-linked, because onnx refuses to read external data through a file with several links
(its guard against hard-link attacks), and a bundle must never share an inode a later writer could change.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from model_store import BundleRef, ComponentEntry, Manifest, ManifestError, Store

EXPORT_CODE = ("export.py", "source/load.py", "passes/fusions.py", "lora_inputs.py")
"""Modules (under compiler/) whose code decides what an fp32 export and its fusions produce."""


def export_code_hash() -> str:
    h = hashlib.sha256()
    root = Path(__file__).parent
    for rel in EXPORT_CODE:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return h.hexdigest()[:16]


def exporter_identity(opset: int, fusions: bool) -> dict[str, str]:
    """What, besides the source, decides the fp32 graphs: recorded in each manifest's `tool_versions`."""
    import onnx
    import onnxruntime
    import torch

    return {"onnx": onnx.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "kiln_export": export_code_hash(), "opset": str(opset), "fusions": str(bool(fusions))}


def recorded_versions(identity: dict[str, str], quantized: bool) -> dict[str, str]:
    """The `tool_versions` a compile records: the exporter's identity, plus the quantize stage's code hash when
    some component is quantized (what, besides the fp32 graphs and the config, decides the quantized files)."""
    import quantize

    return {**identity, "kiln_quantize": quantize.code_hash()} if quantized else dict(identity)


def fresh_passes(fusions: bool) -> list[str]:
    """Passes a freshly exported fp32 component has before precision-specific ones."""
    return ["fusions"] if fusions else []


def find_donor(store: Store, source_sha256: str, identity: dict[str, str], fusions: bool) -> BundleRef | None:
    """The newest bundle in `store` with reusable fp32 components for this source and exporter, or None."""
    best: BundleRef | None = None
    for name in store.names():
        for version in store.versions(name):
            try:
                path = store.root / name / version
                ref = BundleRef(path, Manifest.read(path))
                ref.check_files()
            except (ManifestError, OSError):
                continue
            if ref.manifest.source.get("sha256") != source_sha256:
                continue
            if any(ref.manifest.tool_versions.get(k) != v for k, v in identity.items()):
                continue
            if not any(donates(c, fusions) for c in ref.manifest.components.values()):
                continue
            if best is None or ref.manifest.created_at > best.manifest.created_at:
                best = ref
    return best


def donates(entry: ComponentEntry | None, fusions: bool) -> bool:
    return entry is not None and entry.precision == "fp32" and entry.passes == fresh_passes(fusions)


def copy_component(donor: BundleRef, entry: ComponentEntry, out: Path) -> None:
    """Copy the donor component's .onnx and external data file to `out` (and `out`.data)."""
    shutil.copyfile(donor.path / entry.file, out)
    if entry.external_data:
        shutil.copyfile(donor.path / entry.external_data, out.with_name(out.name + ".data"))

