"""ONNX Runtime transformer fusions (attention, LayerNorm, Gelu) restricted to ops the CPU EP runs.

GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd and NhwcConv are CUDA-only contrib ops and stay
off; packed QKV/KV layouts are off so the separate Q/K/V weights stay quantizable per channel.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter

import numpy as np
import onnx

# our component -> the optimizer's model type
MODEL_TYPES = {"unet": "unet", "text_encoder": "clip", "text_encoder_2": "clip", "vae_decoder": "vae", "vae_encoder": "vae",
               "vae_decoder_tiny": "vae"}
CUDA_ONLY = (
    "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_nhwc_conv",
    "enable_bias_add", "enable_packed_qkv", "enable_packed_kv",
)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _patch_num_heads() -> None:
    """onnxruntime's UNet attention fusion calls int() on a 1-element array, which numpy >= 2.4 rejects.

    Replace that one lookup with an equivalent that reads the element; everything else is unchanged.
    """
    mod = sys.modules.get("fusion_attention_unet")
    if mod is None or getattr(mod, "_kiln_patched", False):
        return
    cls = mod.FusionAttentionUnet
    original = cls.get_num_heads

    def get_num_heads(self, reshape_q, is_torch2=False):  # type: ignore[no-untyped-def]
        if not is_torch2:
            return original(self, reshape_q, is_torch2)
        parent = self.model.get_parent(reshape_q, 1)
        if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and value.size == 1 and int(value.reshape(-1)[0]) > 0:
                return int(value.reshape(-1)[0])
        return 0

    cls.get_num_heads = get_num_heads
    mod._kiln_patched = True


def apply(model: onnx.ModelProto, component: str) -> onnx.ModelProto:
    """Fuse `model`; returns the fused model (inputs and outputs unchanged).

    `model` may keep its weights on disk (`model_store.onnx_files.load_graph`), with the working directory at
    their folder: the fusions then read only the weights they rewrite (self-attention's Q/K/V, packed into one
    new tensor) and leave every other tensor pointing at the data file. The optimizer copies the graph several
    times over (symbolic shape inference among others), which for the SD v1 UNet with its weights loaded took
    over 20 GB; without them, each copy is a few megabytes.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    _patch_num_heads()
    model_type = MODEL_TYPES[component]
    options = FusionOptions(model_type)
    for switch in CUDA_ONLY:
        setattr(options, switch, False)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    # the UNet optimizer draws its own "fusion" tqdm bar, which would interleave with the compile's stage
    # display; tqdm reads TQDM_DISABLE only when it is imported, so tell the optimizer tqdm is absent
    unet_module = next((m for name, m in list(sys.modules.items()) if name.endswith("onnx_model_unet")
                        and hasattr(m, "is_installed")), None)
    original = unet_module.is_installed if unet_module else None
    if unet_module is not None and original is not None:
        unet_module.is_installed = lambda package: package != "tqdm" and original(package)
    # its modules log INFO under their bare names (`onnx_model_unet`, `fusion_attention`, ...)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        fused = optimize_model(
            model, model_type=model_type, opt_level=0, optimization_options=options, use_gpu=False,
            only_onnxruntime=False,
        )
    finally:
        root.setLevel(level)
        if unet_module is not None:
            unet_module.is_installed = original
    model = fused.model
    uses_ms = any(n.domain == "com.microsoft" for n in model.graph.node)
    if uses_ms and not any(o.domain == "com.microsoft" for o in model.opset_import):
        # the optimizer leaves it out; ONNX shape inference (run by the quantizers) needs it
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model
