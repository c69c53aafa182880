"""Field-level fuzz of Generate on a real `kiln serve` (loopback, tiny model): a valid request with one to three
fields set to edge values (empty, huge, NaN, +-inf, 2^32-1, odd image modes and sizes, truncated bytes) gets
OK, INVALID_ARGUMENT naming each bad field, NOT_FOUND or RESOURCE_EXHAUSTED -- never INTERNAL or a dead server.
The edge values the fuzz found bugs with are also tested one by one, with the messages they must give."""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime.client import channel
from runtime.samplers import SAMPLERS
from tests.conftest import ServerProcess
from tests.server.test_errors import violations
from tests.server.test_image_inputs import bomb_png, encode, pattern, right_half_mask

U32 = 2**32 - 1
NAN, INF = float("nan"), float("inf")
FIELDS = set(pb.GenerateRequest.DESCRIPTOR.fields_by_name)
FLOAT_FIELDS = {f.name for f in pb.GenerateRequest.DESCRIPTOR.fields if f.type in (f.TYPE_FLOAT, f.TYPE_DOUBLE)}
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}


def png_chunks(width: int, height: int, depth: int, color: int, rows: bytes) -> bytes:
    """A PNG written by hand, for what Pillow does not write (16-bit RGB) or writes only valid."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def rgb16(w: int = 64, h: int = 64) -> bytes:
    pixels = (pattern(w, h).astype(">u2") * 257).tobytes()
    row = 6 * w
    return png_chunks(w, h, 16, 2, b"".join(b"\x00" + pixels[y * row:(y + 1) * row] for y in range(h)))


def saved(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _images() -> dict[str, bytes]:
    rgb = Image.fromarray(pattern())
    rotated = Image.fromarray(pattern(64, 32))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 -> 32x64 upright
    png = encode(pattern())
    jpeg = saved(rgb, "JPEG")
    sof = jpeg.index(b"\xff\xc0") + 5  # baseline frame header: height, width (2 bytes each)
    frames = [Image.fromarray(np.roll(pattern(), k, axis=1)) for k in (0, 16)]
    return {
        "rgb": png,
        "palette+transparency": saved(rgb.convert("P", palette=Image.Palette.ADAPTIVE), transparency=0),
        "LA": saved(rgb.convert("LA")),
        "RGBA": saved(Image.fromarray(np.dstack([pattern(), np.full((64, 64), 128, np.uint8)]))),
        "1-bit": saved(rgb.convert("1")),
        "grey16": saved(Image.fromarray(pattern()[..., 0].astype(np.uint16) * 257)),
        "rgb16": rgb16(),
        "CMYK JPEG": saved(rgb.convert("CMYK"), "JPEG"),
        "progressive JPEG": saved(rgb, "JPEG", progressive=True),
        "WebP RGBA": saved(rgb.convert("RGBA"), "WEBP"),
        "EXIF-rotated JPEG": saved(rotated, "JPEG", exif=exif),
        "1x1": encode(pattern(1, 1)),
        "65x33": encode(pattern(65, 33)),
        "right-half mask": encode(right_half_mask()),
        "4096x4096 1-bit": bomb_png(4096, 4096),  # at the pixel limit: decoded, then resized
        "huge in header": bomb_png(100_000, 100_000),
        "2^31 x 1 in header": png_chunks(2**31 - 1, 1, 8, 0, b"\x00"),
        "0x0 in header": png_chunks(0, 0, 8, 0, b""),
        "65535x65535 JPEG header": jpeg[:sof] + b"\xff\xff\xff\xff" + jpeg[sof + 4:],
        "animated WebP": saved(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
        "truncated PNG": png[: len(png) // 2],
        "truncated JPEG": jpeg[:300],
        "PNG header only": png[:33],
        "GIF": saved(rgb, "GIF"),
        "random": bytes(range(256)) * 4,
        "empty": b"",
    }


IMAGES = _images()


@dataclass(frozen=True)
class Long:
    """`text` repeated `times`: a long string that a failing example prints short."""

    text: str
    times: int

    def __str__(self) -> str:
        return self.text * self.times


def text() -> st.SearchStrategy[str | Long]:
    edges = ["", " ", "\x00", "a\x00b", Long("x", 2000), Long("x", 2001), Long("x", 10_000), Long("a cat ", 400),
             "🎨 ünïcödé 漢字", "\u202eright to left", Long("e\u0301", 100), "\n\t\r"]
    return st.one_of(st.sampled_from(edges), st.text(st.characters(blacklist_categories=("Cs",)), max_size=30))


def floats() -> st.SearchStrategy[float]:
    edges = [NAN, INF, -INF, 0.0, -0.0, 1e-45, 0.5, 1.0, 1.0000001, 7.5, 30.0, 30.000002, -1.0, 3.4e38]
    return st.one_of(st.sampled_from(edges), st.floats(width=32))


def uints(*edges: int) -> st.SearchStrategy[int]:
    return st.sampled_from([*edges, U32])


# the edge values of every GenerateRequest field; image fields are names in IMAGES (readable when printed)
EDGES: dict[str, st.SearchStrategy] = {
    # a model name of thousands of characters is left out: test_a_huge_model_name_gets_a_readable_not_found
    "model": st.sampled_from(["", "nope", "TINY", "tiny\x00", Long("x", 100)]),
    "prompt": text(),
    "negative_prompt": text(),
    "width": uints(0, 1, 7, 56, 64, 72, 128, 1025, 1032, 2**31, U32 - 7),
    "height": uints(0, 1, 7, 56, 64, 72, 128, 1025, 1032, 2**31, U32 - 7),
    "steps": uints(0, 1, 3, 150, 151),
    "sampler": st.sampled_from([*SAMPLERS, "", "EULER", "euler\x00", "é", Long("x", 10_000)]),
    "seed": uints(0, 1, 2**31),
    "num_images": uints(0, 1, 4, 5),
    "request_id": st.one_of(st.sampled_from(["", "ok-1", "has space", Long("a", 128), Long("a", 129), "abc\n", "\x00",
                                             "é", Long("x", 10_000)]), st.text(max_size=10)),
    "preview_every": uints(0, 1, 2, 3),
    "init_image": st.sampled_from(sorted(IMAGES)),
    "mask_image": st.sampled_from(sorted(IMAGES)),
    "mask_blur": uints(0, 1, 64, 65),
    "decoder": st.sampled_from(["", "full", "tiny", "FULL", "full\x00", "é", Long("x", 10_000)]),
    # the tiny model takes no per-request adapters: any selection is refused, naming `loras`
    "loras": st.sampled_from([(), (("nope", None),), (("", 1.0),), (("a", NAN),), (("a", INF),), (("a", 5.0),),
                              (("a", 1.0), ("a", 0.5)), tuple((f"x{i}", 1.0) for i in range(17)),
                              (("x" * 10_000, 1.0),)]),
    # the tiny model is not SDXL: any size conditioning is refused, naming `size_conditioning`
    "size_conditioning": st.sampled_from([None, {}, {"original_width": 1024}, {"crop_top": 2**32 - 1},
                                          {"target_height": 5000, "crop_left": 7}]),
    "omit_progress": st.booleans(),  # changes which events come, never whether the request is valid
    **{name: floats() for name in FLOAT_FIELDS},  # guidance_scale, strength, and any float field to come
}
assert set(EDGES) == FIELDS, f"a GenerateRequest field has no edge values: {FIELDS ^ set(EDGES)}"

BASES = {
    "text_to_image": {},
    "img2img": {"init_image": "rgb", "strength": 0.5},
    "inpaint": {"init_image": "rgb", "mask_image": "right-half mask"},
}


@st.composite
def requests(draw: st.DrawFn) -> dict[str, object]:
    """A valid request (text-to-image, img2img or inpainting; small and few steps) with 1-3 fields replaced."""
    fields = {"model": "tiny", "prompt": "a red circle", "seed": 1, "steps": 2, "width": 64, "height": 64,
              **draw(st.sampled_from(list(BASES.values())))}
    for name in draw(st.lists(st.sampled_from([*sorted(EDGES), "width=height"]), min_size=1, max_size=3,
                              unique=True)):
        if name == "width=height":  # one edge value for both: square, so an init image's aspect ratio matches it
            fields["width"] = fields["height"] = draw(EDGES["width"])
        else:
            fields[name] = draw(EDGES[name])
    return fields


def build(fields: dict[str, object]) -> pb.GenerateRequest:
    def value(k: str, v: object) -> object:
        if k.endswith("_image"):
            return IMAGES[v]  # type: ignore[index]
        if k == "size_conditioning":
            return None if v is None else pb.SizeConditioning(**v)  # type: ignore[arg-type]
        if k == "loras":
            return [pb.LoraSelection(name=n) if s is None else pb.LoraSelection(name=n, scale=s)
                    for n, s in v]  # type: ignore[attr-defined]
        return str(v) if isinstance(v, Long) else v

    return pb.GenerateRequest(**{k: value(k, v) for k, v in fields.items()})


def check_outcome(target: str, fields: dict[str, object]) -> str:
    """Sends the request; asserts an allowed status and a sound answer; returns what happened, for the stats."""
    error: grpc.RpcError | None = None
    with channel(target) as ch:
        try:
            events = list(pb_grpc.KilnStub(ch).Generate(build(fields), timeout=60))
        except grpc.RpcError as e:
            error = e  # asserted on outside the except block: a failure then reads the same wherever the call broke
    if error is not None:
        code = error.code()
        assert code in ALLOWED, f"{code.name}: {error.details()}"
        if code == grpc.StatusCode.NOT_FOUND:
            assert fields["model"] != "tiny", error.details()
            return code.name
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a server without accounts: only a full queue
            assert "SERVER_BUSY" in reasons(error), error.details()
            return code.name
        bad = violations(error)
        assert bad, f"INVALID_ARGUMENT without a BadRequest: {error.details()}"
        for field, message in bad.items():
            assert field.split("[")[0].split(".")[0] in FIELDS, f"violation of {field!r}, not a GenerateRequest field: {message}"
            assert field in message, f"the message for {field} does not name it: {message}"
        if fields["model"] == "tiny":  # else the request is refused for its model before the rest is read
            for name in FLOAT_FIELDS:
                if name in fields and not math.isfinite(fields[name]):  # type: ignore[arg-type]
                    assert name in bad, f"{name}={fields[name]} was not refused: {bad}"
        return "INVALID_ARGUMENT " + ",".join(sorted(bad))
    started = events[0].started
    artifacts = [r.artifact for r in events if r.WhichOneof("event") == "artifact"]
    assert len(artifacts) == started.num_images >= 1
    assert all(a.data.startswith(b"\x89PNG\r\n\x1a\n") and (a.width, a.height) == (started.width, started.height)
               for a in artifacts)
    return "OK"


def reasons(error: grpc.RpcError) -> list[str]:
    out = []
    for d in rpc_status.from_call(error).details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            out.append(info.reason)
    return out


def healthy(target: str) -> None:
    with channel(target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def log_before(server: ServerProcess) -> int:
    """Where the shared server's log stood before this module's requests."""
    return len(server.log())


@settings(max_examples=300, derandomize=True, database=None, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fields=requests())
def test_fuzzed_requests_get_an_image_or_a_client_error(server: ServerProcess, log_before: int,
                                                        fields: dict[str, object]) -> None:
    event(check_outcome(server.target, fields).split(" ")[0])
    healthy(server.target)


def test_server_still_generates_after_the_fuzz(server: ServerProcess, log_before: int) -> None:
    assert check_outcome(server.target, {"model": "tiny", "prompt": "still here", "steps": 1}) == "OK"
    assert "internal error" not in server.log()[log_before:]  # none logged after a response was sent either


# what the fuzz found, one by one: before their fixes each gave INTERNAL, or an answer the client could not read
FOUND = [
    ({"init_image": "rgb", "strength": NAN}, "strength", "strength=nan must be greater than 0 and at most 1"),
    ({"init_image": "rgb", "strength": INF}, "strength", "strength=inf must be greater than 0 and at most 1"),
    ({"init_image": "rgb", "strength": -INF}, "strength", "strength=-inf must be greater than 0 and at most 1"),
    ({"init_image": "rgb", "strength": NAN, "preview_every": 2}, "strength", "strength=nan must be greater than 0"),
    ({"request_id": "abc\n"}, "request_id", "request_id must be 1-128 characters of letters, digits"),
    ({"init_image": "rgb", "width": U32 - 7, "height": U32 - 7}, "width",
     "width=4294967288 must be a multiple of 8 between 64 and 1024"),
    ({"init_image": "rgb", "mask_image": "right-half mask", "width": 2**31, "height": 2**31}, "height",
     "height=2147483648 must be a multiple of 8 between 64 and 1024"),
    ({"sampler": Long("x", 10_000)}, "sampler", f"sampler={'x' * 40!r}... (10000 characters) is not one of: ddim"),
    ({"decoder": Long("x", 10_000)}, "decoder", f"decoder={'x' * 40!r}... (10000 characters) is not one of: full, tiny"),
    ({"decoder": "tiny"}, "decoder", "decoder='tiny': model 'tiny' has no tiny decoder; its decoders: full"),
]


def refusal(target: str, fields: dict[str, object]) -> grpc.RpcError:
    with channel(target) as ch, pytest.raises(grpc.RpcError) as e:
        list(pb_grpc.KilnStub(ch).Generate(build({"model": "tiny", "prompt": "x", "steps": 4, **fields}), timeout=60))
    return e.value


@pytest.mark.parametrize(("fields", "field", "message"), FOUND, ids=[str(i) for i in range(len(FOUND))])
def test_edge_values_the_fuzz_found(server: ServerProcess, fields, field, message) -> None:  # type: ignore[no-untyped-def]
    e = refusal(server.target, fields)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    bad = violations(e)
    assert field in bad and message in bad[field], bad


def test_a_huge_model_name_gets_a_readable_not_found(server: ServerProcess) -> None:
    e = refusal(server.target, {"model": Long("x", 10_000)})
    assert e.code() == grpc.StatusCode.NOT_FOUND, (e.code(), e.details())
    assert e.details().startswith("model 'xxxxxxxx") and "... (10000 characters) is not served here" in e.details()
