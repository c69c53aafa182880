"""runtime/engine_choice.py: `--engine auto`'s rule on the CPUs Kiln meets, given as flag sets."""

from __future__ import annotations

import pytest

from runtime.engine_choice import choose_engine

XEON_AMX = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"})
EPYC_AVX2 = frozenset({"avx2", "fma", "f16c"})


@pytest.mark.parametrize(("precisions", "flags", "installed", "gpu", "engine", "why"), [
    ({"fp32"}, XEON_AMX, True, False, "openvino", "this CPU has AMX"),
    ({"int8", "fp32"}, XEON_AMX, True, False, "openvino", "this CPU has AMX"),
    ({"int4", "int8"}, XEON_AMX, True, False, "openvino", "this CPU has AMX"),
    ({"int8"}, EPYC_AVX2, True, False, "onnxruntime", "this CPU has no AMX"),
    ({"int8"}, frozenset(), True, False, "onnxruntime", "this CPU has no AMX"),  # no /proc/cpuinfo
    ({"nf4", "int8"}, XEON_AMX, True, False, "onnxruntime", "its nf4 components are not ones OpenVINO reads"),
    ({"fp16"}, XEON_AMX, True, False, "onnxruntime", "its fp16 components"),
    ({"int8"}, XEON_AMX, False, False, "onnxruntime", "openvino is not installed"),
    ({"int8"}, XEON_AMX, True, True, "onnxruntime", "a GPU device"),
])
def test_choice(precisions: set[str], flags: frozenset[str], installed: bool, gpu: bool, engine: str,
                why: str) -> None:
    got, reason = choose_engine(precisions, gpu=gpu, flags=flags, openvino_installed=installed)
    assert got == engine and why in reason, (got, reason)
