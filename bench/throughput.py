"""Scenario `throughput`: requests per second and latency at 1..16 concurrent gRPC clients, batching on vs off.

Two `kiln serve` processes over the same bundle, one with step-level batching and one without (`--no-batching`),
are up side by side; each concurrency level runs on one and then the other, `--repeats` times, alternating, and
medians are reported. Every client sends `--requests` requests back to back (a closed loop), each with its own
seed; latency is from sending a request to its last image.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench import report, workspace

VARIANTS = {"batching": (), "no batching": ("--no-batching",)}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="tiny", choices=["tiny", "sd-v1"])
    p.add_argument("--size", type=int, default=0, help="width and height (0: the model's default; sd-v1: use 256)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--clients", default="1,2,4,8,16", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=4, help="requests each client sends, back to back")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=8, help="the batching server's --max-batch")
    p.add_argument("--out", default="", help="result file name (default throughput-<arch>)")


async def _client(target: str, request, n: int, seed0: int, latencies: list[float]) -> None:  # type: ignore[no-untyped-def]
    import grpc

    from proto.kiln.v1 import kiln_pb2 as pb
    from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.KilnStub(ch)
        for i in range(n):
            r = pb.GenerateRequest()
            r.CopyFrom(request)
            r.seed = seed0 + i
            t0 = time.perf_counter()
            async for _ in stub.Generate(r, timeout=3600):
                pass
            latencies.append(time.perf_counter() - t0)


def _level(target: str, request, clients: int, n: int) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    """(wall seconds, per-request latencies) for `clients` closed-loop clients of `n` requests each."""
    latencies: list[float] = []

    async def all_clients() -> None:
        await asyncio.gather(*(_client(target, request, n, 1000 * c, latencies) for c in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(all_clients())
    return time.perf_counter() - t0, latencies


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run(args: argparse.Namespace) -> Path:
    from proto.kiln.v1 import kiln_pb2 as pb

    levels = [int(c) for c in args.clients.split(",")]
    bundle = workspace.bundle(workspace.source_model(args.arch, None), f"{args.arch}-fp32")
    request = pb.GenerateRequest(model=f"{args.arch}-fp32", prompt="a red circle on a blue background",
                                 steps=args.steps, guidance_scale=args.guidance, sampler="euler",
                                 width=args.size, height=args.size)
    results: dict[tuple[str, int], list[tuple[float, list[float]]]] = {}
    extra = ("--max-batch", str(args.max_batch))
    with workspace.server(bundle, extra=extra) as on, workspace.server(bundle, extra=(*extra, "--no-batching")) as off:
        targets = {"batching": on, "no batching": off}
        for target in targets.values():  # warm-up: first-call allocations, thread pools
            _level(target, request, 2, 1)
        for rep in range(args.repeats):
            for clients in levels:
                for name in (VARIANTS if rep % 2 == 0 else list(VARIANTS)[::-1]):
                    results.setdefault((name, clients), []).append(_level(targets[name], request, clients,
                                                                          args.requests))
                    print(f"repeat {rep + 1}/{args.repeats}, {clients} clients, {name}: "
                          f"{clients * args.requests / results[(name, clients)][-1][0]:.2f} req/s", flush=True)

    rows = []
    for clients in levels:
        rps = {name: report.median([clients * args.requests / wall for wall, _ in results[(name, clients)]])
               for name in VARIANTS}
        for name in VARIANTS:
            lat = [x for _, ls in results[(name, clients)] for x in ls]
            rows.append([str(clients), name, f"{rps[name]:.2f}", f"{_pct(lat, 0.5):.3f}", f"{_pct(lat, 0.99):.3f}",
                         f"{rps[name] / rps['no batching']:.2f}x" if name == "batching" else "1.00x"])
    size = args.size or "default"
    body = (
        f"Model: `{args.arch}` fp32 (random weights), size {size}, {args.steps} steps, sampler `euler`, guidance "
        f"{args.guidance:g}, 1 image per request. Two `kiln serve` processes side by side: `--max-batch "
        f"{args.max_batch}` (step-level batching, default max wait) and `--no-batching`. Each client sends "
        f"{args.requests} requests back to back; {args.repeats} repeats per level, alternating the servers; "
        "requests/s is the median over repeats, latency percentiles pool every request of every repeat.\n\n"
        + report.table(["clients", "engine", "requests/s", "p50 latency s", "p99 latency s", "throughput vs off"],
                       rows)
    )
    return report.write(args.out or f"throughput-{args.arch}", f"Throughput: batching on vs off ({args.arch})", body)
