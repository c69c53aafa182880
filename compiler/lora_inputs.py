"""`kiln compile --lora-inputs`: every LoRA-targetable layer of the UNet and text encoder(s) gets a low-rank delta
fed as graph inputs, so LoRA adapters can be chosen per request without recompiling.

Each target computes `y = layer(x) + up(down(x))`, where `down` [r, in] and `up` [out, r] are graph inputs
(`lora_down.PATH`, `lora_up.PATH`, PATH the module's name in the diffusers / transformers model) whose rank r
is a dynamic axis: r = 0 (empty arrays) is the bundle as compiled, several adapters are concatenated along r
with their scales folded into `up` (runtime/adapters.py). The targets are the layers kohya's and diffusers'
LoRA trainers adapt: in the UNet every Linear and 1x1 Conv2d inside a Transformer2DModel (attention
to_q/to_k/to_v/to_out.0, the feed-forward's net.0.proj and net.2, proj_in/proj_out), in the text encoder every
Linear of its layers (self_attn q/k/v/out_proj, mlp fc1/fc2); SDXL's second text encoder the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

DOWN, UP = "lora_down.", "lora_up."
"""Prefixes of a target's two input names (then its module path)."""
COMPONENTS = ("text_encoder", "text_encoder_2", "unet")
"""Components that get LoRA inputs (text_encoder_2: SDXL's, where the bundle has one)."""
EXAMPLE_RANK = 2
"""Rank of the random deltas used for tracing and for the parity check (the exported graph takes any rank)."""


@dataclass(frozen=True)
class Target:
    """One layer with a LoRA delta: its module path, width in and out, and whether it is a 1x1 convolution."""

    path: str
    in_features: int
    out_features: int
    conv: bool = False

    @property
    def down(self) -> str:
        return DOWN + self.path

    @property
    def up(self) -> str:
        return UP + self.path


def unused_layer(module: Any) -> str:
    """The module-path prefix of a CLIP text encoder's last layer, which SDXL's first text encoder does not use
    (its penultimate hidden states are the output): LoRA pairs there change nothing and get no inputs."""
    layers = next(path for path, _ in module.named_modules() if path.endswith("encoder.layers"))
    return f"{layers}.{module.config.num_hidden_layers - 1}."


def targets(component: str, module: Any, kind: str = "") -> tuple[Target, ...]:
    """The LoRA-targetable layers of a loaded UNet or CLIP text encoder, in module order; `kind`: the export
    spec's (`sdxl_text_encoder`: the last layer, which the output does not use, is left out)."""
    import torch

    skip = unused_layer(module) if kind == "sdxl_text_encoder" else None
    out: list[Target] = []
    for path, m in module.named_modules():
        if skip is not None and path.startswith(skip):
            continue
        if component == "unet":
            inside = ".attentions." in f".{path}" and (".transformer_blocks." in path or path.endswith(("proj_in", "proj_out")))
        else:
            inside = ".layers." in path and (".self_attn." in path or ".mlp." in path)
        if not inside:
            continue
        if isinstance(m, torch.nn.Linear):
            out.append(Target(path, m.in_features, m.out_features))
        elif isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1:
            out.append(Target(path, m.in_channels, m.out_channels, conv=True))
    return tuple(out)


def extend_spec(spec: Any, found: tuple[Target, ...]) -> Any:
    """The component's export spec with two inputs per target, each with its own dynamic rank axis."""
    names: list[str] = []
    axes = dict(spec.dynamic_axes)
    for i, t in enumerate(found):
        names += [t.down, t.up]
        axes[t.down] = {0: f"lora_rank_{i}"}
        axes[t.up] = {1: f"lora_rank_{i}"}
    return replace(spec, inputs=(*spec.inputs, *names), dynamic_axes=axes, lora_targets=found)


def example(found: tuple[Target, ...], rank: int = EXAMPLE_RANK) -> tuple[Any, ...]:
    """Random deltas (a fixed seed) for every target, in input order, of a trained LoRA's size: `down` with rows
    of unit norm, `up` small, so the parity check runs the delta path at the magnitudes real adapters have (large
    random deltas would blow the activations up, and with them the float error the threshold bounds)."""
    import torch

    g = torch.Generator().manual_seed(4321)
    out: list[Any] = []
    for t in found:
        out.append(torch.randn(rank, t.in_features, generator=g) / t.in_features**0.5)
        out.append(torch.randn(t.out_features, rank, generator=g) * 0.02)
    return tuple(out)


def _delta_module(base: Any, conv: bool) -> Any:
    import torch

    class WithDelta(torch.nn.Module):
        """The layer plus `up(down(x))`, its two matrices set before each call (`fed`)."""

        def __init__(self) -> None:
            super().__init__()
            self.base = base
            self.lora: tuple[Any, Any] | None = None

        def forward(self, x, *args, **kwargs):  # type: ignore[no-untyped-def]
            y = self.base(x, *args, **kwargs)
            assert self.lora is not None, "LoRA inputs are set by the export wrapper before each call"
            down, up = self.lora
            if conv:
                f = torch.nn.functional
                return y + f.conv2d(f.conv2d(x, down[:, :, None, None]), up[:, :, None, None])
            return y + torch.matmul(torch.matmul(x, down.t()), up.t())

    return WithDelta()


@contextlib.contextmanager
def injected(module: Any, found: tuple[Target, ...]) -> Iterator[dict[str, Any]]:
    """Swap each target layer of `module` for one with a LoRA delta; yields them by path, restores on exit."""
    swapped: dict[str, tuple[Any, str, Any]] = {}
    try:
        for t in found:
            parent_path, _, attr = t.path.rpartition(".")
            parent = module.get_submodule(parent_path) if parent_path else module
            base = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
            wrapped = _delta_module(base, t.conv)
            _set_child(parent, attr, wrapped)
            swapped[t.path] = (parent, attr, base)
        yield {path: _child(parent, attr) for path, (parent, attr, _) in swapped.items()}
    finally:
        for parent, attr, base in swapped.values():
            _set_child(parent, attr, base)


def _child(parent: Any, attr: str) -> Any:
    return parent[int(attr)] if attr.isdigit() else getattr(parent, attr)


def _set_child(parent: Any, attr: str, value: Any) -> None:
    if attr.isdigit():
        parent[int(attr)] = value
    else:
        setattr(parent, attr, value)


def wrap(inner: Any, module: Any, found: tuple[Target, ...], base_inputs: int) -> Any:
    """A module whose forward takes the component's own inputs, then (down, up) per target, feeds the pairs to
    the injected layers and runs `inner` (the component's export wrapper around `module`)."""
    import torch

    class WithLoraInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):  # type: ignore[no-untyped-def]
            own, pairs = args[:base_inputs], args[base_inputs:]
            with injected(module, found) as layers:
                for i, t in enumerate(found):
                    layers[t.path].lora = (pairs[2 * i], pairs[2 * i + 1])
                return self.inner(*own)

    return WithLoraInputs().eval()


def check_config(precision_plan: dict[str, str], tome: float, attention_slicing: str) -> None:
    """LoRA inputs combine with neither quantized UNet / text encoder weights nor the UNet's attention passes;
    raises ValueError saying which and why."""
    from quantize.precision import resolved

    # text_encoder_2 (SDXL) is in the plan only when given its own entry; else it follows text_encoder's
    low = [c for c in COMPONENTS if c in precision_plan and resolved(precision_plan[c]) != "fp32"]
    if low:
        raise ValueError(f"lora_inputs: {', '.join(low)} at precision {precision_plan[low[0]]!r}; per-request LoRA "
                         "inputs need fp32 UNet and text encoder graphs (the quantizers would rewrite the LoRA "
                         "MatMuls and the layers they add to). Quantize only the VAE (e.g. --precision "
                         "vae_decoder=int8), or fuse LoRAs at compile time with --lora FILE:SCALE")
    if tome or attention_slicing != "off":
        raise ValueError("lora_inputs does not combine with --tome or --attention-slicing: their attention passes "
                         "match the UNet's attention without the LoRA deltas; compile without them")
