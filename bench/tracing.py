"""Latency OpenTelemetry tracing adds per request: `kiln serve` without an endpoint (no tracing interceptor, no
engine hook) against `kiln serve --otlp-endpoint` exporting every span over OTLP/gRPC to a collector in this
process (an opentelemetry-proto TraceService that counts what it receives).

The two servers run side by side over the same tiny bundle; requests go to them in turn, one at a time, so machine
noise hits both alike. Two RPCs: ListModels (the server span alone) and Generate on the tiny model at 4 steps (the
server span, its record's attributes and 6 stage spans with a step event per step, built when the request ends).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from concurrent import futures
from pathlib import Path

import numpy as np

from bench import report, workspace


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=300, help="timed requests per RPC per server")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests per RPC per server first")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the timed Generate")
    p.add_argument("--out", default="tracing", help="result file name under bench/results/")


def run(args: argparse.Namespace) -> Path:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    from proto.kiln.v1 import kiln_pb2 as pb
    from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc

    received = {"spans": 0}

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # type: ignore[no-untyped-def]
            received["spans"] += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    bundle = workspace.bundle(workspace.source_model("tiny", None), "bench-tiny")
    generate = pb.GenerateRequest(model="bench-tiny", prompt="a red circle", steps=args.steps, width=64, height=64,
                                  seed=1)
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)  # the baseline must not trace
    os.environ.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
    modes = {"off": (), "otlp": ("--otlp-endpoint", f"http://127.0.0.1:{port}")}
    try:
        with contextlib.ExitStack() as stack:
            targets = {name: stack.enter_context(workspace.server(bundle, extra=extra)) for name, extra in modes.items()}
            stubs = {n: pb_grpc.KilnStub(stack.enter_context(grpc.insecure_channel(t))) for n, t in targets.items()}
            calls = {
                "ListModels": lambda stub: stub.ListModels(pb.ListModelsRequest()),
                f"Generate (tiny, {args.steps} steps)": lambda stub: list(stub.Generate(generate)),
            }
            times: dict[tuple[str, str], list[float]] = {(c, n): [] for c in calls for n in modes}
            for rpc, call in calls.items():
                for i in range(args.warmup + args.requests):
                    for name in modes:
                        t = time.perf_counter()
                        call(stubs[name])
                        if i >= args.warmup:
                            times[(rpc, name)].append(time.perf_counter() - t)
    finally:
        receiver.stop(None)  # after the servers stopped (and flushed their spans)
    rows = []
    for rpc in calls:
        base = np.array(times[(rpc, "off")]) * 1e3
        for name in modes:
            ms = np.array(times[(rpc, name)]) * 1e3
            p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
            added = "-" if name == "off" else \
                f"{p50 - np.percentile(base, 50):+.2f} / {p99 - np.percentile(base, 99):+.2f}"
            paired = "-" if name == "off" else f"{np.median(ms - base):+.2f}"
            rows.append([rpc, "off (no endpoint)" if name == "off" else "OTLP/gRPC to a local collector",
                         f"{p50:.2f}", f"{p99:.2f}", added, paired])
    n = args.warmup + args.requests
    body = (
        f"{args.requests} timed requests per RPC per server after {args.warmup} warm-up ones, one at a time, "
        "servers in turn (`kiln serve` processes on loopback over one tiny bundle; client: Python grpcio, sync). "
        "`added`: p50 and p99 minus the untraced server's; `paired`: the median of the differences between each "
        "request and the untraced one sent just before it (less sensitive to load that comes and goes). The collector received "
        f"{received['spans']} spans for the traced server's {n} ListModels and {n} Generate calls "
        f"({n} + {n} x 7 expected). Other agents' work shared this 2-core machine: compare the rows of one run, "
        "not runs.\n\n"
        + report.table(["RPC", "tracing", "p50 ms", "p99 ms", "added p50 / p99 ms", "paired ms"], rows)
    )
    return report.write(args.out, "Tracing: latency OpenTelemetry tracing adds", body)
