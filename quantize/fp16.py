"""fp16 for GPU execution providers: weights and activations in float16, with an explicit op block list.

Graph inputs and outputs stay float32 (`keep_io_types`), so the runtime feeds a fp16 bundle exactly like a
fp32 one. Whether the CPU provider can run the result is checked at compile time and recorded in the
manifest (`gpu_only`): ONNX Runtime's CPU kernels cover few float16 ops.
"""

from __future__ import annotations

from typing import Any

import onnx

BLOCK_LIST: dict[str, str] = {
    "Sin": "time embedding: sinusoids of timesteps up to 999 lose their phase in float16",
    "Cos": "time embedding: as Sin",
    "Exp": "time embedding frequencies span 1 to 1e-4",
    "Pow": "variance terms square activations that may already be large",
    "ReduceMean": "normalisation statistics",
    "Sqrt": "normalisation statistics",
    "Softmax": "attention scores (unfused) in float16 overflow before the max is subtracted",
    "Resize": "its scales input must be float32 (an ONNX type rule), and nearest upsampling gains nothing",
}
"""Ops kept in float32 inside a fp16 graph, and why."""


def convert(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """float16 copy of `model` with BLOCK_LIST ops in float32 (Casts inserted around them)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(BLOCK_LIST))
    _constants_to_initializers(model)
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=block, disable_shape_infer=True)
    kept = {op: BLOCK_LIST[op] for op in BLOCK_LIST if any(n.op_type == op for n in model.graph.node)}
    return half, {"method": "float16", "keep_io_types": True, "op_block_list": kept}


def runs_on_cpu(path: str) -> str | None:
    """None if ONNX Runtime's CPU provider can load the model, else its error message."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any load failure means "not on CPU"
        return str(e).splitlines()[0][:300]
    return None


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """The converter casts every Constant node to float16, even one feeding a blocked op (e.g. Resize's
    scales); as initializers they follow the block list."""
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
