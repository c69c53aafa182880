"""How a bundle stores one ONNX graph: a single `.onnx` file, or `.onnx` plus one `.onnx.data` file when its
weights pass protobuf's 2 GB limit. Used by the compiler and its quantize stage (not by the runtime, which only
reads, so `model_store` itself does not import this module or onnx)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx.numpy_helper

TWO_GB = 2**31 - 1
"""protobuf's limit on one serialized ONNX file."""


def save_model(model: onnx.ModelProto, out_path: Path, limit: int = TWO_GB - (64 << 20),
               external: bool = False) -> list[Path]:
    """Save as one .onnx file, or .onnx plus one `.onnx.data` file when its weights pass `limit` or `external`.

    External data also loads leaner: ONNX Runtime reads an inline graph's whole protobuf and keeps it beside the
    initializers made from it (measured on the int8 SD v1 UNet, 824 MB: 1510 MiB resident after loading inline,
    903 MiB from external data), so a pass that rewrites a graph read from external data writes it back that
    way. Returns the files written. Replaces existing files rather than writing into them, and never leaves
    hundreds of per-tensor files behind.
    """
    data = out_path.with_name(out_path.name + ".data")
    for stale in (out_path, data):
        if stale.exists():
            os.remove(stale)
    if not external and weight_bytes(model) < limit:  # the default leaves room under 2 GB for the graph itself
        onnx.save_model(model, str(out_path))
        return [out_path]
    onnx.save_model(
        model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data.name, size_threshold=1024,
    )
    return [out_path, data]


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data held in memory (ByteSize() itself fails past 2 GB)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes
    return total
