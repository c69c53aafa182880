"""Errors the runtime raises on purpose, each knowing its gRPC status and google.rpc details."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "kiln"


class KilnError(Exception):
    """Base: a request-level failure that maps to one gRPC status; the server keeps serving."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def details(self) -> list[any_pb2.Any]:
        return []

    def to_status(self) -> status_pb2.Status:
        packed = []
        for d in self.details():
            a = any_pb2.Any()
            a.Pack(d)
            packed.append(a)
        return status_pb2.Status(code=getattr(code_pb2, self.code.name), message=str(self), details=packed)


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(KilnError):
    """One or more request fields are out of range; carries google.rpc.BadRequest."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]):
        self.violations = violations
        super().__init__("; ".join(v.description for v in violations))

    def details(self) -> list:  # type: ignore[override]
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
        ]


QUOTED_CHARS = 40
"""Most characters of a client's string that an error repeats."""


def quoted(value: str, most: int = QUOTED_CHARS) -> str:
    """A client's string for an error message, cut to `most` characters: the message travels in the response's
    trailing metadata twice (text and details), and gRPC clients drop a call whose metadata passes 16 KiB."""
    return repr(value) if len(value) <= most else f"{value[:most]!r}... ({len(value)} characters)"


class NotFound(KilnError):
    """The requested model is not served here; carries google.rpc.ResourceInfo."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name = kind, name
        listing = ", ".join(available) if available else "none"
        super().__init__(f"{kind} {quoted(name)} is not served here; available: {listing}")

    def details(self) -> list:  # type: ignore[override]
        shown = self.name if len(self.name) <= QUOTED_CHARS else self.name[:QUOTED_CHARS] + "..."
        return [error_details_pb2.ResourceInfo(resource_type=self.kind, resource_name=shown)]


class Unavailable(KilnError):
    """The server is shutting down and takes no new work."""

    code = grpc.StatusCode.UNAVAILABLE


def _error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)


class Unauthenticated(KilnError):
    """No API key, or one the server does not accept; carries google.rpc.ErrorInfo."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def details(self) -> list:  # type: ignore[override]
        return [_error_info(self.reason)]


class PermissionDenied(KilnError):
    """The key's tier does not allow this (a model, an admin RPC); carries google.rpc.ErrorInfo."""

    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, message: str, reason: str, **metadata: str):
        super().__init__(message)
        self.reason, self.metadata = reason, metadata

    def details(self) -> list:  # type: ignore[override]
        return [_error_info(self.reason, **self.metadata)]


class ResourceExhausted(KilnError):
    """Credits, rate or concurrency used up: google.rpc.QuotaFailure, RetryInfo and ErrorInfo (reason
    CREDITS_EXHAUSTED, RATE_LIMITED or CONCURRENCY_LIMITED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, reason: str, subject: str, retry_after_s: float, **metadata: str):
        super().__init__(message)
        self.reason, self.subject, self.retry_after_s, self.metadata = reason, subject, retry_after_s, metadata

    def details(self) -> list:  # type: ignore[override]
        from google.protobuf import duration_pb2

        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(max(self.retry_after_s, 0.0) * 1e9))
        return [
            error_details_pb2.QuotaFailure(violations=[
                error_details_pb2.QuotaFailure.Violation(subject=self.subject, description=str(self))]),
            error_details_pb2.RetryInfo(retry_delay=delay),
            _error_info(self.reason, **self.metadata),
        ]


class Aborted(KilnError):
    """A retry of a request (same idempotency key) that is still running."""

    code = grpc.StatusCode.ABORTED

    def details(self) -> list:  # type: ignore[override]
        return [_error_info("IDEMPOTENT_REQUEST_RUNNING")]


class FailedPrecondition(KilnError):
    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def details(self) -> list:  # type: ignore[override]
        return [_error_info(self.reason)]
