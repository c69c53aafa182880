"""Kiln's own HTTP surface, a JSON mirror of the gRPC contract: `POST /v1/generate` streams Server-Sent Events
(started, progress with optional previews, one artifact per image, then done) as the gRPC stream does;
`GET /v1/models`, `GET /v1/balance`, `POST /v1/interrupt`, `GET /healthz`. Field names are the proto's
(snake_case or lowerCamelCase), bytes are base64 (a `data:` URL prefix is accepted)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import json_format

from gateway.context import CallerDep, gateway
from gateway.errors import ApiError, bad_request, passed_headers, rpc_errors
from gateway.images import decode_base64
from gateway.jobs import Interrupted, stream
from proto.kiln.v1 import kiln_pb2 as pb

router = APIRouter(tags=["kiln"])

BYTES_FIELDS = {"init_image": "init_image", "initImage": "init_image", "mask_image": "mask_image",
                "maskImage": "mask_image"}
"""The request's bytes fields under both JSON spellings, decoded strictly here (protobuf's JSON parser
accepts invalid base64 silently)."""


def message_json(message: Any) -> dict[str, Any]:
    """Proto JSON with the proto's field names, zero values included (an artifact's index 0 is `"index": 0`)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True)


def parse_request(body: Any) -> pb.GenerateRequest:
    """JSON -> kiln.v1.GenerateRequest (unknown fields ignored); a wrong type is a 422 naming the field."""
    if not isinstance(body, dict):
        raise bad_request("body", f"the body must be a JSON object (GenerateRequest), not {type(body).__name__}")
    images = {BYTES_FIELDS[k]: decode_base64(v, BYTES_FIELDS[k]) for k, v in body.items()
              if k in BYTES_FIELDS and v not in (None, "")}
    try:
        message = json_format.ParseDict({k: v for k, v in body.items() if k not in BYTES_FIELDS}, pb.GenerateRequest(),
                                        ignore_unknown_fields=True)
    except json_format.ParseError as e:
        text = str(e)
        m = (re.search(r"Failed to parse (\w+) field", text) or re.search(r" at GenerateRequest\.(\w+)", text)
             or re.search(r"field named \"?(\w+)", text))
        raise bad_request(m.group(1) if m else "body", text[:300]) from None
    for name, data in images.items():
        setattr(message, name, data)
    return message


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@router.post("/v1/generate", summary="Generate, streaming Server-Sent Events",
             response_description="text/event-stream: [progress (stage loading)*], started, progress*, "
                                  "artifact*, done (or error)")
async def generate(request: Request, who: CallerDep,
                   body: Annotated[Any, Body(examples=[{"model": "tiny", "prompt": "a red circle", "steps": 4,
                                                        "preview_every": 1}])]) -> StreamingResponse:
    gw = gateway(request)
    message = parse_request(body)
    job = gw.jobs.open(who.client)
    events = stream(gw.upstream, job, message, who.metadata())
    try:
        call, first = await events.__anext__()  # a refusal is an HTTP status, not an event
    except Interrupted:  # the caller's interrupt came before the first event
        gw.jobs.close(job)
        raise ApiError(499, "CANCELLED", "interrupted (/v1/interrupt) before the generation started") from None
    except BaseException:
        gw.jobs.close(job)
        raise

    async def body_stream() -> AsyncIterator[bytes]:
        try:
            # `started`, or `progress` with stage "loading" first when the model loads for this request
            yield sse(first.WhichOneof("event") or "event", message_json(first))
            try:
                async for _, event in events:
                    yield sse(event.WhichOneof("event") or "event", message_json(event))
            except ApiError as e:
                yield sse("error", {"status": e.status, **e.body()})
                return
            except Interrupted:
                yield sse("error", {"status": 499, "error": "CANCELLED", "message": "interrupted", "field": None})
                return
            yield sse("done", {"metadata": passed_headers(call.metadata)})
        finally:
            await events.aclose()
            gw.jobs.close(job)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **passed_headers(call.metadata)}
    return StreamingResponse(body_stream(), media_type="text/event-stream", headers=headers)


@router.get("/v1/models", summary="The models the server serves: ListModels' `models`, and OpenAI's list shape")
async def models(request: Request, who: CallerDep) -> JSONResponse:
    """One path for two clients: Kiln's (`models`: ListModels as JSON) and OpenAI SDKs' `models.list()`
    (`object: "list"`, `data: [{id, object: "model", created, owned_by}]`)."""
    with rpc_errors():
        listing = await gateway(request).upstream.list_models(who.key)
    created = int(time.time())
    return JSONResponse({
        "object": "list",
        "data": [{"id": m.name, "object": "model", "created": created, "owned_by": "kiln"} for m in listing.models],
        "models": message_json(listing).get("models", []),
    })


@router.get("/v1/balance", summary="The calling key's credits today (GetBalance)")
async def balance(request: Request, who: CallerDep) -> JSONResponse:
    with rpc_errors():
        b = await gateway(request).upstream.balance(who.key)
    return JSONResponse({f.name: getattr(b, f.name) for f in b.DESCRIPTOR.fields})  # int64 as numbers


@router.post("/v1/interrupt", summary="Cancel the caller's running generations")
async def interrupt(request: Request, who: CallerDep) -> JSONResponse:
    return JSONResponse({"interrupted": gateway(request).jobs.interrupt(who.client)})


@router.get("/healthz", summary="200 when the gRPC server answers SERVING, else 503")
async def healthz(request: Request) -> JSONResponse:
    ok = await gateway(request).upstream.ready()
    return JSONResponse({"status": "SERVING" if ok else "NOT_SERVING", "target": gateway(request).config.target},
                        status_code=200 if ok else 503)
