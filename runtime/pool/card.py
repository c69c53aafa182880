"""What serving needs to know about a bundle version without opening its graphs: its defaults and limits
(pricing, validation), its decoders, schedule and adapters (validation), and its size (the pool's first estimate)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from model_store import BundleRef, Manifest
from runtime.adapters import ADAPTERS_DIR
from runtime.model import BundleFacts
from runtime.samplers.schedule import NoiseSchedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterListing:
    """A LoRA adapter as its JSON describes it (its tensors are read when the model loads)."""

    name: str
    sha256: str
    rank: int


@dataclass
class BundleCard(BundleFacts):
    ref: BundleRef
    schedule: NoiseSchedule = field(init=False)
    adapters: dict[str, AdapterListing] = field(init=False)
    """Adapters listed beside the model (`STORE/NAME/adapters/*.json`); a loaded model keeps those that fit it."""

    def __post_init__(self) -> None:
        self.schedule = NoiseSchedule.from_config(self.manifest.scheduler_config)
        self.adapters = list_adapters(self.ref.path.parent / ADAPTERS_DIR) if self.manifest.model.get("lora_inputs") \
            else {}

    @property
    def manifest(self) -> Manifest:  # type: ignore[override]
        return self.ref.manifest

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.version

    @property
    def max_loras(self) -> int:
        return int(self.manifest.limits.get("max_loras", 0)) if self.manifest.model.get("lora_inputs") else 0

    @property
    def file_bytes(self) -> int:
        """The bundle's files, as its manifest lists them."""
        return sum(f.size for f in self.manifest.files)


def list_adapters(folder: Path) -> dict[str, AdapterListing]:
    out: dict[str, AdapterListing] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            meta = json.loads(path.read_text())
            out[str(meta["name"])] = AdapterListing(str(meta["name"]), str(meta["sha256"]), int(meta["rank"]))
        except (OSError, ValueError, KeyError) as e:
            log.error("skipping LoRA adapter %s: %s", path, e)
    return out
