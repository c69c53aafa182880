"""Latency the account interceptors (auth, rate, tier limits, credits) add per request, on SQLite and Redis.

Three `kiln serve` processes over the same tiny bundle run side by side: no accounts (the baseline), `--auth-db
sqlite:///...` and `--auth-db redis://...` (a `redis-server` started for the run, when one is installed).
Requests go to them in turn, one at a time, so machine noise hits all three alike. Two RPCs: ListModels (the
chain's cost alone: key lookup, rate admission and a balance read) and Generate on the tiny model at 1 step
(key lookup, rate, reserve, commit and the balance figures around a real, short generation).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import report, workspace

TIERS = """[tiers.bench]
daily_credits = 1000000000
requests_per_minute = 1000000
max_concurrent = 64
max_steps = 50
max_pixels = 1048576
max_images = 4
models = ["*"]
"""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=300, help="timed requests per RPC per server")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests per RPC per server first")
    p.add_argument("--out", default="quota", help="result file name under bench/results/")


def run(args: argparse.Namespace) -> Path:
    import grpc

    from bench.redis_server import RedisServer
    from proto.kiln.v1 import kiln_pb2 as pb
    from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
    from runtime.client import key_metadata

    bundle = workspace.bundle(workspace.source_model("tiny", None), "bench-tiny")
    generate = pb.GenerateRequest(model="bench-tiny", prompt="a red circle", steps=1, width=64, height=64, seed=1)
    with tempfile.TemporaryDirectory(prefix="kiln-quota-") as tmp, contextlib.ExitStack() as stack:
        tiers = Path(tmp) / "tiers.toml"
        tiers.write_text(TIERS)
        dbs = {"none": "", "sqlite": f"sqlite:///{tmp}/auth.db"}
        if shutil.which("redis-server"):
            dbs["redis"] = stack.enter_context(RedisServer(Path(tmp))).url
        targets, keys = {}, {}
        for name, db in dbs.items():
            extra: tuple[str, ...] = ()
            if db:
                keys[name] = _new_key(db, tiers)
                extra = ("--auth-db", db, "--tiers", str(tiers))
            targets[name] = stack.enter_context(workspace.server(bundle, extra=extra))
        stubs = {n: pb_grpc.KilnStub(stack.enter_context(grpc.insecure_channel(t))) for n, t in targets.items()}
        calls = {
            "ListModels": lambda stub, md: stub.ListModels(pb.ListModelsRequest(), metadata=md),
            "Generate (tiny, 1 step)": lambda stub, md: list(stub.Generate(generate, metadata=md)),
        }
        times: dict[tuple[str, str], list[float]] = {(c, n): [] for c in calls for n in dbs}
        for rpc, call in calls.items():
            for i in range(args.warmup + args.requests):
                for name in dbs:
                    md = key_metadata(keys.get(name, ""))
                    t = time.perf_counter()
                    call(stubs[name], md)
                    if i >= args.warmup:
                        times[(rpc, name)].append(time.perf_counter() - t)
    rows = []
    for rpc in calls:
        base = np.array(times[(rpc, "none")]) * 1e3
        for name in dbs:
            ms = np.array(times[(rpc, name)]) * 1e3
            p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
            added = "-" if name == "none" else \
                f"{p50 - np.percentile(base, 50):+.2f} / {p99 - np.percentile(base, 99):+.2f}"
            rows.append([rpc, name if name != "none" else "none (no accounts)", f"{p50:.2f}", f"{p99:.2f}", added])
    body = (
        f"{args.requests} timed requests per RPC per server after {args.warmup} warm-up ones, one at a time, "
        "servers in turn (`kiln serve` processes on loopback over one tiny bundle; client: Python grpcio, sync). "
        "`added`: p50 and p99 minus the no-accounts server's. Target: at most 1 ms added at p50 and 3 ms at p99 "
        "on SQLite.\n\n"
        + report.table(["RPC", "auth db", "p50 ms", "p99 ms", "added p50 / p99 ms"], rows)
    )
    return report.write(args.out, "Quota: latency the account interceptors add", body)


def _new_key(db: str, tiers: Path) -> str:
    """`kiln keys create`, as an operator would: the key is its last line of stdout."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cli.main", "keys", "create", "--auth-db", db, "--tiers", str(tiers),
                          "--tier", "bench"], cwd=workspace.ROOT, check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]
