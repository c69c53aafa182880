"""The compiler's quantize stage: one module per method (`int8`, `nf4`, `int4`, `fp16`), the per-component
precision plan (`precision`), calibration on the fp32 pipeline (`calibration`), the fidelity figures and gate
(`fidelity`), and `stage`, which `kiln compile` runs after export and verification. Never imported by the
runtime."""

import hashlib
from pathlib import Path


def code_hash() -> str:
    """A hash of the quantize stage's code and shipped calibration prompts: what, besides the fp32 graphs and
    the config, decides a quantized bundle. Compiles record it in `tool_versions["kiln_quantize"]`."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted([*root.glob("*.py"), *root.glob("prompts/*")]):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]
