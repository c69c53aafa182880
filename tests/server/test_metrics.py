"""`kiln serve --metrics-port`: a known sequence of requests through a real server with accounts, then its
/metrics scraped and parsed with Prometheus' own text parser: counts exact, histograms filled, gauges at rest."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from tests.server.test_quotas import _create_key, _serve, _tiers


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _generate(target: str, key: str, **fields: object) -> grpc.StatusCode:
    request = pb.GenerateRequest(**{"model": "tiny", "prompt": "a red circle", "steps": 3, "seed": 1, **fields})  # type: ignore[arg-type]
    with grpc.insecure_channel(target) as ch:
        try:
            list(pb_grpc.KilnStub(ch).Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=60))
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_metrics_after_a_known_sequence(tiny_store: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'auth.db'}"
    tiers = _tiers(tmp_path / "tiers.toml", credits=4)  # 1 credit per image here
    key = _create_key(db, tiers)
    server = _serve(tiny_store, tmp_path / "serve.log", db, tiers, "--metrics-port", "0")
    try:
        port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", server.wait_for_log("metrics on")).group(1)
        url = f"http://127.0.0.1:{port}/metrics"
        assert _generate(server.target, key, num_images=2) == grpc.StatusCode.OK
        assert _generate(server.target, key, guidance_scale=1.0) == grpc.StatusCode.OK  # 1 row per image
        assert _generate(server.target, key, width=13) == grpc.StatusCode.INVALID_ARGUMENT
        assert _generate(server.target, key, model="nope") == grpc.StatusCode.NOT_FOUND
        assert _generate(server.target, key) == grpc.StatusCode.OK  # the fourth credit
        assert _generate(server.target, key) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _generate(server.target, "kiln_nobody_secret") == grpc.StatusCode.UNAUTHENTICATED
        m = _scrape(url)

        def value(name: str, **labels: str) -> float:
            return m.get((name, tuple(sorted(labels.items()))), 0.0)

        tti = {"model": "tiny", "mode": "text_to_image"}
        assert value("kiln_requests_total", **tti, status="OK") == 3
        assert value("kiln_requests_total", **tti, status="INVALID_ARGUMENT") == 1
        assert value("kiln_requests_total", **tti, status="RESOURCE_EXHAUSTED") == 1
        assert value("kiln_requests_total", model="unknown", mode="text_to_image", status="NOT_FOUND") == 1
        assert value("kiln_images_total", model="tiny") == 4 and value("kiln_denoising_steps_total", model="tiny") == 9
        assert value("kiln_credits_charged_total", tier="t") == 4
        refused = {dict(labels)["reason"]: v for (name, labels), v in m.items() if name == "kiln_requests_refused_total"}
        assert refused["INVALID_ARGUMENT"] == 1 and refused["CREDITS_EXHAUSTED"] == 1 and refused["NOT_FOUND"] == 1
        assert sum(v for r, v in refused.items() if r.endswith("_KEY")) == 1  # the unknown key
        assert value("kiln_request_duration_seconds_count", **tti) == 3
        assert value("kiln_request_queue_duration_seconds_count", model="tiny") == 3
        assert value("kiln_request_stage_duration_seconds_count", model="tiny", stage="denoise") == 3
        # UNet calls: 3 steps each; rows 2 images x 2 (guidance), 1 x 1, 1 x 2
        assert value("kiln_unet_batch_rows_count", model="tiny") == 9
        assert value("kiln_unet_batch_rows_sum", model="tiny") == 3 * (4 + 1 + 2)
        assert value("kiln_requests_queued") == 0 and value("kiln_requests_running") == 0
        assert value("kiln_models_loaded") == 1 and value("process_resident_memory_bytes") > 100e6
    finally:
        server.stop()
