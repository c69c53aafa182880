"""The compiler's quantize stage: one module per method (`int8`, `nf4`, `int4`, `fp16`), the per-component
precision plan (`precision`), calibration on the fp32 pipeline (`calibration`), the fidelity figures and gate
(`fidelity`), and `stage`, which `kiln compile` runs after export and verification. Never imported by the
runtime."""
