"""Scenario `gateway`: latency the HTTP gateway adds to a txt2img request, vs the same request straight over gRPC.

One `kiln serve` (the tiny model, compiled in the bench's work folder) and one `kiln gateway` in front of it, each
its own process on loopback. Clients send one image at the model's default size, steps and sampler either as
AUTOMATIC1111's `POST /sdapi/v1/txt2img` to the gateway (the response read and its JSON decoded) or as Kiln's
`Generate` to the server (the stream read to its end). Closed loop: each client sends its next request when the
last one is answered. Rounds interleave the paths (their order alternating) so that machine noise hits all alike;
percentiles pool every request of every round.

The gateway asks the server for previews (every `--preview-every` steps) only for clients that watch
`/sdapi/v1/progress`, and for step events only for clients that poll it at all (else `omit_progress`); the
bench's clients do not. The row "direct, omit_progress" is the same gRPC request the gateway sends (the server's
work identical); "direct + previews" shows what previews cost the server, i.e. what a watching client's requests
pay on top.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from bench import report, workspace

PROMPT = "a red circle on a blue background"
MODEL = "tiny-fp32"
"""The bundle's name in the bench's work store (the one `throughput` uses too)."""
PATHS = ("direct", "direct, omit_progress", "direct + previews", "gateway")
TARGET_ADDED_MS = 3.0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", default="1,8", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=300,
                   help="timed requests per path per concurrency level, over all rounds (p99 needs 100 or more)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds the requests are split into")
    p.add_argument("--warmup", type=int, default=5, help="untimed requests per path first")
    p.add_argument("--gateway-flag", action="append", default=[], metavar="FLAG",
                   help="extra `kiln gateway` flag (repeatable), e.g. --gateway-flag=--preview-watch-s=0 (previews for every request)")
    p.add_argument("--out", default="gateway-overhead", help="result file name under bench/results/")


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) a process has used: `pid` None is this process."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class Clients:
    """One grpc.aio channel and one HTTP connection pool, shared by a level's concurrent clients."""

    def __init__(self, target: str, url: str, model: str, preview_every: int, clients: int):
        import grpc
        import httpx

        from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc

        self.model, self.preview_every = model, preview_every
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.KilnStub(self.channel)
        self.http = httpx.AsyncClient(base_url=url, timeout=600,
                                      limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients))

    async def close(self) -> None:
        await self.http.aclose()
        await self.channel.close()

    async def one(self, path: str, seed: int) -> float:
        from proto.kiln.v1 import kiln_pb2 as pb

        t0 = time.perf_counter()
        if path == "gateway":
            r = await self.http.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": seed})
            r.raise_for_status()
            assert len(r.json()["images"]) == 1
        else:
            previews = self.preview_every if path == "direct + previews" else 0
            images = 0
            async for event in self.stub.Generate(pb.GenerateRequest(model=self.model, prompt=PROMPT, seed=seed,
                                                                     num_images=1, preview_every=previews,
                                                                     omit_progress=path.endswith("omit_progress")),
                                                  timeout=600):
                images += event.WhichOneof("event") == "artifact"
            assert images == 1
        return time.perf_counter() - t0


async def _level(clients: Clients, path: str, concurrency: int, per_client: int, seed0: int) -> list[float]:
    latencies: list[float] = []

    async def client(c: int) -> None:
        for i in range(per_client):
            latencies.append(await clients.one(path, seed0 + 1000 * c + i))

    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return latencies


PROCESSES = ("server", "gateway", "clients")


async def _measure(target: str, url: str, model: str, preview_every: int, levels: list[int],
                   args: argparse.Namespace) -> tuple[dict[tuple[str, int], list[float]], dict[tuple[str, int], list[float]]]:
    """(latencies, CPU seconds used by the server, the gateway and the clients) per (path, concurrency)."""
    results: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    pids = (workspace.PIDS[target], workspace.PIDS[url], None)
    for concurrency in levels:
        clients = Clients(target, url, model, preview_every, concurrency)
        try:
            for path in PATHS:  # warm-up: connections, first-call allocations, the gateway's model list
                await _level(clients, path, concurrency, max(1, args.warmup // concurrency), 10**6)
            per_client = max(1, round(args.requests / args.rounds / concurrency))
            for rnd in range(args.rounds):
                for path in (PATHS if rnd % 2 == 0 else PATHS[::-1]):
                    before = [_cpu_s(pid) for pid in pids]
                    lat = await _level(clients, path, concurrency, per_client, rnd * 10**4)
                    used = [_cpu_s(pid) - b for pid, b in zip(pids, before, strict=True)]
                    results.setdefault((path, concurrency), []).extend(lat)
                    cpu[(path, concurrency)] = [a + b for a, b in zip(cpu.get((path, concurrency), [0.0] * 3), used,
                                                                      strict=True)]
                    print(f"{concurrency} clients, round {rnd + 1}/{args.rounds}, {path}: "
                          f"p50 {_pct(lat, 0.5) * 1e3:.1f} ms", flush=True)
        finally:
            await clients.close()
    return results, cpu


def _preview_every(flags: list[str]) -> int:
    from gateway.config import GatewayConfig

    value = GatewayConfig().preview_every
    for i, flag in enumerate(flags):
        if flag.startswith("--preview-every="):
            value = int(flag.split("=", 1)[1])
        elif flag == "--preview-every" and i + 1 < len(flags):
            value = int(flags[i + 1])
    return value


def run(args: argparse.Namespace) -> Path:
    levels = [int(c) for c in args.clients.split(",")]
    model = MODEL
    bundle = workspace.bundle(workspace.source_model("tiny", None), model)
    preview_every = _preview_every(args.gateway_flag)
    with workspace.server(bundle) as target, workspace.gateway(target, *args.gateway_flag) as url:
        results, cpu = asyncio.run(_measure(target, url, model, preview_every, levels, args))

    rows = []
    for concurrency in levels:
        direct = _pct(results[("direct", concurrency)], 0.5)
        for path in PATHS:
            lat = results[(path, concurrency)]
            p50 = _pct(lat, 0.5)
            per_request = [f"{seconds / len(lat) * 1e3:.1f}" for seconds in cpu[(path, concurrency)]]
            rows.append([str(concurrency), path, str(len(lat)), f"{p50 * 1e3:.1f}", f"{_pct(lat, 0.99) * 1e3:.1f}",
                         "" if path == "direct" else f"{(p50 - direct) * 1e3:+.1f}", *per_request])
    def added(base: str) -> dict[int, float]:
        return {c: (_pct(results[("gateway", c)], 0.5) - _pct(results[(base, c)], 0.5)) * 1e3 for c in levels}

    verdict = "; ".join(
        f"vs {base}: " + ", ".join(f"{c} client{'s' if c > 1 else ''}: {a:+.1f} ms "
                                   f"({'met' if a <= TARGET_ADDED_MS else 'missed'})" for c, a in added(base).items())
        for base in ("direct", "direct, omit_progress"))
    flags = " ".join(args.gateway_flag) or "none (defaults)"
    body = (
        f"Model: `tiny` fp32 (random weights), its defaults (64x64, 20 steps, `dpmpp_2m_karras`), 1 image per request, "
        f"prompt {PROMPT!r}. `kiln serve` and `kiln gateway` (extra flags: {flags}) are separate processes on "
        "loopback; clients run in the bench process. **direct**: `Generate` over gRPC, no previews, the stream read "
        "to its end (a Progress event per step). **direct, omit_progress**: the same with `omit_progress` (Started and "
        "the Artifact only): the very request the gateway sends. **gateway**: `POST /sdapi/v1/txt2img` (httpx, "
        "keep-alive), the JSON decoded; the client does not poll `/sdapi/v1/progress`, so the gateway asks for no "
        "previews and no step events. **direct + previews**: "
        f"`Generate` with `preview_every={preview_every}`, what the gateway asks for while a client watches "
        "`/sdapi/v1/progress`: the server's preview work, for scale. "
        f"{args.rounds} interleaved rounds per concurrency level (path order alternating), closed loop; p50 and p99 "
        "pool every request of every round; added = p50 minus the direct p50 at the same concurrency. CPU "
        "ms/request: CPU time (user + system, all threads) the `kiln serve` process, the `kiln gateway` process and "
        "the bench's clients used while that path ran, over its requests.\n\n"
        f"Target: the gateway adds at most {TARGET_ADDED_MS:g} ms at p50. Measured: {verdict}.\n\n"
        + report.table(["clients", "path", "requests", "p50 ms", "p99 ms", "added p50 ms",
                        *(f"{p} CPU ms/request" for p in PROCESSES)], rows)
        + "\n\nThis machine has 2 cores, shared during the run with other work (other agents' builds and tests): "
          "absolute figures are noisy; the differences measured side by side in one run are what count. Server, "
          "gateway and clients also share the 2 cores, so the gateway's CPU time per request shows up as latency.\n"
    )
    return report.write(args.out, "Gateway overhead: HTTP (AUTOMATIC1111 txt2img) vs direct gRPC (tiny)", body)
