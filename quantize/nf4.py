"""4-bit NormalFloat (NF4) weight-only quantization: bitsandbytes-compatible packing in numpy, and the pass
that turns MatMul/Gemm with constant weights into ONNX Runtime's `com.microsoft.MatMulBnb4`.

Layout (the one bitsandbytes' `quantize_4bit(..., quant_type="nf4")` produces and MatMulBnb4 reads): the
weight as [N, K] (a torch Linear weight; ONNX MatMul's B transposed), flattened row-major and cut into
blocks of `block_size` values (a block may span rows; the last one may be short). Each block stores its
absmax as float32 and each value the index of the nearest NF4 code to value/absmax, two per byte, the first
value in the high nibble.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from quantize.weight_only import MIN_ELEMENTS, Replacement, check_block_size, check_weight, rewrite

OP_TYPE = "MatMulBnb4"
NF4 = 1
"""MatMulBnb4's quant_type for NF4 (0 is FP4)."""
BLOCK_SIZES = (16, 32, 64, 128, 256)
"""The block sizes ORT's CPU MatMulBnb4 kernel implements (bitsandbytes also takes 512-4096, ORT cannot run them)."""

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
"""The 16 NF4 values (quantiles of N(0, 1) scaled to [-1, 1]), as float32, in code order."""
# bitsandbytes rounds to the nearest code by bucketing against the float32 midpoints between codes; a value
# exactly on a midpoint takes the lower code (torch.bucketize's right=False == searchsorted's side="left").
_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
_TINY = np.float32(1e-38)  # bitsandbytes' floor for a block's absmax before taking 1/absmax
_CHUNK = 1 << 20  # values coded per step, so temporaries stay a few MB on a 50 MB weight


def quantize_nf4(weight: np.ndarray, block_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Pack a float32/float16 [N, K] weight as NF4: (uint8 [ceil(N*K/2)], float32 absmax [ceil(N*K/block_size)]).

    Byte-for-byte what bitsandbytes 0.50's `quantize_4bit(torch.from_numpy(weight), blocksize=block_size,
    quant_type="nf4")` returns (its packed tensor flattened, `state.absmax`), including its quirks: a short
    last block is divided by its absmax where full blocks multiply by the reciprocal, that block's absmax is
    floored at 1e-38 (an all-zero full block keeps 0), and an odd count is padded with 0.0, i.e. code 7.
    """
    check_block_size(block_size, BLOCK_SIZES)
    flat = check_weight(weight, "weight").reshape(-1)
    n = flat.size
    full = n - n % block_size
    blocks = flat[:full].reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, np.float32)
    codes = np.full(n + n % 2, 7, dtype=np.uint8)  # 7 codes 0.0: bitsandbytes pads an odd count with 0.0
    step = max(_CHUNK // block_size, 1)
    for first in range(0, len(blocks), step):
        part = blocks[first:first + step]
        reciprocal = np.float32(1) / np.maximum(absmax[first:first + step], _TINY)
        scaled = np.clip(part * reciprocal[:, None], -1, 1)
        codes[first * block_size:(first + len(part)) * block_size] = _nearest(scaled.reshape(-1))
    if full < n:
        tail = flat[full:]
        tail_absmax = max(np.abs(tail).max(), _TINY)
        codes[full:n] = _nearest(np.clip(tail / tail_absmax, -1, 1))
        absmax = np.append(absmax, np.float32(tail_absmax))
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax.astype(np.float32, copy=False)


def dequantize_nf4(packed: np.ndarray, absmax: np.ndarray, shape: tuple[int, ...],
                   block_size: int = 64) -> np.ndarray:
    """The float32 weight of `shape` that `quantize_nf4` packed: code * absmax of its block, as bitsandbytes'
    `dequantize_4bit` and ORT's MatMulBnb4 kernel compute it."""
    check_block_size(block_size, BLOCK_SIZES)
    n = int(np.prod(shape))
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    absmax = np.asarray(absmax, dtype=np.float32).reshape(-1)
    if packed.size != (n + 1) // 2:
        raise ValueError(f"packed has {packed.size} bytes; shape {tuple(shape)} needs {(n + 1) // 2}")
    blocks = -(-n // block_size)
    if absmax.size != blocks:
        raise ValueError(f"absmax has {absmax.size} values; shape {tuple(shape)} in blocks of {block_size} "
                         f"needs {blocks}")
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    values = NF4_CODE[codes[:n]]
    return (values * np.repeat(absmax, block_size)[:n]).reshape(shape)


def apply(model: onnx.ModelProto, block_size: int = 64, min_elements: int = MIN_ELEMENTS,
          base_dir: str | Path | None = None) -> tuple[onnx.ModelProto, dict]:
    """Replace MatMul (and Gemm) with a constant 2-D float32 weight by MatMulBnb4 holding that weight as NF4.

    Rewrites `model` in place (copying a 3.4 GB UNet would double its memory) and returns it with a report:
    `converted` node names, `skipped` {node: reason}, `kept_fp32` (converted weights another node still
    reads as fp32), and `weight_bytes_before`/`_after` of the converted weights. Skipped: B not a float32
    2-D initializer (or also a graph input), K*N < `min_elements`, Gemm with transA or alpha/beta != 1.
    Gemm's C becomes an Add after the op. `base_dir`: the model's folder, needed when it was loaded with
    `load_external_data=False`; weights are then read one by one.
    """
    check_block_size(block_size, BLOCK_SIZES)

    def quantize(weight_nk: np.ndarray) -> Replacement:
        n, k = weight_nk.shape
        packed, absmax = quantize_nf4(weight_nk, block_size)
        return Replacement(
            [numpy_helper.from_array(packed, "nf4"), numpy_helper.from_array(absmax, "nf4_absmax")],
            {"K": k, "N": n, "block_size": block_size, "quant_type": NF4},
        )

    report = rewrite(model, OP_TYPE, quantize, _kernel_limits, min_elements, base_dir)
    return model, report.as_dict(block_size=block_size, quant_type="nf4")


def _kernel_limits(k: int, n: int) -> str | None:
    if k * n >= 2**31:  # the kernel counts elements in int32
        return f"K*N={k * n} exceeds MatMulBnb4's int32 element count"
    return None


def _nearest(scaled: np.ndarray) -> np.ndarray:
    return np.searchsorted(_MIDPOINTS, scaled, side="left").astype(np.uint8)
