"""Scenario `quality`: prompt adherence of the shapes model through a real gRPC server.

A fixed, seeded set of scenes is turned into prompts; each generated image is read back by the
plain-image-analysis checker; the table gives per-attribute accuracy and the all-attributes-right rate.
"""

from __future__ import annotations

import argparse
import io
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from bench import checker, report, workspace
from train.shapes.spec import ATTRIBUTES, Scene, all_scenes, caption


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", help="diffusers folder of a shapes model (default: the shipped one)")
    p.add_argument("--steps", default="4,8,20", help="comma-separated step counts, one table row each")
    p.add_argument("--sampler", default="", help="comma-separated samplers, rows each (default: the bundle's default)")
    p.add_argument("--guidance", type=float, default=None, help="default: the bundle's default")
    p.add_argument("--guidance-end", default="1",
                   help="comma-separated fractions of the steps that run guided (GenerateRequest.guidance_end), "
                        "rows each; default 1: every step")
    p.add_argument("--count", type=int, default=240, help="prompts (each with its own seed)")
    p.add_argument("--seed", type=int, default=0, help="chooses the prompt set")
    p.add_argument("--precision", default="fp32",
                   help="comma-separated precisions, one bundle each (e.g. fp32,int8,nf4,int4)")
    p.add_argument("--tome", default="", help="comma-separated token-merging ratios: fp32 bundles compiled with --tome")
    p.add_argument("--engine", default="onnxruntime",
                   help="comma-separated `kiln serve --engine` values (onnxruntime, openvino): a server and rows each")
    p.add_argument("--out", default="quality", help="result file name under bench/results/")


ENGINE_LABELS = {"openvino": "OpenVINO (`kiln serve --engine openvino`: its default precision, bf16 on AMX CPUs)"}


def prompt_set(count: int, seed: int) -> list[tuple[Scene, str, int]]:
    """`count` distinct scenes with their full caption and an image seed: the same for the same arguments."""
    scenes = all_scenes()
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(scenes), size=min(count, len(scenes)), replace=False)
    return [(scenes[i], caption(scenes[i], template=k % 4), 1000 + k) for k, i in enumerate(picks)]


def score(rows: list[tuple[Scene, dict]]) -> dict[str, float]:
    right: Counter[str] = Counter()
    for scene, read in rows:
        truth = scene.as_dict()
        hits = {a: read[a] == truth[a] for a in ATTRIBUTES}
        right.update(a for a, ok in hits.items() if ok)
        right["all"] += all(hits.values())
    return {k: right[k] / len(rows) for k in (*ATTRIBUTES, "all")}


def _rows(args: argparse.Namespace, names: dict[str, Path], prompts: list, engine: str, table_rows: list,
          results: dict[str, dict[str, float]]) -> float:
    """The rows of one `kiln serve --engine ENGINE` over every bundle, sampler, step count and guidance end; returns
    the guidance scale used."""
    from proto.kiln.v1 import kiln_pb2 as pb
    from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
    from runtime.client import channel

    extra = ("--engine", engine) if engine != "onnxruntime" else ()
    with workspace.server(*names.values(), timeout=120, extra=extra) as target, channel(target) as ch:
        stub = pb_grpc.KilnStub(ch)
        served = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        for name in names:
            info = served[name]
            guidance = info.default_guidance_scale if args.guidance is None else args.guidance
            for sampler in (args.sampler or info.default_sampler).split(","):
                for steps, end in ((int(s), float(e)) for s in args.steps.split(",")
                                   for e in args.guidance_end.split(",")):
                    def one(item, name=name, sampler=sampler, steps=steps, guidance=guidance, end=end):  # type: ignore[no-untyped-def]
                        scene, prompt, seed = item
                        req = pb.GenerateRequest(model=name, prompt=prompt, steps=steps, sampler=sampler,
                                                 guidance_scale=guidance, seed=seed, guidance_end=end)
                        art = [r.artifact for r in stub.Generate(req, timeout=600)
                               if r.WhichOneof("event") == "artifact"]
                        return scene, checker.read(np.asarray(Image.open(io.BytesIO(art[0].data)).convert("RGB")))

                    tome = f", ToMe {name.removeprefix('shapes-tome')}" if name.startswith("shapes-tome") else ""
                    on = f", on {ENGINE_LABELS[engine]}" if engine != "onnxruntime" else ""
                    label = f"shapes {_precision_label(info.precision)}{tome}{on}, {sampler}, {steps} steps" + (
                        f", guidance on the first {end:g} of the steps" if end < 1 else "")
                    try:
                        first = one(prompts[0])
                    except grpc.RpcError as e:  # e.g. turbo above its 4 steps: a row saying why
                        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                            raise
                        table_rows.append([label, *(["n/a"] * len(ATTRIBUTES)), f"n/a: {e.details()}"])
                        continue
                    # a few requests in flight share UNet calls (step-level batching; same images as alone)
                    with ThreadPoolExecutor(4) as pool:
                        rows = [first, *pool.map(one, prompts[1:])]
                    results[label] = acc = score(rows)
                    table_rows.append([label, *(f"{100 * acc[a]:.1f}%" for a in (*ATTRIBUTES, "all"))])
                    print(f"{label}: all {100 * acc['all']:.1f}%", flush=True)
    return guidance


def _precision_label(precision: dict[str, str]) -> str:
    """`fp32`, or e.g. `int8 (vae_decoder fp32)`: the UNet's precision and the components that differ."""
    main = precision.get("unet", "fp32")
    others = [f"{k} {v}" for k, v in sorted(precision.items()) if v != main]
    return main + (f" ({', '.join(others)})" if others else "")


def run(args: argparse.Namespace) -> Path:
    engines = [e for e in args.engine.split(",") if e]
    unknown = [e for e in engines if e not in ("onnxruntime", "openvino")]
    if unknown:
        raise SystemExit(f"--engine {','.join(unknown)}: choose from onnxruntime, openvino")

    source = workspace.source_model("shapes", args.source)
    names = {}
    for precision in args.precision.split(","):
        name = "shapes" if precision == "fp32" else f"shapes-{precision}"
        names[name] = workspace.bundle(source, name, "--precision", precision)
    for ratio in filter(None, args.tome.split(",")):
        names[f"shapes-tome{ratio}"] = workspace.bundle(source, f"shapes-tome{ratio}", "--tome", ratio)
    prompts = prompt_set(args.count, args.seed)
    table_rows = []
    results: dict[str, dict[str, float]] = {}
    for engine in engines:
        guidance = _rows(args, names, prompts, engine, table_rows, results)
    body = (
        f"{len(prompts)} prompts (distinct scenes, seeded with `--seed {args.seed}`, four caption templates, each "
        f"with its own image seed) through `kiln serve` over gRPC; guidance {guidance:g}. Each image is read "
        "by `bench/checker.py` (plain image analysis); a prompt counts as \"all\" when every attribute reads "
        "back as asked.\n\n"
        + report.table(["bundle, sampler, steps", *ATTRIBUTES, "all"], table_rows)
    )
    path = report.write(args.out, "Quality: prompt adherence of the shapes model", body)
    run.results = results  # type: ignore[attr-defined]
    return path
