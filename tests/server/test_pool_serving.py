"""The model pool behind a real `kiln serve`: lazy loads that stream `loading` events, a memory budget that evicts
the least recently used model (exact load and eviction counts in /metrics), concurrent requests for more models
than fit, LoadModel / UnloadModel and pins through the CLI, and hot publish: new versions picked up while requests
stream (none fails, new requests get the new version), a broken version skipped, NAME@VERSION, aliases and a
rollback through `kiln models alias`, a store that starts empty, and a per-model engine."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from tests.conftest import ROOT, ServerProcess, free_port, kiln, publish_copy, start_server


def generate(target: str, model: str, steps: int = 3) -> tuple[grpc.StatusCode, list[pb.GenerateResponse]]:
    request = pb.GenerateRequest(model=model, prompt="a red circle", steps=steps, seed=1)
    got: list[pb.GenerateResponse] = []
    with grpc.insecure_channel(target) as ch:
        try:
            for r in pb_grpc.KilnStub(ch).Generate(request, timeout=120):
                got.append(r)
        except grpc.RpcError as e:
            return e.code(), got
    return grpc.StatusCode.OK, got


def started(responses: list[pb.GenerateResponse]) -> pb.Started:
    return next(r.started for r in responses if r.WhichOneof("event") == "started")


def listing(target: str) -> pb.ListModelsResponse:
    with grpc.insecure_channel(target) as ch:
        return pb_grpc.KilnStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)


def by_name(target: str) -> dict[str, pb.ModelInfo]:
    return {m.name: m for m in listing(target).models}


def wait_until(check, timeout: float = 30.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", server.wait_for_log("metrics on")).group(1)  # type: ignore[union-attr]
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


@pytest.fixture(scope="module")
def budget_server(three_models: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """a, b and c under a budget that holds one model (any model is bigger than 1 byte), none loaded at start."""
    server = start_server(three_models, tmp_path_factory.mktemp("pool") / "serve.log", "--memory-budget", "1",
                          "--preload", "none", "--metrics-port", "0", "--no-watch")
    yield server
    server.stop()


def test_lazy_loads_stream_loading_and_evict_the_least_recently_used(budget_server: ServerProcess) -> None:
    target = budget_server.target
    listed = listing(target)
    assert listed.memory_budget_bytes == 1 and listed.process_resident_bytes > 0
    assert [(m.name, m.loaded, m.memory_bytes) for m in listed.models] == [("a", False, 0), ("b", False, 0),
                                                                           ("c", False, 0)]
    code, responses = generate(target, "a")
    assert code == grpc.StatusCode.OK
    kinds = [r.WhichOneof("event") for r in responses]
    first = kinds.index("started")
    assert first >= 1 and all(r.progress.stage == "loading" for r in responses[:first])  # before Started: loading
    timings = {t.stage for r in responses if r.WhichOneof("event") == "artifact" for t in r.artifact.timings}
    assert "load" in timings
    models = by_name(target)
    assert models["a"].loaded and models["a"].memory_bytes > 0 and models["a"].load_seconds > 0
    assert models["a"].loaded_versions == ["v1"] and not models["b"].loaded
    assert models["a"].last_used_unix > time.time() - 60
    for name in "bab":
        assert generate(target, name)[0] == grpc.StatusCode.OK
    code, responses = generate(target, "b")  # loaded now: no loading events
    assert code == grpc.StatusCode.OK and responses[0].WhichOneof("event") == "started"
    assert [m.name for m in listing(target).models if m.loaded] == ["b"]
    m = scrape(budget_server)
    assert m[("kiln_model_loads_total", (("model", "a"), ("status", "ok")))] == 2
    assert m[("kiln_model_loads_total", (("model", "b"), ("status", "ok")))] == 2
    assert m[("kiln_model_evictions_total", (("model", "a"), ("reason", "budget")))] == 2
    assert m[("kiln_model_evictions_total", (("model", "b"), ("reason", "budget")))] == 1
    assert m[("kiln_models_loaded", ())] == 1 and m[("kiln_memory_budget_bytes", ())] == 1
    assert m[("kiln_model_load_duration_seconds_count", (("model", "a"),))] == 2


def test_concurrent_requests_for_more_models_than_fit_all_succeed(budget_server: ServerProcess) -> None:
    names = list("abcabcabcacb")
    with ThreadPoolExecutor(len(names)) as ex:
        results = list(ex.map(lambda n: generate(budget_server.target, n), names))
    assert [code for code, _ in results] == [grpc.StatusCode.OK] * len(names)
    assert [started(r).model for _, r in results] == names
    assert sum(m.loaded for m in listing(budget_server.target).models) == 1


def test_load_unload_and_pins_through_the_cli(three_models: Path, tmp_path: Path) -> None:
    server = start_server(three_models, tmp_path / "serve.log", "--preload", "none", "--pin", "a", "--no-watch")
    try:
        models = by_name(server.target)
        assert models["a"].loaded and models["a"].pinned and not models["b"].loaded
        out = kiln("models", "load", "b", "--target", server.target)
        assert out.returncode == 0 and re.search(r"^b\tv1\tloaded \d+ MB in [\d.]+s", out.stdout), out
        assert by_name(server.target)["b"].loaded
        out = kiln("models", "list", "--target", server.target)
        assert re.search(r"^a\tv1\tloaded \d+ MB pinned", out.stdout, re.M) and "\nc\tv1\tnot loaded" in out.stdout
        out = kiln("models", "unload", "b", "--target", server.target)
        assert out.returncode == 0 and "not loaded" in out.stdout and not by_name(server.target)["b"].loaded
        out = kiln("models", "unload", "a", "--target", server.target)
        assert out.returncode == 1 and "FAILED_PRECONDITION" in out.stderr and "MODEL_PINNED" in out.stderr
        out = kiln("models", "load", "nope", "--target", server.target)
        assert out.returncode == 1 and "NOT_FOUND" in out.stderr and "available: a, b, c" in out.stderr
    finally:
        server.stop()


def test_hot_publish_while_requests_stream(tiny_bundle: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    publish_copy(tiny_bundle, store, "m", "v1")
    server = start_server(store, tmp_path / "serve.log", "--metrics-port", "0")
    results: list[tuple[float, grpc.StatusCode, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            t = time.monotonic()
            code, responses = generate(server.target, "m", steps=8)
            results.append((t, code, started(responses).model_version if code == grpc.StatusCode.OK else ""))

    clients = [threading.Thread(target=client) for _ in range(3)]
    try:
        for c in clients:
            c.start()
        wait_until(lambda: len(results) >= 6, what="requests on v1")
        published = time.monotonic()
        publish_copy(tiny_bundle, store, "m", "v2")
        wait_until(lambda: any(v == "v2" for _, _, v in results), what="a request served by v2")
        switched = min(t for t, _, v in results if v == "v2")
        wait_until(lambda: len([r for r in results if r[0] > switched + 0.5]) >= 6,
                   what="more requests after the switch")
        stop.set()
        for c in clients:
            c.join(60)
        assert {code for _, code, _ in results} == {grpc.StatusCode.OK}  # none failed
        assert any(v == "v1" and t > published for t, _, v in results)  # in flight or started during the load
        later = [v for t, _, v in results if t > switched + 0.5]
        assert later and set(later) == {"v2"}  # new requests go to the new version
        wait_until(lambda: by_name(server.target)["m"].loaded_versions == ["v2"], what="v1 unloaded once idle")
        info = by_name(server.target)["m"]
        assert info.version == "v2" and list(info.versions) == ["v2", "v1"]
        assert "model m now serves version v2 (was v1)" in server.log()
        assert scrape(server)[("kiln_model_evictions_total", (("model", "m"), ("reason", "replaced")))] == 1

        # a broken version is logged and skipped: v2 keeps serving
        broken = publish_copy(tiny_bundle, store, "m", "v3")
        unet = next(broken.rglob("unet*.onnx"))
        data = bytearray(unet.read_bytes())
        data[len(data) // 2] ^= 0xFF
        unet.write_bytes(bytes(data))
        server.wait_for_log("version v3 skipped; still serving v2")
        assert "sha256" in server.log().split("skipping bundle m version v3: ", 1)[1].splitlines()[0]
        info = by_name(server.target)["m"]
        assert info.version == "v2" and list(info.versions) == ["v3", "v2", "v1"]
        assert started(generate(server.target, "m")[1]).model_version == "v2"

        # NAME@VERSION, aliases, and a rollback of the plain name
        assert started(generate(server.target, "m@v1")[1]).model_version == "v1"
        out = kiln("models", "alias", "m@v1", "stable", "--store", str(store))
        assert out.returncode == 0, out.stderr
        wait_until(lambda: by_name(server.target)["m"].aliases.get("stable") == "v1", what="the alias")
        assert started(generate(server.target, "stable")[1]).model_version == "v1"
        assert started(generate(server.target, "m@stable")[1]).model_version == "v1"
        assert kiln("models", "alias", "m@v1", "m", "--store", str(store)).returncode == 0  # rollback
        wait_until(lambda: by_name(server.target)["m"].version == "v1", what="the rollback")
        assert started(generate(server.target, "m")[1]).model_version == "v1"
        assert kiln("models", "alias", "--remove", "m", "--store", str(store)).returncode == 0
        wait_until(lambda: by_name(server.target)["m"].version == "v2", what="back to the newest that works")
        bad = kiln("models", "alias", "m@v9", "x", "--store", str(store))
        assert bad.returncode == 2 and "m has no version 'v9'; versions: v1, v2, v3" in bad.stderr
        code, _ = generate(server.target, "m@v9")
        assert code == grpc.StatusCode.NOT_FOUND
        # metrics label a request by its model's own name, whatever version or alias it named
        labels = {dict(key[1]).get("model") for key in scrape(server) if key[0] == "kiln_requests_total"}
        assert labels == {"m", "unknown"}
    finally:
        stop.set()
        server.stop()


def test_a_store_that_starts_empty_serves_once_a_bundle_is_published(tiny_bundle: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--store", str(store), "--port", str(port),
                                 "--watch-poll-s", "0.2"],  # polling, for file systems without events
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, f"127.0.0.1:{port}", log)
    try:
        server.wait_for_log("no bundles in")

        def status() -> int:
            with grpc.insecure_channel(server.target) as ch:
                return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="kiln.v1.Kiln"),
                                                            timeout=5).status

        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        publish_copy(tiny_bundle, store, "m", "v1")
        wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING, what="SERVING after a publish")
        assert generate(server.target, "m")[0] == grpc.StatusCode.OK
    finally:
        server.stop()


def test_a_model_on_another_engine(three_models: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="the OpenVINO engine is the pip extra kiln[openvino]")
    server = start_server(three_models, tmp_path / "serve.log", "--model-engine", "b=openvino", "--preload", "b",
                          "--no-watch")
    try:
        models = by_name(server.target)
        assert models["b"].engine == "openvino" and models["a"].engine == "onnxruntime" and models["b"].loaded
        assert generate(server.target, "b")[0] == generate(server.target, "a")[0] == grpc.StatusCode.OK
        bad = kiln("serve", "--store", str(three_models), "--model-engine", "b=tensorrt")
        assert bad.returncode == 2 and "model_engine 'b=tensorrt' must be NAME=ENGINE" in bad.stderr
    finally:
        server.stop()
