"""`kiln serve`: grpc.aio server with health checking, reflection, explicit message limits, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from model_store import HashCache
from model_store.integrity import default_cache_dir
from proto.kiln.v1 import kiln_pb2, kiln_pb2_grpc
from runtime.accounts.accounts import Accounts, AccountsConfig
from runtime.device import DeviceConfig, available_providers, provider_names
from runtime.engine import Engine, EngineConfig
from runtime.graph_cache import GRAPHS_DIR, OPENVINO_DIR, GraphCache
from runtime.model import LoadedModel, load_bundle
from runtime.pool.config import PoolConfig
from runtime.pool.pool import ModelPool, PoolHooks
from runtime.server.interceptors import ErrorInterceptor
from runtime.server.interceptors.auth import AuthInterceptor
from runtime.server.interceptors.limits import TierLimitsInterceptor
from runtime.server.interceptors.observe import ObserveInterceptor, Sink
from runtime.server.interceptors.quota import QuotaInterceptor
from runtime.server.interceptors.rate import RateInterceptor
from runtime.server.interceptors.trace import TraceInterceptor
from runtime.server.logs import access_log
from runtime.server.metrics import Metrics
from runtime.server.pricing import resolve
from runtime.server.servicer import KilnServicer
from runtime.server.tracing import Tracing, annotate
from runtime.server.tracing_config import TracingConfig, otlp_provider
from runtime.tls import ServerTls

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

log = logging.getLogger("kiln.serve")

SERVICE_NAME = kiln_pb2.DESCRIPTOR.services_by_name["Kiln"].full_name


@dataclass
class ServeConfig:
    store: Path
    """Folder of compiled bundles (`STORE/NAME/VERSION/`); the newest version of each that verifies and loads is
    served (or the one an alias spelled like the model pins), and any version by NAME@VERSION."""
    host: str = "127.0.0.1"
    """Address to bind. Without `auth_db` only loopback addresses are allowed (unless `insecure_open`)."""
    port: int = 50051
    """TCP port; 0 picks a free one (logged)."""
    threads: int = 0
    """ONNX Runtime intra-op threads per session; 0 means one per core."""
    shutdown_grace_s: float = 300.0
    """On SIGTERM, how long in-flight requests may run before they are cancelled."""
    lame_duck_s: float = 0.0
    """On SIGTERM, how long the server keeps taking new calls after its health turns NOT_SERVING, so a load
    balancer's health checks drop it before it refuses anything (set it above the balancer's check interval times
    its fall count); 0: refuse at once (UNAVAILABLE)."""
    max_receive_bytes: int = 16 << 20
    """Largest request message accepted."""
    max_send_bytes: int = 64 << 20
    """Largest response message sent (one PNG per message)."""
    accounts: AccountsConfig | None = None
    """API keys, tiers, credits and rate limits (`--auth-db`); None serves everyone, on loopback only."""
    insecure_open: bool = False
    """Allow binding a non-loopback address without accounts."""
    inference_engine: str = "onnxruntime"
    """Who runs the bundles' graphs: `onnxruntime` (any execution provider), `openvino` (CPU; bf16 on AMX by
    default; it reads fp32, int8 and int4 bundles, fused or not, but not nf4 (MatMulBnb4) or fp16), or `auto`:
    chosen per bundle when it loads, OpenVINO where the CPU has AMX, openvino is installed and it reads the bundle,
    else ONNX Runtime (runtime/engine_choice.py; ListModels and the load log say which)."""
    openvino_precision: str = "default"
    """With the OpenVINO engine: `default` (OpenVINO's choice: bf16 on AMX CPUs), `bf16` or `f32`."""
    openvino_static_shapes: bool = False
    """With the OpenVINO engine: one static-shape compiled model per input shape, compiled when a request first
    brings it and kept in the cache dir (`--openvino-static-shapes`; runtime/sessions_openvino.py)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Step-level batching and the queue limit (`--max-batch`, `--max-wait-ms`, `--max-queue`, `--no-batching`)."""
    device: DeviceConfig = field(default_factory=DeviceConfig)
    """Where the ONNX Runtime engine runs the graphs (`--device cpu|cuda[:N]`, `--providers`, `--trt-cache`)."""
    metrics_port: int | None = None
    """Serve Prometheus metrics over HTTP on this port (`--metrics-port`; 0 picks one, logged); None: none. With
    `tls`, the metrics port speaks TLS with the same certificate (and the same client CA)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics port binds (`--metrics-host`)."""
    tls: ServerTls | None = None
    """TLS for the gRPC port (`--tls-cert`, `--tls-key`; mutual TLS with `--tls-client-ca`); None: plaintext."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """Which models are loaded: memory budget, preload, pins, hot publish, per-model engines (`--memory-budget`...)."""
    cache_dir: Path | None = field(default_factory=default_cache_dir)
    """Where verified files' sha256 are remembered (`--cache-dir`; default $KILN_CACHE_DIR, else ~/.cache/kiln),
    so a restart does not hash the store again; None: hash every file at every start."""
    graph_cache: bool = True
    """Keep ONNX Runtime's optimized graphs (`CACHE/graphs/`) and OpenVINO's compiled models (`CACHE/openvino/`)
    in `cache_dir`, so a restart or a pool reload opens them without optimizing or compiling again
    (`--no-graph-cache`: optimize at every open). Costs disk: about the bundle's size again per CPU kind."""
    tracing: TracingConfig = field(default_factory=TracingConfig)
    """OpenTelemetry tracing over OTLP (`--otlp-endpoint`, `--otlp-insecure`, `--otlp-service-name`); off without
    an endpoint."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be between 0 and 65535")
        if not 0 <= self.lame_duck_s <= self.shutdown_grace_s:
            raise ValueError(f"lame_duck_s={self.lame_duck_s} must be between 0 and shutdown_grace_s="
                             f"{self.shutdown_grace_s}")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be 0 (one per core) or more")
        if self.device.gpu and self.inference_engine not in ("onnxruntime", "auto"):
            raise ValueError(f"device={self.device.device} needs the onnxruntime engine; engine="
                             f"{self.inference_engine!r} runs on the CPU only")
        if self.accounts is None and not self.insecure_open and not _is_loopback(self.host):
            raise ValueError(f"host={self.host!r} is not a loopback address and no --auth-db is given: anyone who "
                             "can reach it could generate for free. Give --auth-db (and --tiers), or --insecure-open "
                             "to serve openly on purpose")


def channel_options(config: ServeConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_receive_bytes),
        ("grpc.max_send_message_length", config.max_send_bytes),
    ]


class KilnServer:
    """The running server: build with `start()`, stop with `stop()` (health goes NOT_SERVING first)."""

    def __init__(self, config: ServeConfig, models: dict[str, LoadedModel] | None = None,
                 tracer_provider: Any = None):
        """`models`: versions already loaded (tests share them between servers); the pool starts with them.
        `tracer_provider`: trace to this OpenTelemetry TracerProvider (tests, embedders) rather than to the one
        `config.tracing` describes."""
        self.config = config
        from runtime.sessions_openvino import OpenVinoConfig, require_openvino

        cache = config.cache_dir if config.graph_cache else None
        ov = OpenVinoConfig(precision=config.openvino_precision, threads=config.threads,
                            static_shapes=config.openvino_static_shapes,
                            cache_dir=str(cache / OPENVINO_DIR) if cache else "")
        graphs = GraphCache(cache / GRAPHS_DIR) if cache else None
        if "openvino" in (config.inference_engine, *config.pool.engines().values()):
            require_openvino()  # a missing engine is not per bundle: say so at start
        engines = {config.inference_engine, *config.pool.engines().values()}
        providers = config.device.resolve(available_providers()) if engines & {"onnxruntime", "auto"} else None
        if providers and config.device.device != "cpu":
            log.info("device %s: execution providers %s", config.device.device, ", ".join(provider_names(providers)))
        self.hashes = HashCache(config.cache_dir, persist=config.cache_dir is not None)

        def open_bundle(ref, engine: str) -> LoadedModel:  # type: ignore[no-untyped-def]
            model = load_bundle(ref, providers, config.threads, engine, ov, self.hashes, graphs)
            self.hashes.save()
            return model

        self.engine = Engine(config.engine)
        self.health = health.aio.HealthServicer()
        self.accounts = Accounts(config.accounts) if config.accounts else None
        self.metrics: Metrics | None = None
        self._metrics_http: Any = None
        self.metrics_port = 0
        hooks = PoolHooks(changed=self._models_changed)
        if config.metrics_port is not None:
            self.metrics = Metrics()
            hooks.loaded, hooks.evicted = self.metrics.model_loaded, self.metrics.model_evicted
            self.engine.on_unet_batch = self.metrics.unet_batch_rows
            self.engine.on_queued = self.metrics.queued_for
        self.pool = ModelPool(config.store, config.pool, open_bundle, config.inference_engine, hooks=hooks,
                              gpu=config.device.gpu)
        self.pool.adopt(list((models or {}).values()))
        if self.metrics is not None:
            self.metrics.watch(lambda: self.engine.queued, lambda: self.engine.running, lambda: len(self.pool.loaded))
            self.metrics.watch_memory(lambda: self.pool.used_bytes, self.pool.budget)
        self.servicer = KilnServicer(self.pool, self.engine, self.accounts)
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor()]
        sinks: list[Sink] = [access_log]
        if self.metrics:
            sinks.append(self.metrics.record)
        self.tracing = _tracing(config.tracing, tracer_provider)
        if self.tracing:
            interceptors.append(TraceInterceptor(self.tracing))
            sinks.append(annotate)
            self.engine.on_finish = self.tracing.engine_finished
        interceptors.append(ObserveInterceptor(sinks, self._model_name))
        if self.accounts:
            def price(request):  # type: ignore[no-untyped-def]
                return resolve(self.pool.card_or_none(request.model), request)

            interceptors += [AuthInterceptor(self.accounts), RateInterceptor(self.accounts),
                             TierLimitsInterceptor(price), QuotaInterceptor(self.accounts, price)]
        self.server = grpc.aio.server(interceptors=interceptors, options=channel_options(config))
        self.port = 0
        self._serving: bool | None = None
        self._stop_watch = asyncio.Event()
        self._watch: asyncio.Task | None = None

    def _model_name(self, text: str) -> str | None:
        card = self.pool.card_or_none(text)
        return card.name if card is not None else None

    @property
    def models(self) -> list[str]:
        """The names served now."""
        return self.pool.names

    def _models_changed(self) -> None:
        """Health follows the pool: SERVING while at least one model is served (hot publish can change it)."""
        serving = bool(self.pool.names) and self.servicer.accepting
        if serving == self._serving or not self.port:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

        async def publish() -> None:
            await self.health.set("", status)
            await self.health.set(SERVICE_NAME, status)

        asyncio.get_running_loop().create_task(publish())

    async def start(self) -> int:
        kiln_pb2_grpc.add_KilnServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        address = f"{self.config.host}:{self.config.port}"
        tls = self.config.tls
        self.port = self.server.add_secure_port(address, tls.credentials()) if tls else \
            self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {self.config.host}:{self.config.port}")
        await self.pool.start()
        self.engine.start()
        await self.server.start()
        if self.metrics is not None:
            self._start_metrics(self.metrics)
        status = health_pb2.HealthCheckResponse.SERVING if self.models else health_pb2.HealthCheckResponse.NOT_SERVING
        self._serving = bool(self.models)
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)
        if self.config.pool.watch:
            self._watch = asyncio.ensure_future(self.pool.watch(self._stop_watch))
        if self.accounts:
            log.info("accounts: %s, tiers %s (%s), hold TTL %gs", self.accounts.ledger, self.accounts.config.tiers_file,
                     ", ".join(self.accounts.tiers), self.accounts.config.hold_ttl_s)
        else:
            _log_exposure(self.config.host)
        loaded = [f"{s.card.name}@{s.card.version}" for s in self.pool.loaded]
        log.info("serving %d model(s) [%s] on %s:%d (%s); loaded: %s%s", len(self.models), ", ".join(self.models),
                 self.config.host, self.port, _describe_tls(self.config.tls), ", ".join(loaded) or "none",
                 f"; memory budget {self.pool.budget / 1e6:.0f} MB" if self.pool.budget is not None else "")
        return self.port

    def _start_metrics(self, metrics: Metrics) -> None:
        from prometheus_client import start_http_server

        tls = self.config.tls
        http, _ = start_http_server(
            self.config.metrics_port or 0, self.config.metrics_host, metrics.registry,
            certfile=str(tls.cert) if tls else None, keyfile=str(tls.key) if tls else None,
            client_cafile=str(tls.client_ca) if tls and tls.client_ca else None,
            client_auth_required=bool(tls and tls.client_ca))
        self._metrics_http = http
        self.metrics_port = http.server_port
        log.info("metrics on %s://%s:%d/metrics", "https" if tls else "http", self.config.metrics_host,
                 self.metrics_port)

    async def stop(self) -> None:
        """Health NOT_SERVING at once; new Generate calls are still taken for the lame-duck period, then refused
        UNAVAILABLE; in-flight requests finish (up to the grace period) while health checks keep answering; then
        the server closes."""
        log.info("shutting down: health NOT_SERVING, finishing %d in-flight request(s)%s", self.engine.active,
                 f"; new calls taken for {self.config.lame_duck_s:g}s more" if self.config.lame_duck_s else "")
        self._stop_watch.set()
        await self.health.enter_graceful_shutdown()
        t0 = time.monotonic()
        if self.config.lame_duck_s:
            await asyncio.sleep(self.config.lame_duck_s)
            log.info("lame-duck period over: refusing new calls")
        self.servicer.accepting = False
        if self._watch is not None:
            await asyncio.wait({self._watch}, timeout=5.0)
        await self.pool.close()
        grace = max(self.config.shutdown_grace_s - (time.monotonic() - t0), 0.0)
        if not await self.engine.drain(grace):
            log.warning("grace period of %gs over: cancelling %d request(s)", self.config.shutdown_grace_s,
                        self.engine.active)
        await self.server.stop(5.0)  # in-flight streams send their last messages
        await self.engine.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self.accounts:
            await self.accounts.close()
        if self.tracing:
            await asyncio.to_thread(self.tracing.shutdown)  # flushes the batched spans: blocking I/O
        log.info("stopped")


def _tracing(config: TracingConfig, provider: Any) -> Tracing | None:
    if provider is not None:
        return Tracing(provider)
    return Tracing(otlp_provider(config), owned=True) if config.endpoint() else None


def _describe_tls(tls: ServerTls | None) -> str:
    if tls is None:
        return "plaintext"
    return "TLS, client certificates required (mutual TLS)" if tls.client_ca else "TLS"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _log_exposure(host: str) -> None:
    if _is_loopback(host):
        log.warning("NO AUTH: serving openly on loopback %s (reachable from this machine only); give --auth-db "
                    "to require API keys and enforce credits", host)
    else:
        log.warning("NO AUTH and %s is not loopback (--insecure-open): anyone who can reach it can generate", host)


async def serve(config: ServeConfig, gateway: GatewayConfig | None = None) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code. With `gateway`, the HTTP gateway runs beside
    the server in this process, as a client of its gRPC port (the gateway's `target` is set to it)."""
    server = KilnServer(config)
    await server.start()
    if not server.models:
        log.warning("no bundles in %s: compile one with `kiln compile` (health is NOT_SERVING until one is %s)",
                    config.store, "published" if config.pool.watch else "there at a restart")
    http = None
    if gateway is not None:
        from gateway.server import GatewayServer

        host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
        gateway.target = f"{host}:{server.port}"
        http = GatewayServer(gateway)
        try:
            await http.start()
        except BaseException:  # e.g. gateway.server.Exposed: stop the gRPC server before the error goes up
            await server.stop()
            raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if http:
        await http.stop()
    await server.stop()
    return 0
