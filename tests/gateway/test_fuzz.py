"""Fuzz of the gateway's HTTP surfaces on a real `kiln gateway` in front of a real `kiln serve` (tiny model):
AUTOMATIC1111's txt2img, img2img, png-info and options, and Kiln's SSE `/v1/generate`. Bodies that are not JSON,
not objects, nested past any parser, or not UTF-8; and valid requests with one or two fields set to a wrong type or
an edge value (huge, negative, NaN, inf, NULs, lone surrogates, bad base64, non-images, odd image sizes, unknown
samplers, out-of-range sizes and counts, deep nesting). Every answer is a 2xx or a 4xx whose JSON carries `error`,
`message` and the `field` at fault -- never a 5xx, a dropped connection or a dead gateway. Bodies over
`--max-body-bytes` get 413, announced or streamed. What the fuzz found is also tested one by one below."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from gateway.config import GatewayConfig
from gateway.jsoncheck import MAX_DEPTH
from tests.conftest import ServerProcess
from tests.gateway.conftest import GatewayProcess

NAN, INF = float("nan"), float("inf")
SURROGATE = "\ud800"  # JSON's "\ud800" escape: valid JSON, not valid Unicode
MAX_BODY = GatewayConfig().max_body_bytes


def pattern(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one row of data: readers must refuse it from the header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + chunk(b"IEND", b""))


def png(width: int = 64, height: int = 64, text: str = "") -> bytes:
    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text("parameters", text)
    buf = io.BytesIO()
    Image.fromarray(pattern(width, height)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


INFOTEXT = "a red circle\nNegative prompt: blue\nSteps: 4, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 64x64"
GIF = io.BytesIO()
Image.fromarray(pattern(64, 64)).save(GIF, format="GIF")
IMAGES = {  # base64 strings, as clients send them
    "png": b64(png()), "data URL": "data:image/png;base64," + b64(png()), "empty data URL": "data:,",
    "not base64": "!!not base64!!", "one char": "A", "empty": "", "non-image bytes": b64(b"hello, not an image" * 10),
    "1x1": b64(png(1, 1)), "65x33": b64(png(65, 33)), "truncated PNG": b64(png()[:80]),
    "100000x100000 in header": b64(png_header(100_000, 100_000)), "0x0 in header": b64(png_header(0, 0)),
    "GIF": b64(GIF.getvalue()), "url-safe base64": base64.urlsafe_b64encode(png()).decode(),
    "with surrogate": b64(png())[:20] + SURROGATE, "NUL": "AAAA\x00AAAA",
}

# values of every JSON type and the edges of each: wrong types for any field
ANY = [None, True, False, 0, -1, 1, 2**31, 2**32, 2**64, 10**30, -(10**30), 1.5, -0.0, 1e308, NAN, INF, -INF, "",
       "x", "\x00", "a\x00b", "🎨 ünïcödé 漢字", SURROGATE, "x" * 10_000, [], [1], ["x"], {}, {"a": 1},
       nested(MAX_DEPTH + 5)]
INTS = [-1, 0, 1, 2, 3, 7, 63, 65, 72, 101, 151, 1025, 2**31, 2**32 - 1, 2**32, 2**40, 10**30, 1.5, "8", "x", 1e308,
        NAN, INF]
FLOATS = [NAN, INF, -INF, 0.0, -0.0, -1.0, 1e-45, 0.5, 1.0, 1.0000001, 30.0, 30.5, 1e308, 3.4e38, "7.5", "NaN",
          "Infinity", "x"]
TEXT = ["", " ", "\x00", "a\x00b", "x" * 2001, "x" * 100_000, "🎨 ünïcödé 漢字", "\u202eright to left", SURROGATE,
        "a" + SURROGATE + "b", "\n\t\r"]
SAMPLERS = ["Euler", "Euler a", "DPM++ 2M Karras", "k_dpmpp_2m", "ddim", "LCM", "nope", "DPM++ 2M karras",
            "Euler Karras", "euler\x00", "x" * 10_000, SURROGATE]
SCHEDULERS = ["Automatic", "Karras", "karras", "Exponential", "", "x" * 10_000, SURROGATE]
CHECKPOINTS = ["tiny", "tiny [abcdef0123]", "tiny.safetensors", "nope", "", "TINY", "x" * 10_000, SURROGATE]

A1111 = {
    "prompt": TEXT, "negative_prompt": TEXT, "seed": [-1, -2, 0, 2**32 - 1, 2**32, 10**30, 1.5, "1"],
    "width": INTS, "height": INTS, "steps": INTS, "cfg_scale": FLOATS, "sampler_name": SAMPLERS,
    "sampler_index": SAMPLERS, "scheduler": SCHEDULERS, "batch_size": [0, 1, 2, 4, 5, -1, 2**32, 2**40, 1.5, "2"],
    "n_iter": [0, 1, 2, 101, -1, 2**32, 10**30, 1.5, "2"], "send_images": [False, "maybe", 2],
    "override_settings": [{}, *({"sd_model_checkpoint": c} for c in CHECKPOINTS), {"sd_model_checkpoint": 5},
                          {"sd_model_checkpoint": None}, {"other": nested(MAX_DEPTH + 5)}, "x", [1]],
    "alwayson_scripts": [{}, {"x": {"args": [1, NAN]}}, nested(MAX_DEPTH - 2), nested(MAX_DEPTH + 5)],
}
IMG2IMG = {
    **A1111,
    "init_images": [[IMAGES[k]] for k in IMAGES] + [[], [IMAGES["png"], IMAGES["png"]], IMAGES["png"], [5], [None]],
    "denoising_strength": FLOATS, "mask": list(IMAGES.values()), "mask_blur": [0, 4, 64, 65, -1, 2**32, 10**30, "4"],
    "inpainting_mask_invert": [0, 1, 2, "x", -1],
}
GENERATE = {
    "model": ["tiny", "nope", "", "TINY", "tiny\x00", "x" * 10_000, SURROGATE], "prompt": TEXT,
    "negative_prompt": TEXT, "width": INTS, "height": INTS, "steps": INTS, "guidance_scale": FLOATS,
    "sampler": ["euler", "dpmpp_2m_karras", "Euler a", "nope", "", "x" * 10_000, SURROGATE],
    "seed": [0, 2**32 - 1, 2**32, -1, "1", 1.5], "num_images": [0, 1, 2, 5, 2**32, "2"],
    "request_id": ["", "ok-1", "has space", "x" * 129, "abc\n", SURROGATE], "preview_every": [0, 1, 2, 2**32],
    "init_image": list(IMAGES.values()), "initImage": [IMAGES["png"], IMAGES["not base64"]],
    "mask_image": list(IMAGES.values()), "strength": FLOATS, "mask_blur": [0, 64, 65, 2**32],
    "loras": [[], [{"name": "nope"}], [{"name": "a", "scale": "NaN"}], [{"name": 5}], "x", [{"scale": 1}]],
    "decoder": ["", "full", "tiny", "nope", SURROGATE], "size_conditioning": [{}, 5, {"original_width": 1024},
                                                                              {"crop_top": 2**33}, {"nope": 1}],
}
BODIES: dict[str, tuple[dict[str, Any], dict[str, list[Any]]]] = {
    "/sdapi/v1/txt2img": ({"prompt": "a red circle", "steps": 1, "seed": 1}, A1111),
    "/sdapi/v1/img2img": ({"prompt": "a red circle", "steps": 2, "seed": 1, "init_images": [IMAGES["png"]],
                           "denoising_strength": 0.5}, IMG2IMG),
    "/sdapi/v1/png-info": ({"image": b64(png(text=INFOTEXT))}, {"image": list(IMAGES.values())}),
    "/sdapi/v1/options": ({"sd_model_checkpoint": "tiny"}, {"sd_model_checkpoint": CHECKPOINTS,
                                                            "CLIP_stop_at_last_layers": [2, NAN, SURROGATE]}),
    "/v1/generate": ({"model": "tiny", "prompt": "a red circle", "steps": 2, "seed": 1}, GENERATE),
}
IMAGE_PAIRS = {"steps", "denoising_strength", "strength", "width", "height"}
RELATED = {  # a wrong value here can be refused under the other field's name (the pair does not fit together)
    "width": {"height", "init_images", "mask", "init_image", "mask_image"},
    "height": {"width", "init_images", "mask", "init_image", "mask_image"},
    "steps": {"denoising_strength", "strength"}, "denoising_strength": {"steps"}, "strength": {"steps"},
    "init_images": {"mask", *IMAGE_PAIRS}, "mask": {"init_images"}, "init_image": {"mask_image", *IMAGE_PAIRS},
    "initImage": {"init_image", "mask_image", *IMAGE_PAIRS}, "mask_image": {"init_image"},
}

RAW = [  # bodies that are not a JSON object
    b"{not json", b"", b"[1, 2]", b'"a string"', b"null", b"42", b"true", b"{", b'{"prompt": }', b"[" * 100_000,
    b'{"a":' * 5000 + b"1" + b"}" * 5000, b"\xff\xfe\x00{", b'{"prompt": "\xff"}', "[1]".encode("utf-16"), b"\x00" * 64,
]


@dataclass(frozen=True)
class Case:
    path: str
    body: bytes
    fields: frozenset[str]
    """The fields changed from a valid request; empty when the whole body is at fault."""
    content_type: str = "application/json"

    def __repr__(self) -> str:  # what a failing example prints: short enough to read
        shown = self.body if len(self.body) <= 300 else self.body[:300] + b"... (%d bytes)" % len(self.body)
        return f"Case({self.path}, {shown!r}, fields={sorted(self.fields)}, content_type={self.content_type!r})"


def dumps(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # NaN and Infinity tokens, as JavaScript-ish clients send


@st.composite
def cases(draw: st.DrawFn) -> Case:
    path = draw(st.sampled_from(sorted(BODIES)))
    base, edges = BODIES[path]
    if draw(st.integers(0, 9)) == 0:  # the body as a whole
        raw = draw(st.sampled_from(RAW))
        content_type = draw(st.sampled_from(["application/json", "text/plain", ""]))
        return Case(path, raw, frozenset(), content_type)
    body = dict(base)
    names = draw(st.lists(st.sampled_from(sorted(edges)), min_size=1, max_size=2, unique=True))
    for name in names:
        body[name] = draw(st.sampled_from(edges[name]) | st.sampled_from(ANY))
    return Case(path, dumps(body), frozenset(names))


def root(field: str) -> str:
    return field.split(".")[0].split("[")[0]


def check(client: httpx.Client, case: Case) -> str:
    """Sends the case; asserts a sound answer; returns what happened, for hypothesis' statistics."""
    headers = {"content-type": case.content_type} if case.content_type else {}
    response = client.post(case.path, content=case.body, headers=headers)
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:500]}"
    if status >= 400:
        body = response.json()
        assert {"error", "message", "field"} <= body.keys(), body
        assert body["error"] and body["message"], body
        if case.fields:
            allowed = case.fields | {r for f in case.fields for r in RELATED.get(f, ())}
            assert body["field"] and root(body["field"]) in allowed, f"{status} {body['field']!r}: {body['message']}"
        else:
            assert body["field"] == "body", f"{status} {body['field']!r}: {body['message']}"
        return f"{status} {root(body['field'])}"
    if case.path == "/v1/generate":
        events = [line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")]
        assert events[0] == "started" and events[-1] in ("done", "error"), events
        if events[-1] == "error":
            error = json.loads(response.text.strip().splitlines()[-1].removeprefix("data: "))
            assert 400 <= error["status"] < 500 and error["message"], error
    elif case.path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
        body = response.json()
        assert json.loads(body["info"])["all_seeds"], body["info"][:300]
        if body["parameters"]["send_images"]:
            assert body["images"] and all(base64.b64decode(i).startswith(b"\x89PNG") for i in body["images"])
    elif case.path == "/sdapi/v1/png-info":
        assert isinstance(response.json()["info"], str)
    return f"{status}"


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module", autouse=True)
def logs_before(gateway: GatewayProcess, server: ServerProcess) -> tuple[int, int]:
    """Where the shared gateway's and server's logs stood before this module's requests."""
    return len(gateway.log()), len(server.log())


@settings(max_examples=500, derandomize=True, database=None, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(case=cases())
def test_fuzzed_requests_get_a_result_or_a_client_error_naming_the_field(
        client: httpx.Client, logs_before: tuple[int, int], case: Case) -> None:
    event(check(client, case))


# what the fuzz found, one by one: before their fixes each gave a 500 (and a dropped keep-alive connection), a
# 400 naming no field, or a generation the request did not ask for
FOUND = [
    ("/sdapi/v1/txt2img", {"width": 10**30}, 422, "width", "width=1000000000000000000000000000000 must be 0"),
    ("/sdapi/v1/txt2img", {"steps": 2**40}, 422, "steps", "below 4294967296"),
    ("/sdapi/v1/txt2img", {"batch_size": 2**40}, 422, "batch_size", "batch_size=1099511627776 must be at least 1"),
    ("/sdapi/v1/img2img", {"init_images": [IMAGES["png"]], "mask": IMAGES["png"], "mask_blur": 10**30}, 422,
     "mask_blur", "must be between 0 and 64"),
    ("/sdapi/v1/txt2img", {"prompt": SURROGATE}, 422, "prompt", "lone UTF-16 surrogate"),
    ("/sdapi/v1/txt2img", {"styles": ["a" + SURROGATE]}, 422, "styles", "styles[0] holds a lone UTF-16 surrogate"),
    ("/sdapi/v1/txt2img", {"alwayson_scripts": nested(300)}, 422, "alwayson_scripts",
     f"nested more than {MAX_DEPTH} levels deep"),
    ("/sdapi/v1/txt2img", {"scheduler": "Exponential"}, 422, "scheduler", "scheduler='Exponential' is not one"),
    ("/v1/generate", {"model": "tiny", "init_image": "!!"}, 422, "init_image", "init_image is not valid base64"),
    ("/v1/generate", {"model": "nope"}, 404, "model", "model 'nope' is not served here; available: tiny"),
]


@pytest.mark.parametrize(("path", "fields", "status", "field", "message"), FOUND,
                         ids=[str(i) for i in range(len(FOUND))])
def test_edge_values_the_fuzz_found(client: httpx.Client, path: str, fields: dict[str, Any], status: int,
                                    field: str, message: str) -> None:
    r = client.post(path, content=dumps({"prompt": "x", "steps": 1, **fields}),
                    headers={"content-type": "application/json"})
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert body["field"] == field and message in body["message"], body


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"prompt": "\xff"}'], ids=["nested past the parser", "not UTF-8"])
def test_a_body_json_cannot_read_is_a_400_naming_the_body(client: httpx.Client, raw: bytes) -> None:
    r = client.post("/sdapi/v1/txt2img", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text[:500]
    assert r.json()["error"] == "INVALID_ARGUMENT" and r.json()["field"] == "body"


def over_limit() -> bytes:
    return dumps({"init_images": ["A" * MAX_BODY]})


def test_a_body_over_the_limit_is_refused_by_its_content_length(gateway: GatewayProcess) -> None:
    """Refused from the headers alone, before the body is sent (a raw socket: the client never sends it)."""
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /sdapi/v1/img2img HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode() + b'{"init_images": ["')
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head
    error = json.loads(body)
    assert error["field"] == "body" and f"at most {MAX_BODY} are accepted" in error["message"], error


def test_a_streamed_body_over_the_limit_is_refused_as_it_arrives(client: httpx.Client) -> None:
    """Chunked, with no Content-Length: the gateway counts the bytes and refuses once they pass the limit
    (FastAPI turned this into a 400 'error parsing the body' before the fix)."""
    data = over_limit()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 1 << 20):
            yield data[i:i + (1 << 20)]

    r = client.post("/sdapi/v1/img2img", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:500]
    assert r.json()["field"] == "body" and f"at most {MAX_BODY} are accepted" in r.json()["message"]


def test_a_body_just_under_the_limit_is_read(client: httpx.Client) -> None:
    """Not refused for its size by the gateway; its image, 18 MB decoded, is over the gRPC server's 16 MiB message
    limit: a 413 naming the body, not the 429 'quota' gRPC's RESOURCE_EXHAUSTED maps to (the fuzz found that)."""
    data = dumps({"prompt": "x", "steps": 1, "init_images": [b64(b"\x00" * (MAX_BODY * 3 // 4 - 1024))]})
    assert len(data) < MAX_BODY
    r = client.post("/sdapi/v1/img2img", content=data, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:500]
    assert r.json()["field"] == "body" and "larger than the Kiln server accepts" in r.json()["message"]
    assert "retry-after" not in r.headers


def test_a_large_image_under_every_limit_is_refused_for_what_it_is(client: httpx.Client) -> None:
    data = dumps({"prompt": "x", "steps": 1, "init_images": [b64(b"\x00" * (8 << 20))]})
    r = client.post("/sdapi/v1/img2img", content=data, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "init_images[0]", r.text[:500]


def test_nan_in_an_ignored_field_is_echoed_as_null(client: httpx.Client) -> None:
    """JSON responses cannot carry NaN: an ignored field that held one comes back as null, not as a 500."""
    r = client.post("/sdapi/v1/txt2img", content=dumps({"prompt": "x", "steps": 1, "extra": NAN}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:500]
    assert r.json()["parameters"]["extra"] is None


def test_gateway_still_generates_after_all_of_this(client: httpx.Client, gateway: GatewayProcess,
                                                 server: ServerProcess, logs_before: tuple[int, int]) -> None:
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "still here", "steps": 1, "seed": 7})
    assert r.status_code == 200, r.text[:500]
    assert json.loads(r.json()["info"])["all_seeds"] == [7]
    log = gateway.log()[logs_before[0]:]
    assert "internal gateway error" not in log and "Traceback" not in log, log[-3000:]
    assert "internal error" not in server.log()[logs_before[1]:]
