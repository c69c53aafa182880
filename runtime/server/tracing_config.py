"""`kiln serve --otlp-endpoint ...`: where a server's traces go, and the tracer provider that sends them there.
Light on purpose (the CLI's parser reads the config's fields): the OpenTelemetry SDK and OTLP exporter (pip extra
`kiln[otel]`) are imported only when a provider is built."""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("kiln.tracing")

ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
"""The standard variables naming the OTLP endpoint, read when `--otlp-endpoint` is not given (traces' first)."""
_ENDPOINT_RE = re.compile(r"^(https?://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+)(:\d{1,5})?/?$")


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry tracing (`kiln serve --otlp-endpoint ...`)."""

    otlp_endpoint: str = ""
    """Export spans over OTLP/gRPC to this collector (`host:port` or `http(s)://host:port`, e.g.
    http://otel-collector:4317); empty: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or $OTEL_EXPORTER_OTLP_ENDPOINT if set,
    else no tracing. Needs the pip extra kiln[otel]."""
    otlp_insecure: bool = False
    """Plaintext to the collector even for a `host:port` or https:// endpoint (an http:// endpoint is always
    plaintext)."""
    otlp_service_name: str = "kiln"
    """The traces' service.name (service.version, host.name and process.pid are set too; $OTEL_RESOURCE_ATTRIBUTES
    adds more)."""

    def __post_init__(self) -> None:
        if self.otlp_endpoint and not _ENDPOINT_RE.match(self.otlp_endpoint):
            raise ValueError(f"otlp_endpoint={self.otlp_endpoint!r} must be host:port or http(s)://host:port")
        if not self.otlp_service_name.strip():
            raise ValueError("otlp_service_name must not be empty")

    def endpoint(self) -> str:
        """The flag, else the standard environment variables; "" means tracing is off."""
        return self.otlp_endpoint or next((v for k in ENDPOINT_ENV if (v := os.environ.get(k, "").strip())), "")


def kiln_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kiln")
    except PackageNotFoundError:
        return "unknown"


def otlp_provider(config: TracingConfig) -> Any:
    """A TracerProvider batching spans to the configured OTLP/gRPC endpoint, with resource attributes
    service.name, service.version (the kiln package's), host.name and process.pid."""
    endpoint = config.endpoint()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise RuntimeError(f"tracing to {endpoint} needs the OpenTelemetry SDK and OTLP exporter: "
                           f"pip install 'kiln[otel]' ({e})") from None
    resource = Resource.create({"service.name": config.otlp_service_name, "service.version": kiln_version(),
                                "host.name": socket.gethostname(), "process.pid": os.getpid()})
    provider = TracerProvider(resource=resource)
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True if config.otlp_insecure else None)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing: OTLP/gRPC to %s (service.name %s)", endpoint, config.otlp_service_name)
    return provider
