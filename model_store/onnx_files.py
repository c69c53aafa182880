"""How a bundle stores one ONNX graph: a single `.onnx` file, or `.onnx` plus one `.onnx.data` file when its
weights pass protobuf's 2 GB limit. Used by the compiler and its quantize stage (not by the runtime, which only
reads, so `model_store` itself does not import this module or onnx).

A graph may be handled without its weights (`load_graph`): its large tensors then only say where their bytes
lie (file, offset, length), and `save_model(..., base_dir=...)` copies those bytes one tensor at a time. That is
how the compiler rewrites the 3.4 GB SD v1 UNet without ever holding its weights.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx.numpy_helper
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

TWO_GB = 2**31 - 1
"""protobuf's limit on one serialized ONNX file."""
SIZE_THRESHOLD = 1024
"""Tensors of fewer bytes stay in the `.onnx` file even when the weights go to a `.onnx.data` file."""


def load_graph(path: Path) -> onnx.ModelProto:
    """The graph in `path` with its external weights left on disk: each such tensor only names its file (relative
    to `path`'s folder), offset and length. `onnx.numpy_helper.to_array` reads one from a process whose working
    directory is that folder; `save_model(..., base_dir=path.parent)` writes the graph with them."""
    return onnx.load(str(path), load_external_data=False)


def save_model(model: onnx.ModelProto, out_path: Path, limit: int = TWO_GB - (64 << 20),
               external: bool = False, base_dir: Path | None = None) -> list[Path]:
    """Save as one .onnx file, or .onnx plus one `.onnx.data` file when its weights pass `limit` or `external`.

    External data also loads leaner: ONNX Runtime reads an inline graph's whole protobuf and keeps it beside the
    initializers made from it (measured on the int8 SD v1 UNet, 824 MB: 1510 MiB resident after loading inline,
    903 MiB from external data), so a pass that rewrites a graph read from external data writes it back that
    way. Returns the files written. Replaces existing files rather than writing into them, and never leaves
    hundreds of per-tensor files behind.

    `base_dir`: the folder the tensors still stored externally (a graph from `load_graph`) are relative to; their
    bytes are copied from there one tensor at a time, so the whole set of weights is never in memory (when the
    result is written inline, it is under `limit` and is loaded first). `out_path`'s own data file may be among
    the sources: the new files are written beside it and renamed over it. Like `onnx.save_model` with external
    data, this leaves `model`'s tensors pointing at the written data file.
    """
    on_disk = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    if on_disk and base_dir is None:
        raise ValueError(f"{len(on_disk)} tensors of the graph for {out_path.name} are stored externally "
                         f"(e.g. {on_disk[0].name!r}); pass base_dir, the folder their data files are in")
    data = out_path.with_name(out_path.name + ".data")
    stored = sum(_length(t, base_dir) for t in on_disk) if base_dir is not None else 0
    inline = not external and weight_bytes(model) + stored < limit  # the default leaves room for the graph itself
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.name}-") as tmp:
        written = Path(tmp) / out_path.name
        if inline:
            for tensor in on_disk:
                assert base_dir is not None
                tensor.raw_data = _read(tensor, base_dir)
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
            onnx.save_model(model, str(written))
        else:
            _write_external(model, Path(tmp) / data.name, base_dir)
            onnx.save_model(model, str(written))  # the graph alone: every large tensor is external now
        for stale in (out_path, data):
            if stale.exists():
                os.remove(stale)
        os.replace(written, out_path)
        if not inline:
            os.replace(Path(tmp) / data.name, data)
    return [out_path] if inline else [out_path, data]


def _write_external(model: onnx.ModelProto, data: Path, base_dir: Path | None) -> None:
    """Write every tensor of SIZE_THRESHOLD bytes or more (held in memory or read from `base_dir`) to `data`, one
    after another, and point the tensor at it."""
    with open(data, "wb") as f:
        for tensor in _get_all_tensors(model):
            if uses_external_data(tensor):
                assert base_dir is not None  # checked by save_model
                raw = _read(tensor, base_dir)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= SIZE_THRESHOLD:
                raw = tensor.raw_data
            else:
                continue
            offset = f.tell()
            f.write(raw)
            del raw
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(f.tell() - offset))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value


def _source(tensor: onnx.TensorProto, base_dir: Path) -> tuple[ExternalDataInfo, Path]:
    info = ExternalDataInfo(tensor)
    if not info.location or Path(info.location).name != info.location:
        raise ValueError(f"tensor {tensor.name!r}: external data location {info.location!r} is not a file name")
    return info, base_dir / info.location


def _length(tensor: onnx.TensorProto, base_dir: Path) -> int:
    info, path = _source(tensor, base_dir)
    return info.length if info.length is not None else path.stat().st_size - (info.offset or 0)


def _read(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    info, path = _source(tensor, base_dir)
    with open(path, "rb") as f:
        f.seek(info.offset or 0)
        raw = f.read(info.length) if info.length is not None else f.read()
    if info.length is not None and len(raw) != info.length:
        raise ValueError(f"{path} ends before tensor {tensor.name!r} "
                         f"(offset {info.offset}, length {info.length})")
    return raw


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data held in memory (ByteSize() itself fails past 2 GB)."""
    total = 0
    for t in model.graph.initializer:
        if uses_external_data(t):
            continue
        total += len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes
    return total
