"""Two real `kiln serve` replicas behind Debian's HAProxy running deploy/haproxy.cfg (its addresses only changed), on
one real redis-server as their ledger; every client call goes through HAProxy. Credits hold across replicas, a
replica SIGKILLed mid-load is dropped by the health checks while the other keeps serving, its held credits come
back after the hold TTL, and retries with the same idempotency key are never charged twice. A third replica on
an empty store (health NOT_SERVING) shows that the checks read the health status, not just the port."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client.parser import text_string_to_metric_families

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime.client import wait_ready
from tests.conftest import ROOT, ServerProcess, free_port, kiln, redis_url
from tests.deploy.conftest import haproxy_binary
from tests.deploy.haproxy_config import for_test
from tests.server.test_quotas import _generate as quota_generate

HOLD_TTL_S = 4.0
"""The replicas' --hold-ttl: short, so a killed replica's held credits come back within the test."""

TIERS = """
[tiers.ten]
daily_credits = 10
requests_per_minute = 100000
max_concurrent = 64
max_steps = 50
max_pixels = 65536
max_images = 1
models = ["*"]

[tiers.thirty]
daily_credits = 30
requests_per_minute = 100000
max_concurrent = 64
max_steps = 50
max_pixels = 65536
max_images = 1
models = ["*"]
"""


@dataclass
class Cluster:
    target: str
    """HAProxy's gRPC frontend: the only address clients use."""
    stats_url: str
    replicas: list[ServerProcess]
    metrics_ports: list[int]
    idle: ServerProcess
    """A replica on an empty store: up, but NOT_SERVING."""
    haproxy: subprocess.Popen
    haproxy_log: Path
    ledger: str
    tiers: Path

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's stats page (CSV), the rows of backend `kiln` by server name."""
        with urllib.request.urlopen(self.stats_url, timeout=5) as r:
            text = r.read().decode().removeprefix("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == "kiln"}

    def wait_states(self, want: dict[str, str], timeout: float) -> dict[str, dict[str, str]]:
        """Until each named server's `status check_status` starts with what `want` says (e.g. "UP L7OK", "DOWN")."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if all(f"{stats[name]['status']} {stats[name]['check_status']}".startswith(state + (" " if " " not in
                   state else "")) for name, state in want.items()):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"HAProxy did not reach {want} in {timeout}s: "
                                     f"{ {k: (v['status'], v['check_status']) for k, v in stats.items()} }\n"
                                     f"{self.haproxy_log.read_text()[-3000:]}")
            time.sleep(0.1)

    def key(self, tier: str) -> str:
        out = kiln("keys", "create", "--auth-db", self.ledger, "--tiers", str(self.tiers), "--tier", tier)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    def generate_counts(self, i: int) -> dict[str, float]:
        """Replica i's kiln_requests_total by status, and its running gauge, from its /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[i]}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "kiln_requests_total":
                    out[s.labels["status"]] = out.get(s.labels["status"], 0) + s.value
                elif s.name == "kiln_requests_running":
                    out["running"] = s.value
        return out

    def served_by(self) -> dict[str, int]:
        """Generate calls per backend server, from HAProxy's own log."""
        counts: dict[str, int] = {}
        for line in self.haproxy_log.read_text().splitlines():
            if "/kiln.v1.Kiln/Generate" in line and " kiln/" in line:
                server = line.split(" kiln/")[1].split()[0]
                counts[server] = counts.get(server, 0) + 1
        return counts


@pytest.fixture(scope="module")
def cluster(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    binary = haproxy_binary()
    root = tmp_path_factory.mktemp("haproxy")
    (root / "empty-store").mkdir()
    tiers = root / "tiers.toml"
    tiers.write_text(TIERS)
    with redis_url(root) as ledger:
        ports = [free_port() for _ in range(3)]
        metrics = [free_port() for _ in range(2)]
        grpc_port, stats_port = free_port(), free_port()
        config = root / "haproxy.cfg"
        config.write_text(for_test(grpc_port, stats_port, [f"127.0.0.1:{p}" for p in ports]))
        check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        log = root / "haproxy.log"
        with open(log, "w") as out:  # -db: foreground; its log goes to stdout (log stdout in the file)
            haproxy = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
        common = ("--auth-db", ledger, "--tiers", str(tiers), "--hold-ttl", str(HOLD_TTL_S), "--threads", "1")
        started: list[ServerProcess] = []
        try:
            # HAProxy checks the replicas while they start (refused, then SERVING; the empty one NOT_SERVING)
            for i, port in enumerate(ports):
                store = tiny_store if i < 2 else root / "empty-store"
                extra = ("--metrics-port", str(metrics[i])) if i < 2 else ()
                started.append(_spawn(store, root / f"serve{i}.log", port, *common, *extra))
            replicas = started
            for server in replicas[:2]:
                try:
                    wait_ready(server.target, timeout=60)
                except TimeoutError:
                    raise AssertionError(f"server did not become ready:\n{server.log()}") from None
            c = Cluster(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{stats_port}/stats;csv", replicas[:2], metrics,
                        replicas[2], haproxy, log, ledger, tiers)
            # the empty-store replica listens and answers, but NOT_SERVING: the check's timeout keeps it out
            c.wait_states({"kiln1": "UP L7OK", "kiln2": "UP L7OK", "kiln3": "DOWN L7TOUT"}, timeout=20)
            yield c
        finally:
            for s in started:
                s.stop()
            haproxy.terminate()
            haproxy.wait(10)


def _spawn(store: Path, log_path: Path, port: int, *extra: str) -> ServerProcess:
    """`kiln serve` on a chosen port (HAProxy's config names it first), not yet waited for."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--store", str(store), "--port", str(port), *extra],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return ServerProcess(proc, f"127.0.0.1:{port}", log_path)


def _request(**kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"model": "tiny", "prompt": "a red circle", "steps": 2, "seed": 1, **kw})  # type: ignore[arg-type]


async def _generate(target: str, key: str, request: pb.GenerateRequest, *metadata: tuple[str, str]
                    ) -> tuple[grpc.StatusCode, list[pb.GenerateResponse], status_pb2.Status]:
    code, got, _, status = await quota_generate(target, key, request, *metadata, timeout=60)
    return code, got, status


def _reason(status: status_pb2.Status) -> str:
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return info.reason
    return ""


def _balance(target: str, key: str) -> pb.Balance:
    with grpc.insecure_channel(target) as ch:
        return pb_grpc.KilnStub(ch).GetBalance(pb.GetBalanceRequest(),
                                               metadata=(("authorization", f"Bearer {key}"),), timeout=10)


def _png(responses: list[pb.GenerateResponse]) -> bytes:
    data = responses[-1].artifact.data
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def test_64_calls_on_10_credits_through_haproxy(cluster: Cluster) -> None:
    key = cluster.key("ten")
    before = [cluster.generate_counts(i) for i in range(2)]
    served_before = cluster.served_by()

    async def all_calls():  # type: ignore[no-untyped-def]
        return await asyncio.gather(*(_generate(cluster.target, key, _request(seed=i)) for i in range(64)))

    results = asyncio.run(all_calls())
    codes = [r[0] for r in results]
    assert codes.count(grpc.StatusCode.OK) == 10, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 54, codes
    assert all(_reason(r[2]) == "CREDITS_EXHAUSTED" for r in results if r[0] != grpc.StatusCode.OK)
    assert all(r[1][0].started.cost == 1 and _png(r[1]) for r in results if r[0] == grpc.StatusCode.OK)
    # both replicas took calls (their own counters), and together answered each call once
    after = [cluster.generate_counts(i) for i in range(2)]
    by_replica = [{k: after[i].get(k, 0) - before[i].get(k, 0) for k in ("OK", "RESOURCE_EXHAUSTED")}
                  for i in range(2)]
    assert all(sum(d.values()) > 0 for d in by_replica), by_replica
    assert sum(d["OK"] for d in by_replica) == 10 and sum(d["RESOURCE_EXHAUSTED"] for d in by_replica) == 54
    served = cluster.served_by()
    assert served.get("kiln1", 0) > served_before.get("kiln1", 0) and served.get("kiln2", 0) > served_before.get(
        "kiln2", 0) and served.get("kiln3", 0) == 0, served
    b = _balance(cluster.target, key)
    assert (b.spent, b.held, b.remaining) == (10, 0, 0)


def test_a_replica_killed_mid_load(cluster: Cluster) -> None:
    """Last in this module: it kills one of the module's replicas."""
    key, other_key = cluster.key("thirty"), cluster.key("ten")
    cost = 3  # 30 steps at 256 x 256: long enough to be mid-run at the kill
    jobs = {f"job-{i}": _request(steps=30, width=256, height=256, seed=i) for i in range(4)}
    idem = "x-idempotency-key"

    async def kill_mid_load():  # type: ignore[no-untyped-def]
        async with grpc.aio.insecure_channel(cluster.target) as ch:
            stub = pb_grpc.KilnStub(ch)
            calls = {name: stub.Generate(request, timeout=60, metadata=(("authorization", f"Bearer {key}"),
                                                                        (idem, name)))
                     for name, request in jobs.items()}
            for call in calls.values():  # every job is running, its credits held...
                async for r in call:
                    if r.HasField("progress"):
                        break
            running = [(await asyncio.to_thread(cluster.generate_counts, i)).get("running", 0) for i in range(2)]
            victim = 0 if running[0] else 1
            assert running[victim] >= 1 and sum(running) == len(jobs), running
            cluster.replicas[victim].proc.send_signal(signal.SIGKILL)  # ...when one replica dies
            killed = time.monotonic()

            async def outcome(name: str):  # type: ignore[no-untyped-def]
                got = []
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async for r in calls[name]:
                        got.append(r)
                return name, await calls[name].code(), got

            tasks = {asyncio.create_task(outcome(name)) for name in jobs}
            outcomes = {}
            while sum(code != grpc.StatusCode.OK for code, _ in outcomes.values()) < running[victim]:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    name, code, got = task.result()
                    outcomes[name] = (code, got)
            failed = [name for name, (code, _) in outcomes.items() if code != grpc.StatusCode.OK]
            # retried at once, while the dead replica's holds are live: refused, neither run nor charged again
            retries = [await _generate(cluster.target, key, jobs[name], (idem, name)) for name in failed]
            held = await asyncio.to_thread(_balance, cluster.target, key)
            seen = time.monotonic() - killed
            for task in tasks:  # the other replica's calls
                name, code, got = await task
                outcomes[name] = (code, got)
            return victim, running, killed, outcomes, failed, retries, held, seen

    victim, running, killed, outcomes, failed, retries, held, seen = asyncio.run(kill_mid_load())
    survivor = 1 - victim
    assert seen < HOLD_TTL_S * 2 / 3, f"{seen:.2f}s to see the holds: too slow, they may have expired already"
    finished = {name: _png(got) for name, (code, got) in outcomes.items() if code == grpc.StatusCode.OK}
    assert len(failed) == running[victim] and len(finished) == running[survivor], (running, outcomes)
    assert [r[0] for r in retries] == [grpc.StatusCode.ABORTED] * len(failed), retries
    assert held.held >= cost * len(failed) and held.spent + held.held == cost * len(jobs), held
    # the other replica keeps serving through HAProxy, and HAProxy's checks drop the dead one
    others = [asyncio.run(_generate(cluster.target, other_key, _request(seed=100 + i)))[0] for i in range(6)]
    assert others == [grpc.StatusCode.OK] * 6
    # (L4CON: the connection refused, nobody listens there)
    cluster.wait_states({f"kiln{victim + 1}": "DOWN L4CON", f"kiln{survivor + 1}": "UP L7OK"}, timeout=5)
    # the dead replica's holds expire after the TTL: their credits come back
    b = _balance(cluster.target, key)
    assert b.held == cost * len(failed) or time.monotonic() - killed > HOLD_TTL_S * 2 / 3, b
    deadline = killed + HOLD_TTL_S + 3
    while (b := _balance(cluster.target, key)).held and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (b.spent, b.held, b.remaining) == (cost * len(finished), 0, 30 - cost * len(finished))
    # retried now, each failed job runs once; retried again, every job is answered from the survivor's result
    # cache, with the same image: each job charged exactly once
    for name in failed:
        code, got, _ = asyncio.run(_generate(cluster.target, key, jobs[name], (idem, name)))
        assert code == grpc.StatusCode.OK
        finished[name] = _png(got)
    for name, request in jobs.items():
        code, got, _ = asyncio.run(_generate(cluster.target, key, request, (idem, name)))
        assert code == grpc.StatusCode.OK and _png(got) == finished[name], name
    b = _balance(cluster.target, key)
    assert (b.spent, b.held, b.remaining) == (cost * len(jobs), 0, 30 - cost * len(jobs))
    assert cluster.served_by().get(f"kiln{survivor + 1}", 0) > 0
