"""int8: static QDQ for the UNet and VAE (calibrated activations, per-channel weights), dynamic for the text
encoder, with a fixed rule for the nodes that stay fp32.

Formats (measured in `python -m bench precision`): QDQ, int8 per-channel symmetric weights, activations
uint8 asymmetric by default (U8S8: the operand order AVX-512 VNNI's `vpdpbusd` and AMX take natively) or int8
(S8S8) with `activations="s8"`. ONNX Runtime's CPU provider fuses DQ -> Conv/MatMul -> Q into QLinearConv /
QLinearMatMul, so the served graph holds int8 weights only.

Weights are 7-bit by default (`weight_bits=7`: codes in [-64, 64], ONNX Runtime's `reduce_range`). On x86 CPUs
without VNNI (AVX2, AVX-512 without VNNI) ONNX Runtime's and OpenVINO's U8S8 kernels add each pair of
neighbouring uint8 x int8 products into a saturating int16 (`vpmaddubsw`): 255 x 127 x 2 = 64,770 is clamped to
32,767, and the tiny UNet's int8 output drifted 0.31 from fp32 instead of 0.055. 255 x 64 x 2 = 32,640 cannot
saturate, so 7-bit weights compute the same integers on every x86 CPU. S8S8 is no way out: ONNX Runtime turns
S8S8 QDQ into U8S8 on x86. `weight_bits=8` (full range) is for VNNI/AMX CPUs; on others the runtime serves it
through slower exact kernels or refuses it (`runtime/cpu.py`). The report records `weight_bits` and
`saturation_safe`, which the runtime reads from the manifest.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from model_store.onnx_files import load_graph, save_model
from quantize import weight_int8

ACTIVATIONS = ("u8", "s8")
WEIGHT_BITS = (7, 8)
"""7: codes in [-64, 64], exact on every x86 CPU (default); 8: [-127, 127], exact only with VNNI or AMX."""

KEEP_FP32: tuple[tuple[str, str], ...] = (
    (r"(^|/)conv_in(/|$)",
     "first conv: reads the raw latents (or pixels), whose exact values every later layer builds on"),
    (r"(^|/)conv_out(/|$)",
     "last conv: writes the output (noise prediction / pixels) directly, with no later layer to absorb error"),
    (r"(^|/)(time_proj|time_embedding)(/|$)",
     "time embedding: sinusoidal features over a wide dynamic range; M = batch, so int8 saves no time "
     "(weights stored int8, arithmetic fp32)"),
    (r"(^|/)time_emb_proj(/|$)",
     "per-resnet projections of the time embedding: M = batch (no speed to gain); an error in their input "
     "shifts every feature map of the block (weights stored int8, arithmetic fp32)"),
    (r"(^|/)(post_quant_conv|quant_conv)(/|$)",
     "1x1 convs at the latent bottleneck: 4 channels, where one int8 step is a large relative error"),
)
"""(node-name pattern, reason) for nodes whose arithmetic stays fp32 in every int8 graph. Attention-score
MatMuls (both inputs activations) also stay fp32: only MatMuls with a constant weight are quantized. The
weights of the kept MatMul/Gemm nodes are still stored as int8 (`quantize.weight_int8`)."""


def kept_nodes(model: onnx.ModelProto, op_types: Sequence[str]) -> dict[str, str]:
    """Names of the quantizable nodes the KEEP_FP32 rule keeps in fp32, with the reason for each."""
    out: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        for pattern, reason in KEEP_FP32:
            if re.search(pattern, node.name):
                out[node.name] = reason
                break
    return out


@contextmanager
def _typed_copy(model_path: Path) -> Iterator[Path]:
    """The model with every tensor's type inferred, contrib ops included.

    ONNX's own shape inference (which ONNX Runtime's quantizer runs) stops at com.microsoft ops such as
    MultiHeadAttention or SkipLayerNormalization, and the quantizer then skips every MatMul downstream
    ("failed to infer the type"). ONNX Runtime's symbolic shape inference knows those ops.

    Inference runs on the graph without its weights and the typed graph is written beside `model_path`, its
    tensors pointing at the same data file: no copy of the weights is loaded or written (the SD v1 UNet's
    typed copy alone held 7 GB when it was made with them).
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    graph = load_graph(model_path)
    with contextlib.chdir(model_path.parent):  # the few values inference reads come from the data file there
        typed = SymbolicShapeInference.infer_shapes(graph, auto_merge=True, guess_output_rank=True)
    del graph
    path = model_path.with_name(f".{model_path.name.removesuffix('.onnx')}.typed.onnx")
    try:
        onnx.save_model(typed, str(path))
        del typed
        yield path
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer warns on the root logger about pre-processing we have done (fusions,
    symbolic shapes); keep the compile's output readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_static(model_path: Path, out_path: Path, calibration: Sequence[dict[str, np.ndarray]],
                    op_types: Sequence[str] = ("Conv", "MatMul", "Gemm"), activations: str = "u8",
                    external_data: bool = False, int8_kept_weights: bool = True,
                    min_elements: int = weight_int8.MIN_ELEMENTS, weight_bits: int = 7) -> dict[str, Any]:
    """Static QDQ int8 of `op_types`, calibrated (min/max) on `calibration` feeds; writes `out_path`.

    `weight_bits`: 7 (codes in [-64, 64], saturation-safe) or 8 (see the module docstring).

    With `int8_kept_weights`, the MatMul/Gemm nodes KEEP_FP32 keeps in fp32 get weight-only int8 storage
    (weights of `min_elements` or more).
    """
    from onnxruntime.quantization import QuantType

    from quantize.calibration import activation_ranges

    if activations not in ACTIVATIONS:
        raise ValueError(f"int8 activations={activations!r} is not one of: {', '.join(ACTIVATIONS)}")
    _check_weight_bits(weight_bits)
    if not calibration:
        raise ValueError("static int8 needs at least one calibration feed")
    model = onnx.load(str(model_path), load_external_data=False)
    kept = kept_nodes(model, op_types)
    kept_products = kept_nodes(model, [t for t in op_types if t in ("MatMul", "Gemm")])
    del model
    with _typed_copy(model_path) as typed, _quiet():
        # the ranges ONNX Runtime's MinMax calibrator would find, without the copies of the weights it loads
        ranges = activation_ranges(typed, calibration, op_types)
        qdq_from_disk(
            typed, out_path, ranges, op_types=op_types,
            activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
            nodes_to_exclude=list(kept), external_data=external_data,
            reduce_range=weight_bits == 7,  # weights only: the calibrated activations keep their 8 bits
            extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": activations == "s8",
                           "WeightSymmetric": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    report = {"method": "static QDQ", "weights": "int8 per-channel symmetric", **_weight_range(weight_bits),
              "activations": "uint8 asymmetric" if activations == "u8" else "int8 symmetric",
              "calibration": "min/max", "calibration_feeds": len(calibration), "op_types": list(op_types),
              "kept_fp32": kept}
    if int8_kept_weights and kept_products:
        quantized = onnx.load(str(out_path))
        report["kept_weights"] = weight_int8.apply(quantized, kept_products, min_elements)
        save_model(quantized, out_path, external=external_data)  # as the quantizer wrote it
    return report


def qdq_from_disk(model_path: Path, out_path: Path, ranges: Any, op_types: Sequence[str], activation_type: Any,
                  nodes_to_exclude: Sequence[str], external_data: bool, reduce_range: bool,
                  extra_options: dict[str, Any]) -> None:
    """ONNX Runtime's static QDQ quantizer (`quantize_static` with `QuantFormat.QDQ`, per-channel int8 weights and
    the calibrated `ranges`, a `TensorsData`) run on the graph in `model_path` with its weights left on disk.

    `quantize_static` loads the whole model with its weights (10.3 GB for the SDXL UNet, held to the end beside the
    int8 copies it makes). Here its QDQQuantizer gets the graph without them: `onnx.numpy_helper.to_array` reads an
    external tensor from the working directory (the model's folder) into a copy of its own, without writing it
    back into the graph, so each weight is in memory only while it is quantized, and the tensors the quantizer
    leaves alone (norms, the fp32 nodes' weights) are copied from the source data file one at a time on save.
    The steps around the quantizer are `quantize_static`'s: ONNX shape inference and its mark, the opset update."""
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import add_infer_metadata, update_opset_version
    from onnxruntime.quantization.quantize import check_static_quant_arguments

    weight_type = QuantType.QInt8
    check_static_quant_arguments(QuantFormat.QDQ, activation_type, weight_type)
    with contextlib.chdir(model_path.parent):  # external tensors' locations are relative to the model's folder
        model = onnx.shape_inference.infer_shapes(load_graph(model_path))
        add_infer_metadata(model)
        model = update_opset_version(model, weight_type, activation_type)
        quantizer = QDQQuantizer(model, True, reduce_range, weight_type, activation_type, ranges, [],
                                 list(nodes_to_exclude), list(op_types), extra_options)
        quantizer.quantize_model()
        quantizer.model.topological_sort()
    save_model(quantizer.model.model, out_path, external=external_data, base_dir=model_path.parent)


def quantize_dynamic(model_path: Path, out_path: Path, external_data: bool = False,
                     weight_bits: int = 7) -> dict[str, Any]:
    """Dynamic int8 (weights per-channel, activations quantized per call) of every MatMul with a constant weight.

    `weight_bits` as in `quantize_static`: the activations are uint8 over their full range here too."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    _check_weight_bits(weight_bits)
    with _typed_copy(model_path) as typed, _quiet():
        ort_quantize_dynamic(str(typed), str(out_path), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                             weight_type=QuantType.QInt8, use_external_data_format=external_data,
                             reduce_range=weight_bits == 7,
                             extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    return {"method": "dynamic", "weights": "int8 per-channel symmetric", **_weight_range(weight_bits),
            "activations": "uint8 per call", "op_types": ["MatMul", "Gemm"], "kept_fp32": {}}


def _check_weight_bits(weight_bits: int) -> None:
    if weight_bits not in WEIGHT_BITS:
        raise ValueError(f"int8 weight_bits={weight_bits!r} is not one of: {', '.join(map(str, WEIGHT_BITS))}")


def _weight_range(weight_bits: int) -> dict[str, Any]:
    """The manifest's record of the weight codes: what `runtime/cpu.py` checks before serving on a CPU without
    VNNI (a report without `saturation_safe`, from before Kiln recorded it, counts as full range)."""
    return {"weight_bits": weight_bits, "weight_range": [-64, 64] if weight_bits == 7 else [-127, 127],
            "saturation_safe": weight_bits == 7}
