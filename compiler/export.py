"""Export SD components (text encoder, UNet, VAE decoder/encoder) from PyTorch to ONNX."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_store.onnx_files import load_graph, save_model


@dataclass(frozen=True)
class ComponentSpec:
    """How one component is wrapped for export: its ONNX input/output names and dynamic axes."""

    name: str
    source_module: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    lora_targets: tuple[Any, ...] = ()
    """`kiln compile --lora-inputs`: the layers given a LoRA delta fed as inputs (compiler/lora_inputs.py)."""
    kind: str = ""
    """The wrapper and example inputs it uses (empty: its name). SDXL's components have their own: see
    SDXL_COMPONENTS."""


COMPONENTS: dict[str, ComponentSpec] = {
    "text_encoder": ComponentSpec(
        "text_encoder", "text_encoder", ("input_ids",), ("last_hidden_state",),
        {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}},
    ),
    "unet": ComponentSpec(
        "unet", "unet", ("sample", "timestep", "encoder_hidden_states"), ("out_sample",),
        {
            "sample": {0: "batch", 2: "height", 3: "width"},
            "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"},
            "out_sample": {0: "batch", 2: "height", 3: "width"},
        },
    ),
    "vae_decoder": ComponentSpec(
        "vae_decoder", "vae", ("latent_sample",), ("sample",),
        {"latent_sample": {0: "batch", 2: "height", 3: "width"}, "sample": {0: "batch", 2: "height", 3: "width"}},
    ),
    "vae_encoder": ComponentSpec(
        "vae_encoder", "vae", ("sample",), ("latent_moments",),
        {"sample": {0: "batch", 2: "height", 3: "width"}, "latent_moments": {0: "batch", 2: "height", 3: "width"}},
    ),
}

SDXL_COMPONENTS: dict[str, ComponentSpec] = {
    # CLIP ViT-L: its penultimate layer's hidden states (no final layer norm), as diffusers' SDXL pipelines take
    "text_encoder": ComponentSpec(
        "text_encoder", "text_encoder", ("input_ids",), ("hidden_states",),
        {"input_ids": {0: "batch"}, "hidden_states": {0: "batch"}}, kind="sdxl_text_encoder",
    ),
    # OpenCLIP bigG with projection: penultimate hidden states, and the pooled, projected output
    "text_encoder_2": ComponentSpec(
        "text_encoder_2", "text_encoder_2", ("input_ids",), ("hidden_states", "text_embeds"),
        {"input_ids": {0: "batch"}, "hidden_states": {0: "batch"}, "text_embeds": {0: "batch"}},
        kind="sdxl_text_encoder_2",
    ),
    # the text_time added conditioning: the pooled text embeddings and the six size/crop numbers
    "unet": ComponentSpec(
        "unet", "unet", ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"), ("out_sample",),
        {
            "sample": {0: "batch", 2: "height", 3: "width"},
            "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"},
            "text_embeds": {0: "batch"},
            "time_ids": {0: "batch"},
            "out_sample": {0: "batch", 2: "height", 3: "width"},
        },
        kind="sdxl_unet",
    ),
    "vae_decoder": COMPONENTS["vae_decoder"],
    "vae_encoder": COMPONENTS["vae_encoder"],
}
"""An SDXL bundle's components (compiler/source/load.py SourceModel.sdxl)."""

TINY_DECODER = ComponentSpec(
    "vae_decoder_tiny", "vae_tiny", ("latent_sample",), ("sample",),
    {"latent_sample": {0: "batch", 2: "height", 3: "width"}, "sample": {0: "batch", 2: "height", 3: "width"}},
)
"""The optional second decoder (`kiln compile --tiny-decoder`): an AutoencoderTiny's decoder, with the full
decoder's contract (latents divided by its own scaling factor in, an image in [-1, 1] out)."""

LOGVAR_FLOOR = -30.0
"""The log-variance an AutoencoderTiny encoder reports: the floor the runtime clips to (runtime/pipeline.py
LOGVAR_RANGE), so its posterior sample adds noise of std exp(-15) = 3e-7, below float32 resolution at the
latents' scale: the encoder's own latents, as diffusers' `retrieve_latents` takes them."""


def components_for(source: Any) -> dict[str, ComponentSpec]:
    """The components a compile of `source` exports: the four of every bundle, plus the tiny decoder if any."""
    extra = {TINY_DECODER.name: TINY_DECODER} if getattr(source, "tiny_decoder", None) else {}
    return {**(SDXL_COMPONENTS if getattr(source, "sdxl", False) else COMPONENTS), **extra}


def _kind(spec: ComponentSpec) -> str:
    """The wrapper and example inputs a component uses (the tiny decoder is a decoder)."""
    if spec.kind:
        return spec.kind
    return "vae_decoder" if spec is TINY_DECODER or spec.name == TINY_DECODER.name else spec.name


def vae_moments(vae: Any, sample: Any) -> Any:
    """The VAE posterior's [mean, log-variance] for images in [-1, 1], concatenated on channels. AutoencoderKL:
    its encoder (and quant_conv, where it has one); AutoencoderTiny, whose encoder is deterministic: its latents
    and a constant LOGVAR_FLOOR."""
    import torch

    if type(vae).__name__ == "AutoencoderTiny":
        z = vae.encoder(sample)
        return torch.cat([z, torch.full_like(z, LOGVAR_FLOOR)], dim=1)
    h = vae.encoder(sample)
    return vae.quant_conv(h) if getattr(vae, "quant_conv", None) is not None else h


def wrap(spec: ComponentSpec, module: Any) -> Any:
    """A torch.nn.Module whose forward takes and returns plain tensors in the spec's order."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = module

        def forward(self, input_ids):  # type: ignore[no-untyped-def]
            return self.m(input_ids, return_dict=False)[0]

    class SdxlTextEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = module

        def forward(self, input_ids):  # type: ignore[no-untyped-def]
            out = self.m(input_ids, output_hidden_states=True, return_dict=True)
            if _kind(spec) == "sdxl_text_encoder_2":
                return out.hidden_states[-2], out.text_embeds
            return out.hidden_states[-2]

    class SdxlUNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = module

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):  # type: ignore[no-untyped-def]
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.m(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]

    class UNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = module

        def forward(self, sample, timestep, encoder_hidden_states):  # type: ignore[no-untyped-def]
            return self.m(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = module

        def forward(self, latent_sample):  # type: ignore[no-untyped-def]
            return self.m.decode(latent_sample, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = module

        def forward(self, sample):  # type: ignore[no-untyped-def]
            # mean and log-variance: the runtime samples the latent itself, with its own noise.
            return vae_moments(self.m, sample)

    cls = {"text_encoder": TextEncoder, "unet": UNet, "vae_decoder": VaeDecoder, "vae_encoder": VaeEncoder,
           "sdxl_text_encoder": SdxlTextEncoder, "sdxl_text_encoder_2": SdxlTextEncoder, "sdxl_unet": SdxlUNet}
    inner = cls[_kind(spec)]().eval()
    if spec.lora_targets:
        from compiler import lora_inputs

        return lora_inputs.wrap(inner, module, spec.lora_targets, len(spec.inputs) - 2 * len(spec.lora_targets))
    return inner


def example_inputs(spec: ComponentSpec, source: Any, batch: int = 2) -> tuple[Any, ...]:
    """Inputs used for tracing and for parity checks (then small random LoRA deltas when the spec has targets).

    The UNet's spatial size is deliberately not a multiple of its total upsampling factor: that
    makes diffusers take the path that sizes each upsample from the skip connection, so the
    exported graph serves every multiple-of-8 image size, not only multiples of 64.
    """
    own = _own_example_inputs(spec, source, batch)
    if spec.lora_targets:
        from compiler import lora_inputs

        return (*own, *lora_inputs.example(spec.lora_targets))
    return own


def _own_example_inputs(spec: ComponentSpec, source: Any, batch: int) -> tuple[Any, ...]:
    import torch

    g = torch.Generator().manual_seed(1234)
    kind = _kind(spec)
    te = _text_config(source) if kind in ("text_encoder", "unet") or kind.startswith("sdxl_") else None
    if kind in ("text_encoder", "sdxl_text_encoder", "sdxl_text_encoder_2"):
        ids = torch.randint(0, te.vocab_size, (batch, te.max_position_embeddings), generator=g, dtype=torch.int64)
        if kind == "sdxl_text_encoder_2":  # the pooled output is read at the end token: put one in each row
            ids[:, -5] = te.vocab_size - 1
        return (ids,)
    latent_ch = source.vae_config["latent_channels"]
    if kind in ("unet", "sdxl_unet"):
        cfg = source.unet_config
        up = 2 ** (len(cfg["block_out_channels"]) - 1)
        h = up * 2 + 1
        w = up * 2 + 3
        args = (
            torch.randn(batch, cfg["in_channels"], h, w, generator=g),
            torch.tensor([999.0, 1.0] * (batch // 2) + [500.0] * (batch % 2)),
            torch.randn(batch, te.max_position_embeddings, cfg["cross_attention_dim"], generator=g),
        )
        if kind == "unet":
            return args
        pooled = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(cfg["addition_time_embed_dim"])
        sizes = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8], [1024, 768, 16, 8, 512, 512]], dtype=torch.float32)
        return (*args, torch.randn(batch, pooled, generator=g), sizes.repeat(batch, 1)[:batch])
    if kind == "vae_decoder":
        return (torch.randn(batch, latent_ch, 5, 7, generator=g),)
    f = source.vae_scale_factor
    return (torch.rand(batch, 3, 5 * f, 7 * f, generator=g) * 2 - 1,)


def _text_config(source: Any) -> Any:
    """The text encoder's config (vocabulary, sequence length), read without loading its weights."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig.from_pretrained(source.path / "text_encoder")


def export_component(
    spec: ComponentSpec, source: Any, out_path: Path, opset: int, log: Callable[[str], None] = print,
    external: bool = False,
) -> Path:
    """Export one component to `out_path` (plus `<name>.onnx.data` when weights exceed 2 GB, or with
    `external`: for a graph that passes will rewrite with its weights left on disk).

    torch writes a graph past 2 GB as one file per weight; those are gathered into the one data file a tensor
    at a time (`save_model` with `base_dir`), so the export never holds a second copy of the weights beside the
    PyTorch module's.
    """
    import torch

    model = wrap(spec, source.module(spec.source_module))
    args = example_inputs(spec, source)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        raw = Path(tmp) / f"{spec.name}.onnx"
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
            torch.onnx.export(
                model, args, str(raw), dynamo=False, opset_version=opset,
                input_names=list(spec.inputs), output_names=list(spec.outputs),
                dynamic_axes=spec.dynamic_axes, do_constant_folding=True,
            )
        del model
        save_model(load_graph(raw), out_path, external=external, base_dir=raw.parent)
    return out_path
