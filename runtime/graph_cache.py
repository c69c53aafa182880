"""ONNX Runtime's optimized graphs, kept on disk so that a restart opens them without optimizing them again.

Opening a session runs ONNX Runtime's graph optimizer (constant folding, fusions, and at the `ORT_ENABLE_ALL`
level the CPU's NCHWc layout) over the whole graph; on the SD v1 fp32 UNet that is most of the seconds the open
takes, at every start (issue 27: 17.8 s of a 31.4 s cold start on a 2-core EPYC). The optimizer can write what it
made (`optimized_model_filepath`); a session over that file with optimizations off is the same graph, ready at
once (its kernels still pre-pack their weights at open, as before).

Such a file is only valid where it was made: at `ORT_ENABLE_ALL` it holds layout and fused ops chosen for this
CPU and this ONNX Runtime. So an entry is keyed on everything the optimizer's output depends on: the sha256 of
the component's files (from the bundle's manifest, which the load has just verified), ONNX Runtime's version,
the CPU (model name and every /proc/cpuinfo flag), the optimization level and the session's config entries
(runtime/cpu.py's exact int8 kernels change the graph). Only CPU sessions are cached: a GPU provider's graph
partitioning is not written back faithfully.

An entry is written into a temporary folder and renamed into place, so a crash or two servers starting at once
leave either no entry or a whole one; a folder that fails to open as an entry is logged, removed and rebuilt.
The cache lives under the server's `--cache-dir` (with the hash cache), which is trusted as the bundles are:
whoever can write there can change what is served, as with the store itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.cpu import cpu_flag_set, cpu_model

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
"""Initializers of 1 KiB and more go to one external file beside the graph (a UNet passes protobuf's 2 GB)."""
KEY_FILE = "key.json"
"""What the entry was made from (written last: an entry without it is incomplete)."""
GRAPHS_DIR = "graphs"
"""The cache's folder under a server's `--cache-dir`."""
OPENVINO_DIR = "openvino"
"""OpenVINO's own compiled-model cache (`CACHE_DIR`) under a server's `--cache-dir`."""


def _cpu_identity() -> str:
    """The CPU's model name and full flag list (ONNX Runtime picks kernels and layouts from them)."""
    return f"{cpu_model()}|{' '.join(sorted(cpu_flag_set()))}"


@dataclass(frozen=True)
class GraphKey:
    """Everything an optimized graph depends on."""

    files_sha256: tuple[str, ...]
    """sha256 of the component's .onnx file and its external-data file, if any (from the verified manifest)."""
    level: str
    """ONNX Runtime's graph optimization level, e.g. `ORT_ENABLE_ALL`."""
    config: tuple[tuple[str, str], ...] = ()
    """Session config entries that change the graph, sorted."""

    def fields(self) -> dict[str, Any]:
        """The key with what it takes from this process: ONNX Runtime's version and the CPU."""
        import onnxruntime as ort

        return {"files_sha256": list(self.files_sha256), "level": self.level, "config": dict(self.config),
                "onnxruntime": ort.__version__, "cpu": _cpu_identity()}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()


class GraphCache:
    """Optimized graphs under `root/<digest>/`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def entry(self, key: GraphKey) -> Path:
        return self.root / key.digest()

    def lookup(self, key: GraphKey) -> Path | None:
        """The cached graph's .onnx file, or None when there is no complete entry."""
        d = self.entry(key)
        return d / MODEL_FILE if (d / KEY_FILE).is_file() and (d / MODEL_FILE).is_file() else None

    def staging(self) -> Path:
        """A fresh folder for the optimizer to write an entry into (then `publish`)."""
        d = self.root / f".tmp-{uuid.uuid4().hex[:12]}"
        d.mkdir(parents=True)
        return d

    def publish(self, staging: Path, key: GraphKey) -> Path | None:
        """Move a written entry into place; None (and the staging folder removed) when another process was first
        or the folder cannot be renamed."""
        (staging / KEY_FILE).write_text(json.dumps(key.fields(), indent=2) + "\n")
        target = self.entry(key)
        try:
            os.rename(staging, target)
        except OSError:  # another server published the same entry first (the target folder exists)
            shutil.rmtree(staging, ignore_errors=True)
            return None
        return target / MODEL_FILE

    def discard(self, key: GraphKey) -> None:
        """Remove an entry that failed to open."""
        shutil.rmtree(self.entry(key), ignore_errors=True)


def write_options(options, staging: Path) -> None:  # type: ignore[no-untyped-def]
    """Make a session being created write its optimized graph into `staging` (weights in one external file)."""
    options.optimized_model_filepath = str(staging / MODEL_FILE)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS_FILE)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")


def config_key(config: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((config or {}).items()))
