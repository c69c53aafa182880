"""Symmetric block-wise int4 weight-only quantization in numpy, and the pass that turns MatMul/Gemm with
constant weights into ONNX Runtime's `com.microsoft.MatMulNBits` (bits=4, no zero-point input).

Layout (what ORT's own MatMulNBitsQuantizer writes, byte for byte): for each output column n, K is cut into
blocks of `block_size` (the last padded); each block has one float32 scale, the signed value of largest
magnitude divided by -8, so that value maps to code 0 (-8) and the rest to round(w / scale + 8), clipped
to 0..15.
Codes are stored two per byte, the first in the low nibble: B is uint8 [N, ceil(K/block_size),
block_size/2]. Without a zero-point input the kernel subtracts 8.

We pack in numpy rather than calling `MatMulNBitsQuantizer`: given a model loaded without its external
data it looks for the data file in the working directory, it leaves Gemm alone, and it has no size
threshold or report; the graph walk here is the one nf4 uses, and tests hold our bytes equal to ORT's packer
and our outputs equal to its quantized model's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from quantize.weight_only import MIN_ELEMENTS, Replacement, check_block_size, check_weight, rewrite

OP_TYPE = "MatMulNBits"
BLOCK_SIZES = (16, 32, 64, 128, 256)
"""Block sizes allowed: MatMulNBits needs a power of two of at least 16; larger ones save little and err more."""
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
"""MatMulNBits' accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute (A quantized per block at
run time; uses VNNI where the CPU has it). On x86 the CPU kernel runs 4 as int8 and everything else as fp32."""
_CHUNK = 1 << 20  # values packed per step, so temporaries stay a few MB on a 50 MB weight


def quantize_int4(weight: np.ndarray, block_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Pack a float32/float16 [N, K] weight: (uint8 [N, ceil(K/block_size), block_size/2], float32 scales
    [N, ceil(K/block_size)]). Padding past K in the last block holds code 0, as ORT's packer leaves it."""
    check_block_size(block_size, BLOCK_SIZES)
    weight = check_weight(weight, "weight")
    n, k = weight.shape
    k_blocks = -(-k // block_size)
    packed = np.empty((n, k_blocks, block_size // 2), dtype=np.uint8)
    scales = np.empty((n, k_blocks), dtype=np.float32)
    rows = max(_CHUNK // (k_blocks * block_size), 1)
    for first in range(0, n, rows):
        part = slice(first, first + rows)
        packed[part], scales[part] = _pack_rows(weight[part], k_blocks, block_size)
    return packed, scales


def _pack_rows(weight: np.ndarray, k_blocks: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    n, k = weight.shape
    padded = np.zeros((n, k_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight  # zeros never change which value has the largest magnitude
    blocks = padded.reshape(n, k_blocks, block_size)
    hi, lo = blocks.max(axis=2), blocks.min(axis=2)
    scales = np.where(np.abs(hi) > np.abs(lo), hi, lo) / np.float32(-8)
    # ORT multiplies by the float32 reciprocal, adds the zero point, then rounds half away from zero
    # (std::roundf); np.round would round half to even, and floor(v + 0.5) can round up 0.49999997.
    # A block of subnormals has an infinite reciprocal: ±inf clamps to 15 or 0 and 0 * inf (NaN) codes 0,
    # as in ORT's packer.
    with np.errstate(over="ignore", invalid="ignore"):
        reciprocal = np.where(scales == 0, np.float32(0), np.float32(1) / np.where(scales == 0, 1, scales))
        v = blocks * reciprocal[:, :, None] + np.float32(8)
        whole = np.trunc(v)
        rounded = np.clip(whole + (v - whole >= 0.5), 0, 15)
    codes = np.where(np.isnan(v), 0, rounded).astype(np.uint8).reshape(n, -1)
    codes[:, k:] = 0
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, k_blocks, block_size // 2), scales


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, shape: tuple[int, int],
                    block_size: int = 32) -> np.ndarray:
    """The float32 [N, K] weight `quantize_int4` packed: (code - 8) * scale of its block."""
    check_block_size(block_size, BLOCK_SIZES)
    n, k = shape
    k_blocks = -(-k // block_size)
    packed = np.asarray(packed, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.float32)
    if packed.size != n * k_blocks * block_size // 2:
        raise ValueError(f"packed has {packed.size} bytes; shape {tuple(shape)} in blocks of {block_size} "
                         f"needs {n * k_blocks * block_size // 2}")
    if scales.size != n * k_blocks:
        raise ValueError(f"scales has {scales.size} values; shape {tuple(shape)} needs {n * k_blocks}")
    packed = packed.reshape(n, -1)
    codes = np.empty((n, packed.shape[1] * 2), dtype=np.int16)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    values = (codes - 8).astype(np.float32).reshape(n, k_blocks, block_size)
    return (values * scales.reshape(n, k_blocks, 1)).reshape(n, -1)[:, :k]


def apply(model: onnx.ModelProto, block_size: int = 32, accuracy_level: int = 4,
          min_elements: int = MIN_ELEMENTS, base_dir: str | Path | None = None) -> tuple[onnx.ModelProto, dict]:
    """Replace MatMul (and Gemm) with a constant 2-D float32 weight by 4-bit MatMulNBits.

    Rewrites `model` in place and returns it with the same report as `quantize.nf4.apply` (converted,
    skipped with reasons, kept_fp32, weight bytes before/after); same eligibility rules and `base_dir`.
    """
    check_block_size(block_size, BLOCK_SIZES)
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level={accuracy_level} must be one of {', '.join(map(str, ACCURACY_LEVELS))}")

    def quantize(weight_nk: np.ndarray) -> Replacement:
        n, k = weight_nk.shape
        packed, scales = quantize_int4(weight_nk, block_size)
        return Replacement(
            [numpy_helper.from_array(packed, "int4"), numpy_helper.from_array(scales.reshape(-1), "int4_scales")],
            {"K": k, "N": n, "bits": 4, "block_size": block_size, "accuracy_level": accuracy_level},
        )

    report = rewrite(model, OP_TYPE, quantize, lambda k, n: None, min_elements, base_dir)
    return model, report.as_dict(block_size=block_size, accuracy_level=accuracy_level, bits=4)
