"""OpenTelemetry tracing on real servers: in-process (the SDK's in-memory exporter sees the spans) for the span
tree, refusals, trace-context propagation and batching; and `kiln serve --otlp-endpoint` as a subprocess exporting
over OTLP/gRPC to a collector written here (opentelemetry-proto's TraceService on grpc)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from model_store import BundleRef
from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime.accounts.accounts import AccountsConfig
from runtime.engine import EngineConfig
from runtime.model import LoadedModel
from runtime.pool.card import BundleCard
from runtime.server.app import KilnServer, ServeConfig
from runtime.server.pricing import resolve
from runtime.server.tracing_config import TracingConfig
from tests.conftest import free_port, start_server
from tests.server.test_quotas import _tiers

STAGES = ["kiln.queue", "kiln.text_encode", "kiln.prepare", "kiln.denoise", "kiln.vae_decode", "kiln.png_encode"]
"""A one-image request's engine stages, in the order they run."""


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    exporter.provider = provider  # type: ignore[attr-defined]
    yield exporter
    provider.shutdown()


@asynccontextmanager
async def serving(store: Path, models: dict[str, LoadedModel], exporter: InMemorySpanExporter,
                  accounts: AccountsConfig | None = None, **engine: Any) -> AsyncIterator[KilnServer]:
    exporter.clear()
    server = KilnServer(ServeConfig(store=store, port=0, accounts=accounts, engine=EngineConfig(**engine)), models,
                        tracer_provider=exporter.provider)  # type: ignore[attr-defined]
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def generate(port: int, request: pb.GenerateRequest, *metadata: tuple[str, str]
                   ) -> tuple[grpc.StatusCode, list[pb.GenerateResponse]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = pb_grpc.KilnStub(ch).Generate(request, metadata=metadata, timeout=120)
        got: list[pb.GenerateResponse] = []
        try:
            async for r in call:
                got.append(r)
        except grpc.aio.AioRpcError:
            pass
        return await call.code(), got


def finished(exporter: InMemorySpanExporter, roots: int) -> list[ReadableSpan]:
    """The exported spans once `roots` server spans have ended (a span ends just before its status is sent)."""
    deadline = time.monotonic() + 5
    while True:
        got = list(exporter.get_finished_spans())
        if sum(s.kind is SpanKind.SERVER for s in got) >= roots or time.monotonic() > deadline:
            return got
        time.sleep(0.01)


def tree(spans: list[ReadableSpan], root: ReadableSpan) -> list[ReadableSpan]:
    """The root's children, by start time."""
    return sorted((s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id),
                  key=lambda s: s.start_time or 0)


def test_a_generate_is_one_trace_from_the_server_span_through_the_engine_stages(tiny_store, tiny_model, spans) -> None:
    request = pb.GenerateRequest(model="tiny", prompt="a red circle", seed=1, steps=3, sampler="euler")

    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, spans) as server:
            code, got = await generate(server.port, request)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                await pb_grpc.KilnStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
            return code, got

    code, got = asyncio.run(run())
    assert code is grpc.StatusCode.OK
    all_spans = finished(spans, 2)
    roots = [s for s in all_spans if s.kind is SpanKind.SERVER]
    assert sorted(s.name for s in roots) == ["kiln.Generate", "kiln.ListModels"]
    root = next(s for s in roots if s.name == "kiln.Generate")
    assert root.parent is None  # no traceparent came in: a new trace
    assert root.status.status_code is StatusCode.UNSET
    generate_spans = [s for s in all_spans if s.context.trace_id == root.context.trace_id]
    assert len(generate_spans) == 1 + len(STAGES)  # the ListModels call is a trace of its own

    started = got[0].started
    artifact = next(r.artifact for r in got if r.WhichOneof("event") == "artifact")
    a = root.attributes
    assert a["rpc.system"] == "grpc" and a["rpc.method"] == "Generate" and a["rpc.grpc.status_code"] == 0
    assert (a["kiln.request_id"], a["kiln.model"], a["kiln.model_version"], a["kiln.mode"]) == \
        (got[0].request_id, "tiny", started.model_version, "text_to_image")
    assert (a["kiln.width"], a["kiln.height"], a["kiln.steps"], a["kiln.sampler"], a["kiln.status"]) == \
        (started.width, started.height, 3, "euler", "OK")
    assert "kiln.key_id" not in a  # no accounts on this server

    children = tree(all_spans, root)
    assert [s.name for s in children] == STAGES
    for s in children:  # each stage ran inside the call, one after the other, and took time
        assert s.attributes["kiln.request_id"] == got[0].request_id
        assert s.attributes["kiln.model_version"] == started.model_version
        assert root.start_time <= s.start_time < s.end_time <= root.end_time
    for before, after in zip(children, children[1:], strict=False):
        assert before.end_time <= after.start_time, (before.name, after.name)
    assert sum(s.end_time - s.start_time for s in children) <= root.end_time - root.start_time

    denoise = next(s for s in children if s.name == "kiln.denoise")
    assert [e.attributes["kiln.step"] for e in denoise.events] == [1, 2, 3]
    assert all(e.attributes["kiln.batch.rows"] == 2 for e in denoise.events)  # guided: 2 UNet rows per image
    # the UNet's own time (the response's `denoise` timing) is within the span's calls, which are within the span
    timings = {t.stage: t.seconds for t in artifact.timings}
    assert timings["denoise"] <= denoise.attributes["kiln.unet_seconds"] <= (denoise.end_time - denoise.start_time) / 1e9
    decode = next(s for s in children if s.name == "kiln.vae_decode")
    assert timings["decode"] <= (decode.end_time - decode.start_time) / 1e9


def test_refusals_are_errors_with_their_status_and_reason(tiny_store, tiny_model, spans, tmp_path) -> None:
    request = pb.GenerateRequest(model="tiny", prompt="a red circle", seed=1, steps=2)
    cost = resolve(BundleCard(BundleRef(tiny_model.path, tiny_model.manifest)), request).cost  # type: ignore[union-attr]
    accounts = AccountsConfig(f"sqlite:///{tmp_path / 'auth.db'}", _tiers(tmp_path / "tiers.toml", credits=cost))

    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, spans, accounts) as server:
            assert server.accounts is not None
            new = await server.accounts.create_key("t")
            auth = ("authorization", f"Bearer {new.token}")
            codes = [(await generate(server.port, pb.GenerateRequest(model="tiny", prompt="x", steps=2, sampler="nope"), auth))[0],
                     (await generate(server.port, request, ("authorization", f"Bearer kiln_{'0' * 12}_{'s' * 43}")))[0],
                     (await generate(server.port, request, auth))[0],  # spends the key's credits
                     (await generate(server.port, request, auth))[0]]
            return new, codes

    new, codes = asyncio.run(run())
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK,
                     grpc.StatusCode.RESOURCE_EXHAUSTED]
    all_spans = finished(spans, 4)
    roots = sorted((s for s in all_spans if s.kind is SpanKind.SERVER), key=lambda s: s.start_time or 0)
    assert [r.attributes["kiln.status"] for r in roots] == ["INVALID_ARGUMENT", "UNAUTHENTICATED", "OK",
                                                           "RESOURCE_EXHAUSTED"]
    bad, stranger, ok, broke = roots
    for r, reason in ((bad, "INVALID_ARGUMENT"), (stranger, "UNKNOWN_KEY"), (broke, "CREDITS_EXHAUSTED")):
        assert r.status.status_code is StatusCode.ERROR
        assert r.attributes["kiln.error.reason"] == reason
        assert r.attributes["rpc.grpc.status_code"] == grpc.StatusCode[r.attributes["kiln.status"]].value[0]
    assert bad.attributes["kiln.error.fields"] == ("sampler",)
    assert ok.status.status_code is StatusCode.UNSET and "kiln.error.reason" not in ok.attributes
    assert {r.attributes.get("kiln.key_id") for r in (bad, ok, broke)} == {new.key_id}
    assert "kiln.key_id" not in stranger.attributes

    def names(root: ReadableSpan) -> list[str]:
        return [s.name for s in tree(all_spans, root)]

    # each interceptor's check is a span; the refusing one carries the error, and nothing runs after it
    assert names(stranger) == ["kiln.auth"]
    auth = tree(all_spans, stranger)[0]
    assert auth.status.status_code is StatusCode.ERROR and auth.attributes["kiln.error.reason"] == "UNKNOWN_KEY"
    assert names(ok) == ["kiln.auth", "kiln.rate", "kiln.tier_limits", "kiln.quota", *STAGES]
    assert names(broke) == ["kiln.auth", "kiln.rate", "kiln.tier_limits", "kiln.quota"]
    quota = tree(all_spans, broke)[-1]
    assert quota.status.status_code is StatusCode.ERROR and quota.attributes["kiln.error.reason"] == "CREDITS_EXHAUSTED"
    # the API key's secret is in no span
    for s in all_spans:
        assert not any(new.token in str(v) for v in s.attributes.values()), s.name


def test_batched_requests_each_continue_their_callers_trace(tiny_store, tiny_model, spans) -> None:
    parents = {f"b{i}": (f"{i + 1:032x}", f"{i + 10:016x}") for i in range(2)}

    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, spans, max_batch_size=16, max_wait_s=0.5) as server:
            results = await asyncio.gather(*(
                generate(server.port, pb.GenerateRequest(model="tiny", prompt=f"p{rid}", seed=1, steps=3,
                                                          request_id=rid),
                         ("traceparent", f"00-{trace_id}-{span_id}-01"))
                for rid, (trace_id, span_id) in parents.items()))
            return results, list(server.engine.batches)

    results, batches = asyncio.run(run())
    assert [code for code, _ in results] == [grpc.StatusCode.OK] * 2
    assert all(set(b.request_ids) == set(parents) for b in batches)  # really batched: every UNet call had both
    all_spans = finished(spans, 2)
    for rid, (trace_id, span_id) in parents.items():
        root = next(s for s in all_spans if s.kind is SpanKind.SERVER and s.attributes["kiln.request_id"] == rid)
        assert f"{root.context.trace_id:032x}" == trace_id  # the caller's trace continues
        assert root.parent is not None and f"{root.parent.span_id:016x}" == span_id and root.parent.is_remote
        in_trace = [s for s in all_spans if s.context.trace_id == root.context.trace_id]
        assert len(in_trace) == 1 + len(STAGES)  # its own stages only, not the other request's
        assert [s.name for s in tree(in_trace, root)] == STAGES
        stages = {s.name: s for s in in_trace}
        assert all(s.attributes["kiln.request_id"] == rid for s in in_trace)
        assert stages["kiln.text_encode"].attributes["kiln.batch.requests"] == 2
        assert stages["kiln.text_encode"].attributes["kiln.batch.rows"] == 4  # each: a negative and a positive prompt
        assert [e.attributes["kiln.batch.requests"] for e in stages["kiln.denoise"].events] == [2, 2, 2]
        assert [e.attributes["kiln.batch.rows"] for e in stages["kiln.denoise"].events] == [4, 4, 4]
    # the shared calls are one interval seen from both traces
    (a, b) = [[s for s in all_spans if s.name == "kiln.text_encode" and s.attributes["kiln.request_id"] == rid][0]
              for rid in parents]
    assert (a.start_time, a.end_time) == (b.start_time, b.end_time)


def test_a_cancelled_request_ends_its_trace_cancelled_after_the_steps_it_ran(tiny_store, tiny_model, spans,
                                                                              caplog) -> None:
    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, spans) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                call = pb_grpc.KilnStub(ch).Generate(pb.GenerateRequest(model="tiny", prompt="x", steps=20), timeout=60)
                async for r in call:
                    if r.WhichOneof("event") == "progress" and r.progress.step == 2:
                        call.cancel()
                        break
            await asyncio.sleep(0.3)  # the engine drops it before its next step

    asyncio.run(run())
    root = next(s for s in finished(spans, 1) if s.kind is SpanKind.SERVER)
    assert root.status.status_code is StatusCode.ERROR and root.attributes["kiln.status"] == "CANCELLED"
    children = tree(list(spans.get_finished_spans()), root)
    assert [s.name for s in children] == STAGES[:4]  # it never reached the decoder
    denoise = children[-1]
    ran = len(denoise.events)
    assert 2 <= ran < 20 and denoise.status.status_code is StatusCode.ERROR
    assert denoise.status.description == f"cancelled after {ran}/20 steps"
    assert "Failed to detach context" not in caplog.text


def test_the_gateway_passes_the_http_callers_trace_context_to_the_server(tiny_store, tiny_model, spans) -> None:
    import httpx

    from gateway.config import GatewayConfig
    from gateway.server import GatewayServer

    trace_id, span_id = "c0ffee" * 5 + "00", "5" * 16

    async def run():  # type: ignore[no-untyped-def]
        async with serving(tiny_store, {"tiny": tiny_model}, spans) as server:
            gateway = GatewayServer(GatewayConfig(target=f"127.0.0.1:{server.port}", port=0))
            port = await gateway.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                    good = await client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2},
                                             headers={"traceparent": f"00-{trace_id}-{span_id}-01"})
                    bad = await client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2},
                                            headers={"traceparent": "00-not-a-trace-01"})
                    return good.status_code, bad.status_code
            finally:
                await gateway.stop()

    assert asyncio.run(run()) == (200, 200)
    roots = [s for s in finished(spans, 2) if s.name == "kiln.Generate"]
    assert len(roots) == 2
    continued, fresh = sorted(roots, key=lambda s: s.start_time or 0)
    assert f"{continued.context.trace_id:032x}" == trace_id and f"{continued.parent.span_id:016x}" == span_id
    assert fresh.parent is None  # a malformed traceparent is dropped: the server starts a trace of its own


def test_tracing_config_names_a_bad_endpoint_and_reads_the_standard_variables(monkeypatch, tiny_store) -> None:
    with pytest.raises(ValueError, match=r"otlp_endpoint='collector:4317/v1/traces' must be host:port"):
        TracingConfig(otlp_endpoint="collector:4317/v1/traces")
    for ok in ("collector:4317", "http://127.0.0.1:4317", "https://otel.example.com", "[::1]:4317"):
        assert TracingConfig(otlp_endpoint=ok).endpoint() == ok
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert TracingConfig().endpoint() == ""

    async def off():  # type: ignore[no-untyped-def]
        server = KilnServer(ServeConfig(store=tiny_store, port=0), {})
        return server.tracing, server.engine.on_finish

    assert asyncio.run(off()) == (None, None)  # off: no tracing interceptor, no engine hook, no stage marks
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert TracingConfig().endpoint() == "http://collector:4317"
    assert TracingConfig(otlp_endpoint="other:4317").endpoint() == "other:4317"  # the flag wins
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317")
    assert TracingConfig().endpoint() == "http://traces:4317"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every export request."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_serve_exports_spans_over_otlp_to_a_collector(tiny_store: Path, tmp_path: Path) -> None:
    collector = Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port(f"127.0.0.1:{free_port()}")
    receiver.start()
    env = {k: os.environ.pop(k) for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_RESOURCE_ATTRIBUTES") if k in os.environ}
    try:
        server = start_server(tiny_store, tmp_path / "serve.log", "--otlp-endpoint", f"http://127.0.0.1:{port}",
                              "--otlp-service-name", "kiln-test")
        try:
            with grpc.insecure_channel(server.target) as ch:
                responses = list(pb_grpc.KilnStub(ch).Generate(
                    pb.GenerateRequest(model="tiny", prompt="a red circle", steps=2, request_id="otlp-1"),
                    metadata=(("traceparent", f"00-{'ab' * 16}-{'cd' * 8}-01"),), timeout=60))
            assert responses[-1].WhichOneof("event") == "artifact"
        finally:
            server.proc.send_signal(signal.SIGTERM)  # stopping flushes the batched spans
            assert server.proc.wait(timeout=30) == 0, server.log()
    finally:
        os.environ.update(env)
        receiver.stop(None)
    assert "tracing: OTLP/gRPC to http://127.0.0.1:" in server.log()
    got = [(rs.resource, span) for r in collector.requests for rs in r.resource_spans for ss in rs.scope_spans
           for span in ss.spans]
    names = sorted(span.name for _, span in got)
    assert names == sorted(["kiln.Generate", *STAGES]), names
    resource = {kv.key: kv.value.string_value for kv in got[0][0].attributes}
    assert resource["service.name"] == "kiln-test"
    assert resource["service.version"] and resource["host.name"]
    root = next(span for _, span in got if span.name == "kiln.Generate")
    assert root.trace_id.hex() == "ab" * 16 and root.parent_span_id.hex() == "cd" * 8
    assert all(span.trace_id == root.trace_id for _, span in got)
    assert {kv.key: kv.value.string_value for kv in root.attributes}["kiln.request_id"] == "otlp-1"
