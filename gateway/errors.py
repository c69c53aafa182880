"""gRPC status (with its google.rpc details) -> HTTP status, headers and a JSON body; the same JSON shape for the
gateway's own refusals (bad JSON, wrong types, bad base64). Bad input is a 4xx naming the field, never a 500."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 422, grpc.StatusCode.OUT_OF_RANGE: 422, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNIMPLEMENTED: 501,
}
"""Everything else (INTERNAL, UNKNOWN, DATA_LOSS) is the server's fault: 502 with its request id."""

BUSY_REASONS = frozenset({"SERVER_BUSY"})
"""RESOURCE_EXHAUSTED reasons that are the server's capacity, not the caller's quota: 503, not 429."""

PASSED_HEADERS = ("x-request-id", "x-credits-cost", "x-credits-remaining", "x-credits-reset", "x-ratelimit-remaining")
"""gRPC metadata a response passes on as HTTP headers of the same names."""


def passed_headers(metadata: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k in PASSED_HEADERS}


RESOURCE_FIELDS = {"model": "model", "adapter": "loras"}
"""A NOT_FOUND's ResourceInfo.resource_type -> the GenerateRequest field that named the missing resource."""

DETAIL_TYPES = (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.ResourceInfo,
                error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo, error_details_pb2.PreconditionFailure)


@dataclass
class ApiError(Exception):
    """A refusal on its way to the HTTP client."""

    status: int
    code: str
    """The gRPC status name (INVALID_ARGUMENT, ...), also for the gateway's own refusals."""
    message: str
    violations: list[tuple[str, str]] = field(default_factory=list)
    """(field, description) pairs; fields named as the HTTP surface names them."""
    details: list[dict[str, Any]] = field(default_factory=list)
    """The google.rpc details, as JSON (`@type` plus the message's fields)."""
    headers: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    """ErrorInfo.reason when the server sent one (CREDITS_EXHAUSTED, SERVER_BUSY, ...)."""

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def field(self) -> str | None:
        return self.violations[0][0] if self.violations else None

    @property
    def unknown_model(self) -> bool:
        """The server's NOT_FOUND for the request's model."""
        return self.code == "NOT_FOUND" and self.field == "model"

    def renamed(self, names: Mapping[str, str]) -> ApiError:
        """The same error with field names translated (`guidance_scale` -> `cfg_scale`); a nested field
        (`loras[0].scale`) is translated by its first part."""
        def head(name: str) -> str:
            return name.split(".")[0].split("[")[0]

        def one(name: str) -> str:
            h = head(name)
            return names[h] + name[len(h):] if h in names else name

        def text(name: str, description: str) -> str:  # "guidance_scale=999 must ..." -> "cfg_scale=999 must ..."
            h = head(name)
            return names[h] + description[len(h):] if h in names and description.startswith(h + "=") else description

        self.violations = [(one(f), text(f, d)) for f, d in self.violations]
        for d in self.details:
            for v in d.get("fieldViolations", ()):
                v["field"] = one(v.get("field", ""))
        return self

    def body(self) -> dict[str, Any]:
        """Kiln's and AUTOMATIC1111's routes: `error`, `message`, `field`, FastAPI-style `detail`, `details`."""
        return {
            "error": self.code, "message": self.message, "field": self.field,
            "detail": [{"loc": ["body", *_loc(f.removeprefix("body"))], "msg": d, "type": "value_error"}
                       for f, d in self.violations] or self.message,
            "details": self.details,
        }

    def openai_body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 429:
            kind = "insufficient_quota" if self.reason == "CREDITS_EXHAUSTED" else "rate_limit_exceeded"
        if self.status in (401, 403):
            kind = "authentication_error" if self.status == 401 else "permission_error"
        return {"error": {"message": self.message, "type": kind, "param": self.field,
                          "code": (self.reason or self.code).lower()}}


def _loc(name: str) -> list[str | int]:
    out: list[str | int] = []
    for part in name.replace("]", "").replace("[", ".").split("."):
        if part:
            out.append(int(part) if part.isdigit() else part)
    return out


def from_rpc_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> ApiError:
    code = error.code()  # type: ignore[attr-defined]
    trailing = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    status = HTTP_STATUS.get(code, 502)
    violations: list[tuple[str, str]] = []
    details: list[dict[str, Any]] = []
    reason, retry_s = "", None
    raw = trailing.get("grpc-status-details-bin")
    if isinstance(raw, bytes):
        for packed in status_pb2.Status.FromString(raw).details:
            for cls in DETAIL_TYPES:
                if packed.Is(cls.DESCRIPTOR):
                    detail = cls()
                    packed.Unpack(detail)
                    details.append({"@type": packed.type_url, **json_format.MessageToDict(detail)})
                    if isinstance(detail, error_details_pb2.BadRequest):
                        violations += [(v.field, v.description) for v in detail.field_violations]
                    elif isinstance(detail, error_details_pb2.ErrorInfo):
                        reason = detail.reason
                    elif isinstance(detail, error_details_pb2.RetryInfo):
                        retry_s = detail.retry_delay.ToTimedelta().total_seconds()
                    elif isinstance(detail, error_details_pb2.ResourceInfo) and code == grpc.StatusCode.NOT_FOUND \
                            and detail.resource_type in RESOURCE_FIELDS:
                        violations.append((RESOURCE_FIELDS[detail.resource_type], error.details() or ""))
    headers = passed_headers({k: v for k, v in trailing.items() if isinstance(v, str)})
    message = error.details() or code.name  # type: ignore[attr-defined]
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason in BUSY_REASONS:
        status = 503
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not details and "larger than max" in message:
        # gRPC's own message-size limit (the server's ServeConfig.max_receive_bytes): the size, not a quota
        status, message = 413, f"the request is larger than the Kiln server accepts ({message}); send smaller images"
        violations = [("body", message)]
    if status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(retry_s if retry_s is not None else 1.0)))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="kiln", Basic realm="kiln"'
    if code == grpc.StatusCode.UNAVAILABLE and not details and "shutting down" not in message:
        message = f"the Kiln server is unreachable: {message}"
    return ApiError(status, code.name, message, violations, details, headers, reason)


@contextlib.contextmanager
def rpc_errors() -> Iterator[None]:
    """A gRPC call's refusal, as the ApiError the HTTP client gets."""
    try:
        yield
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e) from None


def bad_request(field_name: str, message: str, status: int = 422) -> ApiError:
    """The gateway's own refusal of one field (before anything is sent to the server)."""
    return ApiError(status, "INVALID_ARGUMENT", message, [(field_name, message)])


def from_validation(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """FastAPI/pydantic's RequestValidationError -> the same shape (422, fields named by their JSON path)."""
    violations = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "form")]
        where = ".".join(loc) or "body"
        msg = str(e.get("msg", "invalid value"))
        if e.get("type") == "json_invalid":
            where, msg = "body", f"malformed JSON: {msg}"
        violations.append((where, f"{where}: {msg}"))
    message = "; ".join(d for _, d in violations) or "invalid request"
    return ApiError(422, "INVALID_ARGUMENT", message, violations)


def no_models() -> ApiError:
    return ApiError(503, "UNAVAILABLE", "the Kiln server serves no models yet", headers={"Retry-After": "5"})


def internal(request_id: str) -> ApiError:
    """An unexpected failure in the gateway itself (logged with the same request id)."""
    return ApiError(500, "INTERNAL", f"internal gateway error; request id {request_id}")
