"""Per-RPC context shared between interceptors and the servicer (contextvars follow the RPC's task)."""

from __future__ import annotations

from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("kiln_request_id", default="")
