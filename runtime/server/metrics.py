"""Prometheus metrics (`kiln serve --metrics-port`), named after TGI's and vLLM's conventions: one `kiln_` prefix,
`_seconds` histograms for queue, stage and end-to-end time, gauges for queued and running work, `_total` counters
with a reason or status label. One registry per server (tests run several in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from runtime.server.interceptors.observe import CallRecord

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
"""Seconds: a tiny model's request (tens of ms) to an SDXL one on a CPU (minutes)."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        self.requests = Counter("kiln_requests_total", "Generate calls by model, mode and gRPC status",
                                ["model", "mode", "status"], registry=r)
        self.request_seconds = Histogram("kiln_request_duration_seconds", "Generate, end to end on the server",
                                         ["model", "mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("kiln_request_queue_duration_seconds",
                                       "From admission to the request's first model call", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("kiln_request_stage_duration_seconds", "Per pipeline stage of a request",
                                       ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.steps = Counter("kiln_denoising_steps_total", "Denoising steps of successful requests", ["model"],
                             registry=r)
        self.images = Counter("kiln_images_total", "Images produced", ["model"], registry=r)
        self.unet_batch = Histogram("kiln_unet_batch_rows", "UNet batch rows per call (an image counts 2 with "
                                    "guidance)", ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.credits = Counter("kiln_credits_charged_total", "Credits charged for successful requests", ["tier"],
                               registry=r)
        self.refused = Counter("kiln_requests_refused_total", "Calls refused before or during work, by reason "
                               "(CREDITS_EXHAUSTED, RATE_LIMITED, CONCURRENCY_LIMITED, SERVER_BUSY, "
                               "INVALID_ARGUMENT, UNAUTHENTICATED, ...)", ["reason"], registry=r)
        self.queued = Gauge("kiln_requests_queued", "Requests admitted, waiting for their first model call",
                            registry=r)
        self.running = Gauge("kiln_requests_running", "Requests with model work under way", registry=r)
        self.models_loaded = Gauge("kiln_models_loaded", "Bundle versions loaded", registry=r)
        self.model_loads = Counter("kiln_model_loads_total", "Bundle version loads (verify + open), by outcome",
                                   ["model", "status"], registry=r)
        self.model_load_seconds = Histogram("kiln_model_load_duration_seconds", "Bundle version load time (verify + "
                                            "open)", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_evictions = Counter("kiln_model_evictions_total", "Bundle versions unloaded, by reason (budget: "
                                       "room for another; unload: UnloadModel; replaced: a newer version took over)",
                                       ["model", "reason"], registry=r)
        self.models_memory = Gauge("kiln_models_memory_bytes", "Resident memory the loaded models account for",
                                   registry=r)
        self.memory_budget = Gauge("kiln_memory_budget_bytes", "--memory-budget (0: none)", registry=r)

    def watch(self, queued: Callable[[], int], running: Callable[[], int], models: Callable[[], int]) -> None:
        """Gauges read at scrape time."""
        self.queued.set_function(queued)
        self.running.set_function(running)
        self.models_loaded.set_function(models)

    def watch_memory(self, used: Callable[[], int], budget: int | None) -> None:
        self.models_memory.set_function(used)
        self.memory_budget.set(budget or 0)

    def model_loaded(self, model: str, seconds: float, ok: bool) -> None:
        self.model_loads.labels(model, "ok" if ok else "failed").inc()
        if ok:
            self.model_load_seconds.labels(model).observe(seconds)

    def model_evicted(self, model: str, reason: str) -> None:
        self.model_evictions.labels(model, reason).inc()

    def unet_batch_rows(self, model: str, rows: int) -> None:
        self.unet_batch.labels(model).observe(rows)

    def queued_for(self, model: str, seconds: float) -> None:
        self.queue_seconds.labels(model).observe(seconds)

    def record(self, call: CallRecord) -> None:
        """A finished Kiln call (an `ObserveInterceptor` sink)."""
        if call.reason:
            self.refused.labels(call.reason).inc()
        if call.method != "Generate":
            return
        self.requests.labels(call.model, call.mode, call.status).inc()
        if call.status != "OK":
            return
        self.request_seconds.labels(call.model, call.mode).observe(call.seconds)
        for stage, seconds in call.stages.items():
            self.stage_seconds.labels(call.model, stage).observe(seconds)
        self.images.labels(call.model).inc(call.images)
        self.steps.labels(call.model).inc(call.steps)
        if call.cost and call.tier:
            self.credits.labels(call.tier).inc(call.cost)
