"""LoRA adapters selected per request, on a bundle compiled with `--lora-inputs` (compiler/lora_inputs.py).

An adapter is two files beside the model's versions in the store, written by `kiln lora add`:
`STORE/NAME/adapters/ADAPTER.safetensors` holds, per targeted layer, `COMPONENT/lora_down.PATH` [r, in] and
`COMPONENT/lora_up.PATH` [out, r] (the LoRA's alpha / rank already folded into `up`), and `ADAPTER.json` its
name, the source LoRA file's sha256, its own sha256 (checked when read), rank and targets. A request's selection of adapters and scales becomes one feed per
LoRA input: each adapter's `down` rows and `scale * up` columns concatenated along the rank, empty (rank 0)
for layers none of them adapts. Feeds are cached per selection, so a server switching between a few adapter
sets builds each once. Read with safetensors' numpy API: no torch here.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_store import sha256_file

log = logging.getLogger(__name__)

ADAPTERS_DIR = "adapters"
"""Folder under `STORE/NAME/` holding the model's adapters (the store's version listing skips it: no manifest)."""
DOWN, UP = "lora_down.", "lora_up."
"""Input-name prefixes of a targeted layer's two LoRA inputs (compiler/lora_inputs.py writes the same)."""
COMPONENTS = ("text_encoder", "text_encoder_2", "unet")
"""Components with LoRA inputs (text_encoder_2: SDXL bundles')."""
SCALE_RANGE = (-4.0, 4.0)
"""Scales a request may give an adapter."""
CACHED_SELECTIONS = 8
"""Adapter selections whose combined feeds are kept (least recently used dropped first)."""

Selection = tuple[tuple[str, float], ...]
"""(adapter name, scale) pairs, sorted by name: the key requests are grouped and feeds cached by."""


def tensor_key(component: str, input_name: str) -> str:
    return f"{component}/{input_name}"


@dataclass(frozen=True)
class Adapter:
    name: str
    sha256: str
    """sha256 of the LoRA file it was made from."""
    rank: int
    """Largest rank among its layers."""
    tensors: dict[str, dict[str, np.ndarray]]
    """component -> LoRA input name -> array ([r, in] for lora_down, [out, r] for lora_up, alpha folded in)."""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for t in self.tensors.values() for a in t.values())


class AdapterError(ValueError):
    """An adapter file that does not fit the loaded bundle (another model's, or a damaged file)."""


def lora_input_shapes(session) -> dict[str, list]:  # type: ignore[no-untyped-def]
    """A session's LoRA inputs and their declared shapes (the rank axis symbolic)."""
    return {n: s for n, s in getattr(session, "input_shapes", {}).items() if n.startswith((DOWN, UP))}


def read_adapter(path: Path, shapes: Mapping[str, Mapping[str, list]]) -> Adapter:
    """Read `ADAPTER.safetensors` and its JSON; `shapes`: component -> LoRA input -> declared shape. Raises
    AdapterError naming the first tensor the bundle has no input for, or whose width differs."""
    from safetensors.numpy import load_file

    meta = json.loads(path.with_suffix(".json").read_text())
    digest = sha256_file(path)
    if digest != meta["file_sha256"]:
        raise AdapterError(f"adapter {path.name}: sha256 {digest[:16]}... differs from its JSON's "
                           f"{str(meta['file_sha256'])[:16]}...: the file was changed or damaged after `kiln lora add`")
    tensors: dict[str, dict[str, np.ndarray]] = {c: {} for c in COMPONENTS}
    for key, array in load_file(str(path)).items():
        component, _, name = key.partition("/")
        want = shapes.get(component, {}).get(name)
        if want is None:
            raise AdapterError(f"adapter {path.name}: tensor {key!r} has no LoRA input in this bundle")
        fixed = 1 if name.startswith(DOWN) else 0  # the axis that is not the rank
        if array.ndim != 2 or (isinstance(want[fixed], int) and array.shape[fixed] != want[fixed]):
            raise AdapterError(f"adapter {path.name}: tensor {key!r} has shape {list(array.shape)}; the bundle's "
                               f"input takes {want}")
        tensors[component][name] = np.ascontiguousarray(array, dtype=np.float32)
    for component, named in tensors.items():
        for name, down in named.items():
            if name.startswith(DOWN):
                up = named.get(UP + name[len(DOWN):])
                if up is None or up.shape[1] != down.shape[0]:
                    raise AdapterError(f"adapter {path.name}: {component}/{name} has no matching lora_up of rank "
                                       f"{down.shape[0]}")
    return Adapter(str(meta["name"]), str(meta["sha256"]), int(meta["rank"]), tensors)


def load_adapters(folder: Path, shapes: Mapping[str, Mapping[str, list]]) -> dict[str, Adapter]:
    """Every adapter in `folder` that fits the bundle; one that does not is logged and skipped."""
    out: dict[str, Adapter] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.safetensors")):
        try:
            adapter = read_adapter(path, shapes)
        except (AdapterError, OSError, ValueError, KeyError) as e:
            log.error("skipping LoRA adapter %s: %s", path, e)
            continue
        out[adapter.name] = adapter
    return out


class LoraFeeds:
    """The LoRA inputs of a bundle's components for any selection of its adapters, cached per selection."""

    def __init__(self, shapes: Mapping[str, Mapping[str, list]], adapters: Mapping[str, Adapter],
                 cached: int = CACHED_SELECTIONS):
        self.shapes = {c: dict(s) for c, s in shapes.items()}
        self.adapters = dict(adapters)
        self._cached = cached
        self._cache: OrderedDict[Selection, dict[str, dict[str, np.ndarray]]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(selection: Selection | list[tuple[str, float]]) -> Selection:
        return tuple(sorted((n, float(s)) for n, s in selection))

    def feeds(self, component: str, selection: Selection) -> dict[str, np.ndarray]:
        """Every LoRA input of `component` for `selection` (empty selection: rank 0 everywhere)."""
        key = self.key(selection)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit[component]
        built = {c: self._build(c, key) for c in self.shapes}
        with self._lock:
            self._cache[key] = built
            while len(self._cache) > self._cached:
                self._cache.popitem(last=False)
        return built[component]

    def _build(self, component: str, key: Selection) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, shape in self.shapes[component].items():
            parts = []
            for adapter_name, scale in key:
                array = self.adapters[adapter_name].tensors.get(component, {}).get(name)
                if array is not None:
                    parts.append(array * np.float32(scale) if name.startswith(UP) else array)
            if parts:
                out[name] = np.ascontiguousarray(np.concatenate(parts, axis=0 if name.startswith(DOWN) else 1))
            else:
                empty = [0, shape[1]] if name.startswith(DOWN) else [shape[0], 0]
                out[name] = np.zeros(empty, np.float32)
        return out

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for built in self._cache.values() for f in built.values() for a in f.values())
