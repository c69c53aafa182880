"""Scenario `switch`: time to switch between two models when the memory budget fits only one.

Two bundles of the same architecture and precision under two names (the second a twin of the first: its files
hard-linked, its manifest's name changed; the runtime serves it as another model). First a server with no budget
and `--preload all` tells what one model costs: its `memory_bytes` in ListModels (the pool's own measure). Then a
`kiln serve --memory-budget` of that plus `--budget-margin`, `--preload none`, receives requests in pairs
A, A, B, B, A, A, ...: the first of a pair finds the other model loaded and must evict it and load its own (a
**switch**), the second finds its model loaded (**warm**). After every request ListModels must show exactly the
requested model loaded (the bench fails otherwise: the budget would not be forcing switches). The same sequence on a
server with no budget and both models preloaded gives the baseline: alternating with everything resident.

Reported per server: median latency of switch and warm requests (end to end, the stream read to its end), the
time to the first event, and the load share of a switch: (switch - warm) / switch. Load times per precision and
engine in a fresh process: `cold-load-<arch>.md`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from bench import cold_load, report, workspace

PROMPT = "a photograph of an astronaut riding a horse"
POOL_FLAGS = ("--memory-budget", "--preload")
"""`kiln serve` flags the scenario needs (the model pool)."""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sd-v1", choices=["tiny", "sd-v1", "tiny-sdxl", "sdxl"])
    p.add_argument("--precision", default="int8", choices=list(cold_load.PRECISIONS))
    p.add_argument("--engine", default="onnxruntime", choices=list(cold_load.ENGINES))
    p.add_argument("--switches", type=int, default=6, help="switch requests (each followed by a warm one)")
    p.add_argument("--size", type=int, default=256, help="request width and height (0: the model's default); the "
                                                          "load does not depend on it, smaller requests end sooner")
    p.add_argument("--steps", type=int, default=2, help="denoising steps per request (0: the model's default)")
    p.add_argument("--budget-margin", type=float, default=0.5,
                   help="budget = one model's memory_bytes x (1 + this); must fit one model and not two")
    p.add_argument("--out", default="", help="result file name (default switch-<arch>)")


def pool_missing() -> list[str]:
    """The pool flags `kiln serve` lacks on this commit ([] once the model pool is there)."""
    from bench.observe import serve_flags

    flags = serve_flags()
    return [f for f in POOL_FLAGS if f not in flags]


def twin(bundle: Path, name: str, store: Path | None = None) -> Path:
    """`bundle` published again as model `name` in `store` (default: its own): the same files (hard links where the
    file system allows, else copies) and its manifest with the name changed (a store serves a bundle only under its
    manifest's name). Reused while its files match."""
    from model_store import Manifest

    target = (store or bundle.parent.parent) / name / bundle.name
    manifest = Manifest.read(bundle)
    if target.is_dir() and Manifest.read(target).files == manifest.files:
        return target
    if target.exists():
        shutil.rmtree(target)
    staging = target.parent / f".{target.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    for f in manifest.files:
        (staging / f.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(bundle / f.path, staging / f.path)
        except OSError:
            shutil.copy2(bundle / f.path, staging / f.path)
    manifest.name = name
    (staging / "manifest.json").write_text(manifest.to_json())
    staging.rename(target)
    return target


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Client:
    def __init__(self, target: str, size: int, steps: int):
        import grpc

        from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc

        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.KilnStub(self.channel)
        self.size, self.steps = size, steps

    def close(self) -> None:
        self.channel.close()

    def generate(self, model: str, seed: int) -> tuple[float, float, int]:
        """(seconds to the Started event, seconds to the end of the stream, `loading` progress events before it)."""
        from proto.kiln.v1 import kiln_pb2 as pb

        request = pb.GenerateRequest(model=model, prompt=PROMPT, seed=seed, width=self.size, height=self.size,
                                     steps=self.steps, num_images=1, omit_progress=True)
        t0 = time.perf_counter()
        started, images, loading = 0.0, 0, 0
        for event in self.stub.Generate(request, timeout=1800):
            kind = event.WhichOneof("event")
            if kind == "started":
                started = time.perf_counter() - t0
            loading += kind == "progress" and event.progress.stage == "loading"
            images += kind == "artifact"
        assert images == 1 and started > 0, (model, images, started)
        return started, time.perf_counter() - t0, loading

    def models(self) -> dict:  # type: ignore[type-arg]
        from proto.kiln.v1 import kiln_pb2 as pb

        return {m.name: m for m in self.stub.ListModels(pb.ListModelsRequest(), timeout=60).models}


def loaded(client: Client) -> dict[str, tuple[bool, int]]:
    """{model: (loaded, memory_bytes)} from ListModels."""
    from proto.kiln.v1 import kiln_pb2 as pb

    fields = pb.ModelInfo.DESCRIPTOR.fields_by_name
    if "loaded" not in fields or "memory_bytes" not in fields:
        raise RuntimeError("ListModels' ModelInfo has no `loaded` / `memory_bytes` on this commit: the model pool is "
                           "not merged")
    return {name: (m.loaded, m.memory_bytes) for name, m in client.models().items()}


def sequence(target: str, names: tuple[str, str], args: argparse.Namespace, budgeted: bool,
             pid: int) -> dict[str, list]:  # type: ignore[type-arg]
    """Requests in pairs A, A, B, B, ...; returns the timings of switch and warm requests and the RSS seen."""
    client = Client(target, args.size, args.steps)
    out: dict[str, list] = {"switch": [], "warm": [], "switch_started": [], "warm_started": [],  # type: ignore[type-arg]
                            "switch_loading": [], "warm_loading": [], "rss": []}
    try:
        client.generate(names[0], 0)  # loads A (lazily when budgeted)
        client.generate(names[0], 1)
        for i in range(args.switches):
            model = names[(i + 1) % 2]
            for kind in ("switch", "warm"):
                started, total, loading = client.generate(model, 100 + 2 * i + (kind == "warm"))
                out[kind].append(total)
                out[kind + "_started"].append(started)
                out[kind + "_loading"].append(loading)
                out["rss"].append(_rss(pid))
                state = loaded(client)
                if budgeted and {n for n, (is_loaded, _) in state.items() if is_loaded} != {model}:
                    raise RuntimeError(f"after a request for {model} the loaded models are "
                                       f"{[n for n, (ok, _) in state.items() if ok]}: the budget must hold exactly one")
            print(f"[switch] {'budget' if budgeted else 'no budget'}: {model}: switch {out['switch'][-1]:.2f} s, "
                  f"warm {out['warm'][-1]:.2f} s", file=sys.stderr, flush=True)
    finally:
        client.close()
    return out


def run(args: argparse.Namespace) -> Path:
    missing = pool_missing()
    if missing:
        raise SystemExit(f"`kiln serve` has no {', '.join(missing)} on this commit: the model pool is not merged yet")
    a = cold_load.bundle(args.arch, args.precision)
    b = twin(a, a.parent.name + "-twin")
    names = (a.parent.name, b.parent.name)
    engine = ("--engine", args.engine)

    # 1. what one model costs, by the pool's own measure: both resident, no budget
    with workspace.server(a, b, extra=(*engine, "--preload", "all")) as target:
        pid = workspace.PIDS[target]
        client = Client(target, args.size, args.steps)
        try:
            state = loaded(client)
        finally:
            client.close()
        if not all(ok for ok, _ in state.values()):
            raise RuntimeError(f"--preload all left models unloaded: {state}")
        # the smaller of the two: the first load may also have written the graph cache (runtime/graph_cache.py),
        # which its twin (the same files) and every load on the budgeted server then read, growing RSS less
        one = min(size for _, size in state.values())
        both_rss = _rss(pid)
        baseline = sequence(target, names, args, budgeted=False, pid=pid)
    if one <= 0:
        raise RuntimeError(f"ListModels reports memory_bytes={one} for a loaded {names[0]}")
    budget = int(one * (1 + args.budget_margin))

    # 2. the budget fits one: every other request switches
    with workspace.server(a, b, extra=(*engine, "--memory-budget", str(budget), "--preload", "none")) as target:
        budgeted = sequence(target, names, args, budgeted=True, pid=workspace.PIDS[target])
    return _report(args, names, one, budget, both_rss, {"budget fits one": budgeted, "no budget, both loaded": baseline})


def _report(args: argparse.Namespace, names: tuple[str, str], one: int, budget: int, both_rss: int,
            results: dict[str, dict[str, list]]) -> Path:  # type: ignore[type-arg]
    med = report.median
    rows = []
    for label, r in results.items():
        switch, warm = med(r["switch"]), med(r["warm"])
        rows.append([label, str(len(r["switch"])), f"{switch:.2f}", f"{med(r['switch_started']):.2f}",
                     str(sum(x > 0 for x in r["switch_loading"])), f"{warm:.2f}", f"{med(r['warm_started']):.2f}",
                     str(sum(x > 0 for x in r["warm_loading"])), f"{switch - warm:+.2f}",
                     f"{(switch - warm) / switch:.0%}", f"{max(r['rss']) / 2**30:.2f}"])
    size = f"{args.size}x{args.size}" if args.size else "the model's default size"
    steps = args.steps or "the model's default"
    body = (
        f"Models: `{names[0]}` and its twin `{names[1]}` (the same files hard-linked, the manifest's name changed): "
        f"`{args.arch}` architecture (random weights), {args.precision}, engine {args.engine}. One model's memory "
        f"(ListModels `memory_bytes` with both loaded, no budget): {one / 2**30:.2f} GiB; the budgeted server: "
        f"`--memory-budget {budget}` ({budget / 2**30:.2f} GiB = one model x {1 + args.budget_margin:g}) "
        "`--preload none`; ListModels after every request showed only the requested model loaded. Requests: "
        f"{size}, {steps} steps, 1 image, `omit_progress`, one client, in pairs A, A, B, B, ...: the first of a pair "
        "is a **switch** (on the budgeted server: evict the other model, load this one, generate), the second "
        "**warm**. The no-budget server ran the same sequence with both models preloaded (its process RSS with both "
        f"loaded: {both_rss / 2**30:.2f} GiB). Medians of end-to-end seconds and of the Started event's arrival (a "
        "request for a model that is not loaded waits for its load, with `loading` progress events, before it "
        "starts); loading = how many of those requests saw `loading` events. Load share = (switch - warm) / switch; "
        "max RSS = the server process's largest VmRSS read after a request.\n\n"
        + report.table(["server", "switches", "switch s", "switch Started s", "switch loading", "warm s",
                        "warm Started s", "warm loading", "switch - warm s", "load share", "max RSS GiB"], rows)
        + f"\n\nLoad time per precision and engine in a fresh process (verify, open, RSS): "
          f"[cold-load-{args.arch}.md](cold-load-{args.arch}.md).\n\n"
          "This machine has 2 cores, shared during the run with other work (other agents' builds and tests): "
          "seconds are indicative; compare the rows of one run.\n"
    )
    return report.write(args.out or f"switch-{args.arch}", f"Model switch under a memory budget ({args.arch})", body)
