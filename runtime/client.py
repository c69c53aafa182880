"""`kiln generate` and `kiln models list`: a gRPC client with a progress bar and readable errors."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime.tls import ClientTls

MAX_MESSAGE_BYTES = 64 << 20
DETAIL_TYPES = (
    error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.ResourceInfo,
    error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo, error_details_pb2.PreconditionFailure,
)


def channel(target: str, tls: ClientTls | None = None) -> grpc.Channel:
    """A channel to a Kiln server: plaintext, or TLS (`tls`) for servers started with --tls-cert."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", 16 << 20)]
    if tls is not None:
        return grpc.secure_channel(target, tls.credentials(), options=options)
    return grpc.insecure_channel(target, options=options)


def output_paths(out: Path, n: int) -> list[Path]:
    """`out` for one image; `stem-1.png`, `stem-2.png`, ... for several."""
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{k + 1}{out.suffix}") for k in range(n)]


class Bar:
    """A one-line text progress bar on stderr (redrawn in place on a TTY)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30):
        self.stream, self.width = stream, width
        self.tty = stream.isatty()
        self._last = ("", -1)

    def draw(self, stage: str, step: int, total: int, elapsed: float) -> None:
        if not self.tty:  # logs get a line per stage and per tenth of the steps, not one per step
            tenth = step * 10 // total if total else 0
            if (stage, tenth) == self._last:
                return
            self._last = (stage, tenth)
        filled = int(self.width * step / total) if total else 0
        counts = f"{step}/{total}" if total else "..."  # `loading` (the model): no steps to count
        line = f"{stage:<11} [{'#' * filled}{'.' * (self.width - filled)}] {counts} {elapsed:6.1f}s"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


@dataclass
class GenerateResult:
    paths: list[Path]
    started: pb.Started
    artifacts: list[pb.Artifact]
    metadata: dict[str, str]
    """Initial and trailing metadata of the call (x-credits-*, x-ratelimit-remaining, x-request-id)."""


def key_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def call_metadata(call: object) -> dict[str, str]:
    """Initial then trailing metadata of a finished call (or of an RpcError), as one dict."""
    out: dict[str, str] = {}
    for get in ("initial_metadata", "trailing_metadata"):
        fn = getattr(call, get, None)
        for k, v in (fn() if fn else None) or ():
            if isinstance(v, str):
                out[k] = v
    return out


def describe_credits(metadata: dict[str, str]) -> str:
    """One line of the x-credits-* and x-ratelimit-remaining figures, or "" when the server sent none."""
    parts = []
    if "x-credits-cost" in metadata:
        parts.append(f"cost {metadata['x-credits-cost']} credit(s)")
    if "x-credits-remaining" in metadata:
        parts.append(f"{metadata['x-credits-remaining']} credit(s) left today")
    if "x-credits-reset" in metadata:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(int(metadata["x-credits-reset"])))
        parts.append(f"reset {when}")
    if "x-ratelimit-remaining" in metadata:
        parts.append(f"{metadata['x-ratelimit-remaining']} request(s) left this minute")
    return "credits: " + ", ".join(parts) if parts else ""


def generate(target: str, request: pb.GenerateRequest, out: Path, timeout: float | None = None,
             metadata: tuple[tuple[str, str], ...] = (), progress: bool = True,
             tls: ClientTls | None = None) -> GenerateResult:
    """Stream one Generate call, writing each image as it arrives."""
    bar = Bar() if progress else None
    started = pb.Started()
    artifacts: list[pb.Artifact] = []
    paths: list[Path] = []
    with channel(target, tls) as ch:
        stub = pb_grpc.KilnStub(ch)
        call = stub.Generate(request, timeout=timeout, metadata=metadata)
        for response in call:
            kind = response.WhichOneof("event")
            if kind == "started":
                started = response.started
                for t in started.truncations:
                    print(f"warning: {t.field} is longer than the text encoder's window; dropped "
                          f"{t.dropped_tokens} tokens: {t.dropped_text!r}", file=sys.stderr)
            elif kind == "progress":
                p = response.progress
                if p.preview_png:  # beside the first image: out.preview-step003.png
                    first = output_paths(out, started.num_images or 1)[0]
                    first.parent.mkdir(parents=True, exist_ok=True)
                    first.with_name(f"{first.stem}.preview-step{p.step:03d}.png").write_bytes(p.preview_png)
                if bar:
                    bar.draw(p.stage, p.step, p.total_steps, p.elapsed_s)
            elif kind == "artifact":
                a = response.artifact
                path = output_paths(out, started.num_images or 1)[a.index]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(a.data)
                artifacts.append(a)
                paths.append(path)
        got = call_metadata(call)
    if bar:
        bar.close()
    return GenerateResult(paths, started, artifacts, got)


def describe_error(error: grpc.RpcError) -> str:
    """`CODE: message` plus one line per google.rpc detail."""
    lines = [f"{error.code().name}: {error.details()}"]
    credits = describe_credits(call_metadata(error))
    if credits:
        lines.append(f"  {credits}")
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for any_detail in status.details if status else []:
        for cls in DETAIL_TYPES:
            if any_detail.Is(cls.DESCRIPTOR):
                detail = cls()
                any_detail.Unpack(detail)
                if isinstance(detail, error_details_pb2.BadRequest):
                    lines += [f"  {v.field}: {v.description}" for v in detail.field_violations]
                else:
                    text = " ".join(str(detail).split())
                    lines.append(f"  {cls.DESCRIPTOR.name}: {text}")
    return "\n".join(lines)


def list_models(target: str, timeout: float = 10.0, api_key: str = "",
                tls: ClientTls | None = None) -> pb.ListModelsResponse:
    with channel(target, tls) as ch:
        return pb_grpc.KilnStub(ch).ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=key_metadata(api_key))


def load_model(target: str, model: str, unload: bool = False, timeout: float = 600.0, api_key: str = "",
               tls: ClientTls | None = None) -> pb.ModelInfo:
    """LoadModel (or UnloadModel): returns when the model is loaded (or unloaded)."""
    with channel(target, tls) as ch:
        stub = pb_grpc.KilnStub(ch)
        call = stub.UnloadModel(pb.UnloadModelRequest(model=model), timeout=timeout, metadata=key_metadata(api_key)) \
            if unload else stub.LoadModel(pb.LoadModelRequest(model=model), timeout=timeout,
                                          metadata=key_metadata(api_key))
        return call


def get_balance(target: str, api_key: str, timeout: float = 10.0, tls: ClientTls | None = None) -> pb.Balance:
    with channel(target, tls) as ch:
        return pb_grpc.KilnStub(ch).GetBalance(pb.GetBalanceRequest(), timeout=timeout, metadata=key_metadata(api_key))


def wait_ready(target: str, timeout: float = 60.0, tls: ClientTls | None = None) -> None:
    """Block until the server's health check says SERVING (used by `make demo`)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with channel(target, tls) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as e:
            last = e
        time.sleep(0.3)
    raise TimeoutError(f"{target} not SERVING after {timeout:g}s ({last})")
