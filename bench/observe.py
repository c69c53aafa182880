"""Scenario `observe`: latency that Prometheus metrics and JSON access logs add to a request (tiny model).

Issue 25's target: metrics + JSON logs add at most 0.5 ms to a request's p50 and p99. Each configuration is its
own `kiln serve` process on loopback over the same tiny bundle, all running at once, its log lines (stderr) written
to a file as a production service would: **plain** (the default text log; its access line per request is written
whatever the flags, so plain pays for text logging), **metrics + JSON logs** (`--metrics-port 0 --log-format
json`, scraped every `--scrape-s` seconds as Prometheus would), and **+ tracing** (`--otlp-endpoint` to an OTLP
receiver in the bench process) when `kiln serve` has that flag (the OpenTelemetry work; the row says so when it
does not). A **second plain server** is an A/A control: what two
identical servers differ by in the same run, the noise floor of the added figures. Requests are identical across
configurations (fixed seeds, `omit_progress`, the stream read to its end).

Interleaving cancels drift: one client sends request i to every configuration in turn (the order rotating ABC,
BCA, CAB: never one server twice in a row); with several concurrent clients, blocks of `--block` requests per client alternate the same way. p50/p99
pool every timed request of every round (`--rounds`, each on freshly started servers, so that one process's
luck does not pass for a configuration's cost); added = the configuration's percentile minus plain's. Server CPU ms/request is read
from /proc around each block. A second table times the sinks' work alone, in process (no network, no noise from
the other processes): what the added latency is made of.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import report, workspace

PROMPT = "a red circle on a blue background"
MODEL = "tiny-fp32"
"""The bundle's name in the bench's work store (the one `gateway` and `throughput` use too)."""
TARGET_MS = 0.5
PLAIN = "plain"
CONTROL = "second plain server"
METRICS_JSON = "metrics + JSON logs"
TRACING = "metrics + JSON logs + tracing"
CONFIGS: dict[str, tuple[str, ...]] = {
    PLAIN: (),
    CONTROL: (),  # an A/A control: what two identical servers differ by in this run (the noise floor)
    "metrics": ("--metrics-port", "0"),
    "JSON logs": ("--log-format", "json"),
    METRICS_JSON: ("--metrics-port", "0", "--log-format", "json"),
    TRACING: ("--metrics-port", "0", "--log-format", "json"),  # + the OTLP flags, when `kiln serve` has them
}
"""`kiln serve` flags per configuration (`--configs` picks; the first is the baseline)."""
SLUGS = {name: re.sub(r"[^a-z]+", "-", name.lower()).strip("-") for name in CONFIGS}
SINK_TEXT = "access log, text, to a file (plain)"
SINK_BOTH = "JSON access log + Prometheus (metrics + JSON logs)"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", default=f"{PLAIN},{CONTROL},{METRICS_JSON},{TRACING}",
                   help="comma-separated, the baseline first, from: " + ", ".join(CONFIGS))
    p.add_argument("--clients", default="1,4", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=2000,
                   help="timed requests per configuration per level, over all rounds")
    p.add_argument("--rounds", type=int, default=4,
                   help="rounds, each on freshly started servers (a process's own luck averages out)")
    p.add_argument("--block", type=int, default=5,
                   help="requests per client per interleaved block when clients > 1 (1 client: every request "
                        "alternates)")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests per configuration first")
    p.add_argument("--steps", type=int, default=4,
                   help="denoising steps per request (0: the model's default, 20); fewer make each request "
                        "shorter, so more fit and percentiles are steadier; the sinks' work does not depend on it")
    p.add_argument("--scrape-s", type=float, default=15.0,
                   help="scrape every metrics endpoint this often during the run (Prometheus' default; 0: never)")
    p.add_argument("--sink-calls", type=int, default=20000, help="calls per sink variant in the in-process table")
    p.add_argument("--out", default="observe-overhead", help="result file name under bench/results/")


def serve_flags() -> set[str]:
    """The long flags `kiln serve` takes on this commit."""
    from cli.main import parser

    serve = parser().config_commands["serve"]  # type: ignore[attr-defined]
    return {s for action in serve._actions for s in action.option_strings if s.startswith("--")}


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, list[int]]]:
    """A gRPC server answering OTLP trace exports with an empty (valid) response, the request bytes counted and
    dropped; yields its endpoint and the list of received sizes."""
    import grpc

    received: list[int] = []

    def export(request: bytes, context: grpc.ServicerContext) -> bytes:
        received.append(len(request))
        return b""  # ExportTraceServiceResponse with no fields set

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(1)


def metrics_url(log: Path, timeout: float = 30) -> str:
    """The metrics URL the server logged (`--metrics-port 0` picks the port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"metrics on (https?://[\w.:\[\]-]+/metrics)", log.read_text(errors="replace"))
        if m:
            return m.group(1)
        time.sleep(0.1)
    raise TimeoutError(f"no 'metrics on URL' line in {log} after {timeout}s")


class Scraper:
    """Scrapes metrics URLs every `period` seconds in a thread, as Prometheus would."""

    def __init__(self, urls: list[str], period: float):
        self.urls, self.period, self.scrapes = urls, period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        while not self._stop.wait(self.period):
            for url in self.urls:
                httpx.get(url, timeout=10).raise_for_status()
                self.scrapes += 1

    def __enter__(self) -> Scraper:
        if self.urls and self.period > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)


def generated_ok(url: str, model: str) -> int:
    """kiln_requests_total{model, status="OK"} over every mode, as Prometheus' text parser reads it."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = 0
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        if family.name == "kiln_requests":
            total += sum(int(s.value) for s in family.samples if s.name == "kiln_requests_total"
                         and s.labels.get("model") == model and s.labels.get("status") == "OK")
    return total


def access_lines(log: Path, json_format: bool) -> int:
    """Access-log lines for successful Generate calls in a server's log file; every line must parse as JSON in
    JSON format (ValueError naming the line otherwise)."""
    n = 0
    for i, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if json_format:
            try:
                obj = json.loads(line)
            except ValueError:
                raise ValueError(f"{log}:{i} is not JSON: {line[:200]!r}") from None
            n += obj.get("logger") == "kiln.access" and obj.get("method") == "Generate" and obj.get("status") == "OK"
        else:
            n += " kiln.access: Generate OK " in line
    return n


class Clients:
    """One grpc.aio channel per configuration's server."""

    def __init__(self, targets: dict[str, str], model: str, steps: int):
        import grpc

        from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc

        self.model, self.steps = model, steps
        self.channels = {name: grpc.aio.insecure_channel(t) for name, t in targets.items()}
        self.stubs = {name: pb_grpc.KilnStub(ch) for name, ch in self.channels.items()}

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()

    async def one(self, config: str, seed: int) -> float:
        from proto.kiln.v1 import kiln_pb2 as pb

        request = pb.GenerateRequest(model=self.model, prompt=PROMPT, seed=seed, steps=self.steps, num_images=1,
                                     omit_progress=True)
        t0 = time.perf_counter()
        images = 0
        async for event in self.stubs[config].Generate(request, timeout=600):
            images += event.WhichOneof("event") == "artifact"
        elapsed = time.perf_counter() - t0
        assert images == 1, (config, images)
        return elapsed


async def _block(clients: Clients, config: str, concurrency: int, per_client: int, seed0: int) -> list[float]:
    out: list[float] = []

    async def client(c: int) -> None:
        for i in range(per_client):
            out.append(await clients.one(config, seed0 + 1000 * c + i))

    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return out


async def _measure(targets: dict[str, str], pids: dict[str, int], model: str, levels: list[int], requests: int,
                   args: argparse.Namespace) -> tuple[dict[tuple[str, int], list[float]], dict[tuple[str, int], float]]:
    """(latencies, server CPU seconds) per (configuration, concurrency)."""
    configs = list(targets)
    clients = Clients(targets, model, args.steps)
    latencies: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], float] = {}
    try:
        for config in configs:  # warm-up: connections, first-call allocations
            await _block(clients, config, 1, args.warmup, 10**6)
        for concurrency in levels:
            per_client = 1 if concurrency == 1 else args.block
            blocks = max(1, round(requests / (per_client * concurrency)))
            for b in range(blocks):
                # rotated (ABC, BCA, CAB, ...), not mirrored (ABC, CBA): mirrored, the first and last configurations
                # get two requests back to back (A, A), on a server still warm from the last one, and look cheaper
                for config in configs[b % len(configs):] + configs[:b % len(configs)]:
                    before = _cpu_s(pids[config])
                    lat = await _block(clients, config, concurrency, per_client, b * 10)
                    cpu[(config, concurrency)] = cpu.get((config, concurrency), 0.0) + _cpu_s(pids[config]) - before
                    latencies.setdefault((config, concurrency), []).extend(lat)
                if (b + 1) % max(1, blocks // 10) == 0:
                    print(f"[observe] {concurrency} client(s): block {b + 1}/{blocks}, " + ", ".join(
                        f"{c} p50 {_pct(latencies[(c, concurrency)], 0.5) * 1e3:.2f} ms" for c in configs),
                          flush=True)
    finally:
        await clients.close()
    return latencies, cpu


def sink_costs(calls: int, steps: int) -> list[tuple[str, float]]:
    """Microseconds per request of each sink variant, in this process: the access log written to a file in text
    (what plain does) and in JSON, and the Prometheus work a request makes (the interceptor's record, the queue
    histogram, one UNet batch-size observation per step)."""
    from cli.logs import TEXT, JsonFormatter
    from runtime.server.interceptors.observe import CallRecord
    from runtime.server.logs import access_log
    from runtime.server.metrics import Metrics

    record = CallRecord("Generate", request_id="3f2a9c0d1e", model=MODEL, version="20261205-120000-abcdef12",
                        mode="text_to_image", width=64, height=64, steps=steps, sampler="dpmpp_2m_karras", images=1,
                        seconds=0.0213, stages={"text_encode": 0.0021, "denoise": 0.0152, "vae_decode": 0.0031,
                                                "png": 0.0009})
    metrics = Metrics()

    def prometheus() -> None:
        metrics.queued_for(MODEL, 0.0004)
        for _ in range(steps):
            metrics.unet_batch_rows(MODEL, 2)
        metrics.record(record)

    logger = logging.getLogger("kiln.access")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    with tempfile.TemporaryDirectory() as tmp:
        def timed(fn: Callable[[], None]) -> float:
            for _ in range(min(1000, calls)):
                fn()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - t0) / calls * 1e6

        def with_log(fmt: logging.Formatter, also: Callable[[], None] | None = None) -> float:
            handler = logging.FileHandler(Path(tmp) / "access.log")
            handler.setFormatter(fmt)
            logger.handlers, logger.propagate = [handler], False
            logger.setLevel(logging.INFO)
            def one() -> None:
                access_log(record)
                if also is not None:
                    also()

            try:
                return timed(one)
            finally:
                handler.close()

        try:
            text = with_log(logging.Formatter(TEXT))
            js = with_log(JsonFormatter())
            both = with_log(JsonFormatter(), prometheus)
        finally:
            logger.handlers, logger.propagate = saved[0], saved[1]
            logger.setLevel(saved[2])
    prom = timed(prometheus)
    return [(SINK_TEXT, text), ("access log, JSON, to a file", js),
            (f"Prometheus: record + queue + {steps} UNet batch observations", prom), (SINK_BOTH, both)]


def run(args: argparse.Namespace) -> Path:
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise SystemExit(f"unknown --configs {unknown}; choose from {', '.join(CONFIGS)}")
    levels = [int(c) for c in args.clients.split(",")]
    flags = serve_flags()
    skipped: dict[str, str] = {}
    if TRACING in configs and "--otlp-endpoint" not in flags:
        skipped[TRACING] = "not measured: `kiln serve` has no `--otlp-endpoint` on this commit (OpenTelemetry not merged)"
        configs.remove(TRACING)
    bundle = workspace.bundle(workspace.source_model("tiny", None), MODEL)
    latencies: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], float] = {}
    sent = dict.fromkeys(configs, 0)
    scrapes, received = 0, []
    for r in range(args.rounds):  # fresh processes each round: a process's own luck (cores, layout) averages out
        lat, used, n_sent, n_scrapes, n_received = _round(r, bundle, configs, levels, flags, args)
        for k, v in lat.items():
            latencies.setdefault(k, []).extend(v)
        for k, v in used.items():
            cpu[k] = cpu.get(k, 0.0) + v
        sent = {c: sent[c] + n_sent[c] for c in configs}
        scrapes, received = scrapes + n_scrapes, received + n_received
    sinks = sink_costs(args.sink_calls, args.steps or 20)
    return _report(args, configs, levels, latencies, cpu, skipped, scrapes, received, sinks, sent)


def _round(r: int, bundle: Path, configs: list[str], levels: list[int], flags: set[str], args: argparse.Namespace
           ) -> tuple[dict[tuple[str, int], list[float]], dict[tuple[str, int], float], dict[str, int], int, list[int]]:
    """One round on fresh server processes: (latencies, server CPU seconds, requests sent per configuration,
    scrapes, OTLP export sizes); RuntimeError unless every server counted and logged exactly what it was sent."""
    logs_dir = workspace.WORK / "observe"
    logs_dir.mkdir(parents=True, exist_ok=True)
    log_files = {c: logs_dir / f"{SLUGS[c]}-round{r + 1}.log" for c in configs}
    for f in log_files.values():
        f.unlink(missing_ok=True)
    received: list[int] = []
    with ExitStack() as stack:
        targets: dict[str, str] = {}
        for c in configs:
            extra = list(CONFIGS[c])
            if c == TRACING:
                endpoint, received = stack.enter_context(otlp_receiver())
                extra += ["--otlp-endpoint", endpoint] + (["--otlp-insecure"] if "--otlp-insecure" in flags else [])
            targets[c] = stack.enter_context(workspace.server(bundle, extra=tuple(extra), log=log_files[c]))
        pids = {c: workspace.PIDS[t] for c, t in targets.items()}
        urls = {c: metrics_url(log_files[c]) for c in configs if "--metrics-port" in CONFIGS[c]}
        requests = max(1, round(args.requests / args.rounds))
        with Scraper(list(urls.values()), args.scrape_s) as scraper:
            latencies, cpu = asyncio.run(_measure(targets, pids, MODEL, levels, requests, args))
        sent = {c: args.warmup + sum(len(latencies[(c, n)]) for n in levels) for c in configs}
        counted = {c: generated_ok(u, MODEL) for c, u in urls.items()}
    logged = {c: access_lines(log_files[c], "--log-format" in CONFIGS[c]) for c in configs}
    problems = [f"{c}: metrics count {counted[c]} OK requests, {sent[c]} were sent" for c in counted
                if counted[c] != sent[c]]
    problems += [f"{c}: the log file has {logged[c]} access lines for {sent[c]} requests" for c in configs
                 if logged[c] != sent[c]]
    if problems:
        raise RuntimeError(f"round {r + 1}: the configurations did not observe what they were sent: "
                           + "; ".join(problems))
    return latencies, cpu, sent, scraper.scrapes, received


def _report(args: argparse.Namespace, configs: list[str], levels: list[int],
            latencies: dict[tuple[str, int], list[float]], cpu: dict[tuple[str, int], float], skipped: dict[str, str],
            scrapes: int, received: list[int], sinks: list[tuple[str, float]], sent: dict[str, int]) -> Path:
    base = configs[0]
    rows, verdicts = [], []
    for n in levels:
        b50, b99 = _pct(latencies[(base, n)], 0.5), _pct(latencies[(base, n)], 0.99)
        for c in configs:
            lat = latencies[(c, n)]
            p50, p99 = _pct(lat, 0.5), _pct(lat, 0.99)
            added = c != base
            rows.append([str(n), c, str(len(lat)), f"{p50 * 1e3:.2f}", f"{p99 * 1e3:.2f}",
                         f"{(p50 - b50) * 1e3:+.2f}" if added else "", f"{(p99 - b99) * 1e3:+.2f}" if added else "",
                         f"{cpu[(c, n)] / len(lat) * 1e3:.2f}"])
            if added and c == CONTROL:
                control = (f"A/A control ({c} vs {base}, the same flags), {n} client{'s' if n > 1 else ''}: "
                           f"p50 {(p50 - b50) * 1e3:+.2f} ms, p99 {(p99 - b99) * 1e3:+.2f} ms")
                verdicts.append(control)
            elif added:
                parts = []
                for q, d in (("p50", (p50 - b50) * 1e3), ("p99", (p99 - b99) * 1e3)):
                    parts.append(f"{q} {d:+.2f} ms ({'met' if d <= TARGET_MS else f'missed by {d - TARGET_MS:.2f} ms'})")
                verdicts.append(f"{c}, {n} client{'s' if n > 1 else ''}: " + ", ".join(parts))
    steps = args.steps or "the model's default (20)"
    cost = dict(sinks)
    added_us = cost[SINK_BOTH] - cost[SINK_TEXT]
    tracing = (f" The OTLP receiver took {len(received)} export calls ({sum(received) / 1e3:.0f} kB)."
               if received else "")
    body = (
        f"Model: `tiny` fp32 (random weights), 64x64, {steps} steps, `dpmpp_2m_karras`, 1 image per request, "
        f"prompt {PROMPT!r}, `omit_progress` (Started and the Artifact only). Configurations (each its own `kiln "
        "serve` on loopback, all running at once, stderr written to a log file): "
        + "; ".join(f"**{c}**: `{' '.join(CONFIGS[c]) or 'no flags (text log)'}`"
                    + (" + `--otlp-endpoint` to a receiver in the bench" if c == TRACING else "") for c in configs)
        + (f". **{CONTROL}** is an A/A control (the same flags as plain): what identical servers differ by in this "
           "run, the noise floor of every added figure" if CONTROL in configs else "")
        + ". The text access line per request is written in every configuration (it cannot be turned off), so "
        "**added** = what metrics and the JSON format cost on top of a plain server's text logging. "
        f"Interleaved: 1 client sends each request to every configuration in turn, the order rotating (ABC, BCA, "
        f"CAB, ...: no server gets two in a row); at more clients, blocks of {args.block} requests per client rotate "
        "the same way. {args.warmup} warm-up requests per "
        f"configuration per round; {args.rounds} rounds, each on freshly started servers (one process's luck, e.g. its "
        "cores or memory layout, would otherwise pass for a configuration's cost); p50/p99 pool every timed "
        f"request of every round. Metrics endpoints scraped every {args.scrape_s:g} s "
        f"({scrapes} scrapes in all). Checked after the run: each metrics endpoint counted exactly the requests "
        f"sent ({', '.join(f'{c}: {n}' for c, n in sent.items())} in all), and each log file has one access line per "
        f"request (every line of the JSON ones parses).{tracing} Server CPU ms/request: CPU time (user + system, all "
        "threads) of that configuration's `kiln serve` process over its requests.\n\n"
        f"Target: metrics + JSON logs add at most {TARGET_MS:g} ms at p50 and p99. Measured: "
        + ("; ".join(verdicts) or "(one configuration only)") + ". "
        + f"The sinks' own work, in process (below): metrics + JSON logs add {added_us:.0f} µs per request of CPU "
        f"over plain's text log ({'met' if added_us <= TARGET_MS * 1e3 else 'missed'}: "
        f"{added_us / (TARGET_MS * 1e3):.0%} of the target).\n\n"
        + report.table(["clients", "configuration", "requests", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms",
                        "server CPU ms/request"], rows)
        + "".join(f"\n\n**{c}**: {why}." for c, why in skipped.items())
        + f"\n\nThe sinks' work alone, in the bench process ({args.sink_calls} calls each, a request's record with "
        "4 stage timings; log lines to a file on local disk):\n\n"
        + report.table(["work per request", "µs"], [[name, f"{us:.1f}"] for name, us in sinks])
        + "\n\nThis machine has 2 cores, shared during the run with other work (other agents' builds and tests): "
          "absolute figures are noisy, and a p99 of a few thousand requests moves by more than the target between "
          "runs; the side-by-side differences and the in-process sink times are what count. Servers and clients "
          "share the 2 cores, so every CPU microsecond a sink spends shows up as latency.\n"
    )
    return report.write(args.out, "Observability overhead: metrics + JSON logs vs plain (tiny)", body)
