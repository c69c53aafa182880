"""Whether this CPU's int8 kernels saturate, found by running them, and what that means for a bundle's int8
components: ONNX Runtime's exact kernels, or a refusal that says what to do.

The defect (issue 21): on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) ONNX Runtime's and OpenVINO's
U8S8 kernels multiply uint8 activations by int8 weights with `vpmaddubsw`, which adds each pair of neighbouring
products into a saturating int16: 255 x 127 x 2 = 64,770 is clamped to 32,767. VNNI (`vpdpbusd`) and AMX add
them into int32, exactly. So a bundle whose int8 weights span the full [-127, 127] (`kiln compile
--int8-weight-bits 8`, and every int8 bundle compiled before Kiln recorded `saturation_safe`) computes other
numbers on such a CPU than the fidelity gate measured. Weights in [-64, 64] (the default, 7-bit) cannot saturate:
255 x 64 x 2 = 32,640.

What the runtime does with a full-range component where the probe finds saturation:
- ONNX Runtime: opens it with `session.x64quantprecision` (EXACT_KERNELS), which stores the constant int8 weights
  as uint8 (w + 128, zero point moved with them) so that the U8U8 kernels run; they widen to 16 bits before
  multiplying and are exact, at some speed (measured in README, Precision). It logs a warning naming the bundle,
  the components and the fix. Serving the same integers slower beats refusing the bundle. (ONNX Runtime 1.32
  cannot load a graph under this entry where one int8 weight feeds two products; the compile's fidelity gate
  opens every full-range component with it, so such a bundle is not published.)
- OpenVINO: has no such switch, so the bundle is refused (ManifestError) with the fix: recompile with 7-bit
  weights, or serve it with ONNX Runtime.

The verdict comes from running a tiny QDQ graph (PROBE_ONNX: a MatMul and a 3x3 Conv in the form
`quantize.int8.quantize_static` writes, weights 127, -127, 64, -64 per output channel, activations at 255) on
the engine's own kernels and comparing with the exact integers. The CPU flags are recorded beside it but decide
nothing: the kernels are what matters (AVX-VNNI, AMX or a future ONNX Runtime may differ from what flags
suggest). `KILN_INT8_SATURATES=1` or `0` overrides the verdict, so that tests on a VNNI CPU can exercise the
saturating path; the real verdict is always in `Int8Verdict.probed`.

Only numpy and onnxruntime (or openvino) are imported here: the probe graph is serialized ONNX held as bytes,
and `tests/runtime/test_cpu.py` checks that the `onnx` package builds exactly these bytes from the constants
below.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_store import ManifestError

log = logging.getLogger(__name__)

SATURATION_ENV = "KILN_INT8_SATURATES"
"""`1` or `0`: take this as the verdict instead of the probe's (tests use it to exercise both paths)."""
EXACT_KERNELS = {"session.x64quantprecision": "1"}
"""ONNX Runtime session entry for a full-range int8 component on a saturating CPU (see the module docstring)."""
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
"""/proc/cpuinfo flags that decide which int8 and bf16 kernels ONNX Runtime and OpenVINO pick."""
INTEGER_METHODS = ("static QDQ", "dynamic")
"""`quantization.method` values (quantize/int8.py) whose products run on integer kernels."""

PROBE_WEIGHTS = (127, -127, 64, -64)
"""Weight code of each output channel of both probe products: full range (saturates without VNNI) and 7-bit."""
PROBE_ROWS, PROBE_K = 4, 32
"""MatMul: x [PROBE_ROWS, PROBE_K] @ w [PROBE_K, 4]."""
PROBE_CHANNELS = 8
"""Conv: x [1, PROBE_CHANNELS, 3, 3] * w [4, PROBE_CHANNELS, 3, 3], no padding: one output position."""
PROBE_ONNX = base64.b64decode(
    "CAc6mwoKJgoEeF9tbQoCc3gKAnp4EgZ4X21tX3EiDlF1YW50aXplTGluZWFyCisKBnhfbW1fcQoCc3gKAnp4Egd4X21tX2RxIhBEZXF1YW50aXpl"
    "TGluZWFyCjwKBHdfbW0KBXN3X21tCgV6d19tbRIHd19tbV9kcSIQRGVxdWFudGl6ZUxpbmVhcioLCgRheGlzGAGgAQIKIgoHeF9tbV9kcQoHd19t"
    "bV9kcRIGeV9tbV9mIgZNYXRNdWwKKAoGeV9tbV9mCgJzeQoCenkSBnlfbW1fcSIOUXVhbnRpemVMaW5lYXIKKAoGeV9tbV9xCgJzeQoCenkSBHlf"
    "bW0iEERlcXVhbnRpemVMaW5lYXIKKgoGeF9jb252CgJzeAoCengSCHhfY29udl9xIg5RdWFudGl6ZUxpbmVhcgovCgh4X2NvbnZfcQoCc3gKAnp4"
    "Egl4X2NvbnZfZHEiEERlcXVhbnRpemVMaW5lYXIKRAoGd19jb252Cgdzd19jb252Cgd6d19jb252Egl3X2NvbnZfZHEiEERlcXVhbnRpemVMaW5l"
    "YXIqCwoEYXhpcxgAoAECCiYKCXhfY29udl9kcQoJd19jb252X2RxEgh5X2NvbnZfZiIEQ29udgosCgh5X2NvbnZfZgoCc3kKAnp5Egh5X2NvbnZf"
    "cSIOUXVhbnRpemVMaW5lYXIKLAoIeV9jb252X3EKAnN5CgJ6eRIGeV9jb252IhBEZXF1YW50aXplTGluZWFyEg9raWxuX2ludDhfcHJvYmUqDBAB"
    "QgJzeEoEgYCAOyoJEAJCAnp4SgEAKgwQAUICc3lKBAAAgD8qCRACQgJ6eUoBgCqPAQggCAQQA0IEd19tbUqAAX+BQMB/gUDAf4FAwH+BQMB/gUDA"
    "f4FAwH+BQMB/gUDAf4FAwH+BQMB/gUDAf4FAwH+BQMB/gUDAf4FAwH+BQMB/gUDAf4FAwH+BQMB/gUDAf4FAwH+BQMB/gUDAf4FAwH+BQMB/gUDA"
    "f4FAwH+BQMB/gUDAf4FAwH+BQMB/gUDAKh0IBBABQgVzd19tbUoQBAIBPAQCATwAAIA8AACAPCoRCAQQA0IFendfbW1KBAAAAAAqtQIIBAgICAMI"
    "AxADQgZ3X2NvbnZKoAJ/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/"
    "f3+BgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYFAQEBAQEBAQEBA"
    "QEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEDAwMDAwMDAwMDAwMDAwMDAwMDAwMDA"
    "wMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMAqHwgEEAFCB3N3X2NvbnZKEAQCATwEAgE8AACAPAAAgDwq"
    "EwgEEANCB3p3X2NvbnZKBAAAAABaFgoEeF9tbRIOCgwIARIICgIIBAoCCCBaIAoGeF9jb252EhYKFAgBEhAKAggBCgIICAoCCAMKAggDYhYKBHlf"
    "bW0SDgoMCAESCAoCCAQKAggEYiAKBnlfY29udhIWChQIARIQCgIIAQoCCAQKAggBCgIIAUIECgAQDQ=="
)
"""The probe graph, serialized by `tests/runtime/test_cpu.py::build_probe` (which regenerates and checks it)."""


def probe_inputs() -> dict[str, np.ndarray]:
    """Activations of 1.0, which the probe quantizes to uint8 255 (scale 1/255, zero point 0)."""
    return {"x_mm": np.ones((PROBE_ROWS, PROBE_K), np.float32),
            "x_conv": np.ones((1, PROBE_CHANNELS, 3, 3), np.float32)}


def probe_expected() -> dict[str, np.ndarray]:
    """The exact outputs: each weight code w has scale 1/|w|, so every product is +-1 and a channel's output is
    its sign times the product's depth (output scale 1, zero point 128: exact in uint8)."""
    signs = np.sign(np.array(PROBE_WEIGHTS, np.float32))
    return {"y_mm": np.tile(signs * PROBE_K, (PROBE_ROWS, 1)),
            "y_conv": (signs * PROBE_CHANNELS * 9).reshape(1, -1, 1, 1)}


@dataclass(frozen=True)
class Int8Verdict:
    engine: str
    saturates: bool
    """What the runtime acts on: the probe's finding, unless SATURATION_ENV overrides it."""
    probed: bool
    """What the probe found on this CPU."""
    detail: str
    """The probe's numbers (and the override, if any), for logs and errors."""


def run_probe(engine: str = "onnxruntime", exact_kernels: bool = False) -> dict[str, np.ndarray]:
    """The probe's outputs on `engine`'s CPU kernels (with EXACT_KERNELS on ONNX Runtime if `exact_kernels`)."""
    if engine == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        for key, value in (EXACT_KERNELS if exact_kernels else {}).items():
            options.add_session_config_entry(key, value)
        session = ort.InferenceSession(PROBE_ONNX, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, probe_inputs()), strict=True))
    if engine == "openvino":
        from runtime.sessions_openvino import require_openvino

        core = require_openvino()  # the process's one Core; OpenVinoMissing without openvino
        compiled = core.compile_model(core.read_model(PROBE_ONNX, b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled(probe_inputs())
        return {out.get_any_name(): np.asarray(result[out]) for out in compiled.outputs}
    raise ValueError(f"engine={engine!r} must be onnxruntime or openvino")


def probe_errors(outputs: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Largest |output - exact| per op and output channel (index i is PROBE_WEIGHTS[i])."""
    want = probe_expected()
    out = {}
    for name in ("y_mm", "y_conv"):
        diff = np.abs(outputs[name].astype(np.float64) - want[name]).reshape(-1, len(PROBE_WEIGHTS))
        out[name] = [float(d) for d in diff.max(axis=0)]
    return out


@functools.cache
def _probe(engine: str) -> tuple[bool, str]:
    errors = probe_errors(run_probe(engine))
    full = [i for i, w in enumerate(PROBE_WEIGHTS) if abs(w) > 64]
    saturates = any(errors[name][i] > 0.5 for name in errors for i in full)
    safe_off = {name: [e for i, e in enumerate(errs) if i not in full] for name, errs in errors.items()}
    if any(e > 0.5 for errs in safe_off.values() for e in errs):
        log.warning("%s's int8 probe is off even for 7-bit weights (%s): its int8 kernels are wrong on this CPU "
                    "in a way Kiln does not know", engine, safe_off)
    detail = (f"{engine} int8 probe, |output - exact| per weight code {PROBE_WEIGHTS}: "
              f"MatMul {errors['y_mm']}, Conv {errors['y_conv']}")
    return saturates, detail


def int8_verdict(engine: str = "onnxruntime") -> Int8Verdict:
    """Whether `engine`'s U8S8 kernels saturate on this CPU (probed once per process and engine)."""
    probed, detail = _probe(engine)
    forced = os.environ.get(SATURATION_ENV, "").strip()
    if forced not in ("", "0", "1"):
        raise ValueError(f"{SATURATION_ENV}={forced!r} must be 1, 0 or unset")
    if forced:
        detail += f"; verdict set to {'saturates' if forced == '1' else 'exact'} by {SATURATION_ENV}={forced}"
    return Int8Verdict(engine, forced == "1" if forced else probed, probed, detail)


def full_range_int8(quantization: dict[str, Any]) -> bool:
    """Whether a component's manifest `quantization` entry has integer int8 products whose weights span the full
    [-127, 127]: a static or dynamic int8 report (or an nf4/int4 one's `conv` part) without `saturation_safe`."""
    parts = [quantization, quantization.get("conv")]
    return any(isinstance(p, dict) and p.get("method") in INTEGER_METHODS and not p.get("saturation_safe", False)
               for p in parts)


def int8_session_configs(manifest: Any, engine: str = "onnxruntime") -> dict[str, dict[str, str]]:
    """ONNX Runtime session entries per component of `manifest` that this CPU needs to compute what the bundle's
    fidelity gate measured; empty where nothing saturates. Logs a warning for each bundle served through the
    slower exact kernels; raises ManifestError where `engine` has none (OpenVINO)."""
    full = [name for name, c in manifest.components.items() if full_range_int8(c.quantization)]
    if not full:
        return {}
    verdict = int8_verdict(engine)
    if not verdict.saturates:
        return {}
    what = (f"bundle {manifest.name} {manifest.version}: the int8 weights of {', '.join(full)} span the full range "
            f"(8-bit), and their uint8 x int8 products saturate on this CPU ({cpu_model()}; {describe_flags()}; "
            f"{verdict.detail})")
    fix = "recompile it with 7-bit int8 weights (`kiln compile --int8-weight-bits 7`, the default)"
    if engine != "onnxruntime":
        raise ManifestError(f"{what}. {engine} has no exact kernels for them: {fix}, or serve it with "
                            "--engine onnxruntime, which computes them exactly (slower)")
    log.warning("%s. They run on ONNX Runtime's exact U8U8 kernels (session.x64quantprecision), slower than "
                "its int8 ones; for full int8 speed on this CPU, %s", what, fix)
    return {name: dict(EXACT_KERNELS) for name in full}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    import platform

    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.cache
def cpu_flag_set() -> frozenset[str]:
    """Every flag /proc/cpuinfo lists for this CPU (x86 `flags`, Arm `Features`); empty where there is none.
    Parsed once (graph-cache keys and `--engine auto` ask for it per component and per model)."""
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_flags(names: Iterable[str] = FLAGS) -> dict[str, bool]:
    """Which of `names` /proc/cpuinfo lists for this CPU (all False where there is no /proc/cpuinfo)."""
    flags = cpu_flag_set()
    return {n: n in flags for n in names}


def describe_flags() -> str:
    """E.g. `avx2 yes; avx512f, avx512_vnni, avx_vnni, avx512_bf16, amx_bf16, amx_int8 no`."""
    flags = cpu_flags()
    if not _cpuinfo():
        return "flags unknown (no /proc/cpuinfo)"
    have = [n for n, v in flags.items() if v]
    lack = [n for n, v in flags.items() if not v]
    return "; ".join(part for part in (", ".join(have) + " yes" if have else "", ", ".join(lack) + " no" if lack
                                       else "") if part)


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
