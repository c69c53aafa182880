"""`--engine auto`: which inference engine runs a bundle on this machine, chosen per bundle when it is loaded.

The rule follows what bench/ measured side by side (README: Performance): on an Intel Xeon with AMX, OpenVINO ran
the SD v1 int8 bundle about twice as fast as ONNX Runtime (bench/results/latency-levers-sd-v1.md: 1.95 s against
3.14 s per guided UNet step with the same modifiers), and the fp32 bundle in bf16 likewise
(bench/results/latency-cold-sd-v1.md); on an AMD EPYC with AVX2 only, ONNX Runtime's int8 was the faster (issue
27's measurement, not a result file here). So: OpenVINO where the CPU has AMX, the openvino package is installed
and OpenVINO reads every component of the bundle; ONNX Runtime everywhere else (GPUs included).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from runtime.cpu import cpu_flag_set

AUTO = "auto"
"""The `--engine` / `--model-engine NAME=` value that asks for this choice."""
OPENVINO_READS = frozenset({"fp32", "int8", "int4"})
"""Component precisions OpenVINO's ONNX frontend reads (not nf4's MatMulBnb4, not fp16 bundles, which are GPU's)."""
AMX = frozenset({"amx_bf16", "amx_int8"})


def choose_engine(precisions: Iterable[str], gpu: bool = False, flags: frozenset[str] | None = None,
                  openvino_installed: bool | None = None) -> tuple[str, str]:
    """(`openvino` or `onnxruntime`, why) for a bundle whose components have `precisions` (manifest `precision`
    values). `gpu`: the server runs ONNX Runtime on a GPU; `flags` and `openvino_installed` default to this
    machine's."""
    if gpu:
        return "onnxruntime", "a GPU device: only ONNX Runtime runs there"
    unread = sorted(set(precisions) - OPENVINO_READS)
    if unread:
        return "onnxruntime", f"its {', '.join(unread)} components are not ones OpenVINO reads"
    flags = cpu_flag_set() if flags is None else flags
    if not flags & AMX:
        return "onnxruntime", "this CPU has no AMX, where ONNX Runtime measured fastest"
    if openvino_installed is None:
        openvino_installed = importlib.util.find_spec("openvino") is not None
    if not openvino_installed:
        return "onnxruntime", "this CPU has AMX, but openvino is not installed (pip install 'kiln[openvino]')"
    return "openvino", "this CPU has AMX (bf16/int8 tiles), where OpenVINO measured fastest"
