"""Calibration and fidelity inputs: run the fp32 pipeline over shipped prompts and record what each
component is fed, so int8 scales come from the activations real requests produce; and the activation ranges
those feeds give a graph (`activation_ranges`)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.pipeline import to_vae_input

PROMPTS_FILE = Path(__file__).parent / "prompts/calibration.txt"


def prompts(path: str | Path | None = None) -> list[str]:
    """Non-empty, non-comment lines of `path` (default: the prompt set shipped with Kiln)."""
    path = Path(path) if path else PROMPTS_FILE
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    out = [ln for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


class RecordingSession:
    """A ModelSession that keeps a copy of every feed it runs (up to `limit`), and with `keep_outputs` of what it
    returned for each."""

    def __init__(self, inner, limit: int | None = None, keep_outputs: bool = False):  # type: ignore[no-untyped-def]
        self.inner = inner
        self.name = inner.name
        self.input_names = inner.input_names
        self.output_names = inner.output_names
        self.limit = limit
        self.keep_outputs = keep_outputs
        self.feeds: list[dict[str, np.ndarray]] = []
        self.outputs: list[dict[str, np.ndarray]] = []

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = self.limit is None or len(self.feeds) < self.limit
        if keep:
            self.feeds.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        out = self.inner.run(inputs)
        if keep and self.keep_outputs:
            self.outputs.append({k: np.array(v, copy=True) for k, v in out.items()})
        return out


@dataclass
class Run:
    """What one pass of the pipeline over a prompt set produced."""

    feeds: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    """Inputs each component was fed, in call order (the VAE encoder's: the decoded images, in [-1, 1])."""
    outputs: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    """With `run_pipeline(..., outputs=True)`: what each component returned for each feed (not the VAE encoder)."""
    images: list[np.ndarray] = field(default_factory=list)
    """uint8 [H, W, 3] per prompt."""
    latents: list[np.ndarray] = field(default_factory=list)
    """Final latents per prompt (before the VAE decoder)."""


def run_pipeline(model, texts: list[str], steps: int, seed: int = 0, record: bool = True,  # type: ignore[no-untyped-def]
                 size: int | None = None, outputs: bool = False) -> Run:
    """Text-to-image over `texts` at the bundle's default size (or `size` x `size`), sampler and guidance; seed + i
    per prompt."""
    from proto.kiln.v1 import kiln_pb2 as pb
    from runtime.pipeline import Pipeline
    from runtime.validate import validate

    sessions = dict(model.sessions)
    recorders = {}
    if record:
        recorders = {n: RecordingSession(s, keep_outputs=outputs) for n, s in sessions.items() if n != "vae_encoder"}
        model.sessions.update(recorders)
    result = Run()
    try:
        pipe = Pipeline(model)
        for i, text in enumerate(texts):
            request = pb.GenerateRequest(prompt=text, steps=steps, seed=seed + i, width=size or 0, height=size or 0)
            params = validate(request, model.manifest.defaults, model.manifest.limits)
            images, gen = pipe.run(params)
            assert gen.latents is not None
            result.latents.append(gen.latents[:1].copy())
            result.images.append(images[0])
    finally:
        model.sessions.clear()
        model.sessions.update(sessions)
    result.feeds = {n: r.feeds for n, r in recorders.items()}
    if outputs:
        result.outputs = {n: r.outputs for n, r in recorders.items()}
    if record:
        result.feeds["vae_encoder"] = [{"sample": to_vae_input(im)} for im in result.images]
    return result




def activation_ranges(model_path: Path, feeds: Sequence[Mapping[str, np.ndarray]], op_types: Sequence[str]) -> Any:
    """The min/max calibration ONNX Runtime's static quantizer does (its `MinMaxCalibrater`, one feed at a time),
    as an `onnxruntime.quantization.calibrate.TensorsData` to hand it through `calibration_cache_path`: the
    lowest and highest value each float activation read or written by an `op_types` node takes over `feeds`.

    ONNX Runtime's calibrator loads the graph with its weights twice and writes a third copy for its own
    session (over 10 GB for the SD v1 UNet); here the graph is read without its weights, the ReduceMin/ReduceMax
    outputs are added to it, and it is saved beside `model_path` pointing at the same data file, so only the
    session holds the weights. The ranges are the same (tested against ONNX Runtime's calibrator).
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    from model_store.onnx_files import load_graph

    stem = model_path.name.removesuffix(".onnx").lstrip(".")
    inferred = model_path.with_name(f".{stem}.inferred.onnx")
    augmented = model_path.with_name(f".{stem}.calibrate.onnx")
    try:
        # the graph ONNX Runtime's calibrator selects from: its own (ONNX) shape inference over the file
        onnx.shape_inference.infer_shapes_path(str(model_path), str(inferred))
        graph = load_graph(inferred)
        tensors = _tensors_to_calibrate(graph, op_types)

        names = [f"{t}_{op}" for t in tensors for op in ("ReduceMin", "ReduceMax")]

        def reduce(name: str) -> list[onnx.NodeProto]:  # keepdims=1 as ONNX Runtime's: it cannot reduce a 0-sized dim
            return [onnx.helper.make_node(op, [name], [f"{name}_{op}"], keepdims=1, name=f"{name}_{op}")
                    for op in ("ReduceMin", "ReduceMax")]

        # each reduction right after the node that makes its tensor (see the execution order below)
        nodes = [n for i in graph.graph.input if i.name in tensors for n in reduce(i.name)]
        for node in graph.graph.node:
            nodes.append(node)
            nodes += [n for o in node.output if o in tensors for n in reduce(o)]
        del graph.graph.node[:]
        graph.graph.node.extend(nodes)
        graph.graph.output.extend(onnx.helper.make_tensor_value_info(n, tensors[n.rsplit("_", 1)[0]], None)
                                  for n in names)
        onnx.save_model(graph, str(augmented))  # the weights stay where they are: the data file beside it
        del graph
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ONNX Runtime's
        options.log_severity_level = 3
        # Kahn's order, ties to the earlier node: each reduction runs as soon as its tensor exists, which then
        # goes (ONNX Runtime's default order ran them late: the SD v1 UNet at 512x512 peaked at 6.7 GB, not 4.0)
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.enable_cpu_mem_arena = False  # nothing kept after the last feed (and 0.35 GB less at the peak)
        session = ort.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"])
        lows: dict[str, np.ndarray] = {}
        highs: dict[str, np.ndarray] = {}
        for feed in feeds:
            values = dict(zip(names, session.run(names, dict(feed)), strict=True))
            for t in tensors:
                lo = values[f"{t}_ReduceMin"].reshape(1)
                hi = values[f"{t}_ReduceMax"].reshape(1)
                # min()/max() of the old and new value, in that order, as ONNX Runtime merges feed by feed
                lows[t] = min(lows[t], lo) if t in lows else lo
                highs[t] = max(highs[t], hi) if t in highs else hi
        del session
    finally:
        for path in (inferred, augmented):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return TensorsData(CalibrationMethod.MinMax, {t: (lows[t], highs[t]) for t in tensors})


def _tensors_to_calibrate(graph: Any, op_types: Sequence[str]) -> dict[str, int]:
    """ONNX Runtime's `CalibraterBase.select_tensors_to_calibrate`: the float inputs and outputs of `op_types`
    nodes that are not initializers and whose type shape inference found (name -> element type, in graph
    order)."""
    import onnx

    value_infos = {vi.name: vi for vi in graph.graph.value_info}
    value_infos.update({o.name: o for o in graph.graph.output})
    value_infos.update({i.name: i for i in graph.graph.input})
    initializers = {i.name for i in graph.graph.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    out: dict[str, int] = {}
    for node in graph.graph.node:
        if op_types and node.op_type not in op_types:
            continue
        for name in (*node.input, *node.output):
            vi = value_infos.get(name)
            if vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in floats \
                    and name not in initializers:
                out[name] = vi.type.tensor_type.elem_type
    return out
