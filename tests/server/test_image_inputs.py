"""img2img and inpainting over gRPC on a real `kiln serve` (loopback): results, the Started fields, what is
charged, bad image input refused with INVALID_ARGUMENT naming the field, and a fuzz run of random and mutated
image bytes after which the server still answers."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import grpc
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from runtime.client import channel
from runtime.pipeline import Pipeline
from runtime.server.pricing import resolve
from runtime.validate import validate
from tests.conftest import ServerProcess, kiln
from tests.server.test_errors import violations

SIZE = 64


def encode(pixels: np.ndarray, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def pattern(w: int = SIZE, h: int = SIZE) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def right_half_mask(w: int = SIZE, h: int = SIZE) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[:, w // 2:] = 255
    return m


def stream(target: str, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    with channel(target) as ch:
        return list(pb_grpc.KilnStub(ch).Generate(request, timeout=120))


def refused(target: str, request: pb.GenerateRequest) -> dict[str, str]:
    """The BadRequest violations of a call that must fail with INVALID_ARGUMENT."""
    with channel(target) as ch:
        try:
            list(pb_grpc.KilnStub(ch).Generate(request, timeout=60))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            return violations(e)
    raise AssertionError("the call succeeded")


def test_img2img_and_inpainting_over_grpc(server: ServerProcess, tiny_model) -> None:  # type: ignore[no-untyped-def]
    image, mask = pattern(), right_half_mask()
    for fields, mode, steps_run in [
        ({"init_image": encode(image), "strength": 0.5}, "img2img", 4),
        ({"init_image": encode(image), "mask_image": encode(mask)}, "inpaint", 8),  # strength defaults to 1
        ({"init_image": encode(image)}, "img2img", 6),  # strength defaults to 0.8: int(8 * 0.8)
    ]:
        request = pb.GenerateRequest(model="tiny", prompt="a red circle", seed=3, steps=8, **fields)
        got = stream(server.target, request)
        started = got[0].started
        assert (started.mode, started.denoising_steps, started.steps) == (mode, steps_run, 8)
        progress = [r.progress for r in got if r.WhichOneof("event") == "progress" and r.progress.stage == "denoise"]
        assert [p.step for p in progress] == list(range(1, steps_run + 1))
        assert {p.total_steps for p in progress} == {steps_run}
        art = got[-1].artifact
        out = np.asarray(Image.open(io.BytesIO(art.data)).convert("RGB"))
        assert out.shape == (SIZE, SIZE, 3)
        assert b"Denoising strength: " in art.data
        # the same request in-process gives the same pixels
        m = tiny_model.manifest
        params = validate(request, m.defaults, m.limits, schedule=tiny_model.schedule)
        np.testing.assert_array_equal(out, Pipeline(tiny_model).run(params)[0][0])
        if mode == "inpaint":
            np.testing.assert_array_equal(out[:, : SIZE // 2], image[:, : SIZE // 2])


def test_size_comes_from_the_init_image_or_it_is_resized(server: ServerProcess) -> None:
    # no width/height: the image's size, rounded down to multiples of 8
    got = stream(server.target, pb.GenerateRequest(model="tiny", prompt="x", steps=2, init_image=encode(pattern(83, 70))))
    assert (got[0].started.width, got[0].started.height) == (80, 64)
    # width/height of the same aspect: resized
    got = stream(server.target, pb.GenerateRequest(model="tiny", prompt="x", steps=2, width=64, height=128,
                                                   init_image=encode(pattern(40, 80)),
                                                   mask_image=encode(right_half_mask(40, 80))))
    out = Image.open(io.BytesIO(got[-1].artifact.data))
    assert out.size == (64, 128)


def bomb_png(width: int, height: int) -> bytes:
    """A real 1-bit PNG of width x height whose compressed rows take a few KB: a decompression bomb."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    data = zlib.compress(row * height, 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_bad_image_input_is_refused_naming_the_field(server: ServerProcess) -> None:
    image, mask = encode(pattern()), encode(right_half_mask())
    gif = io.BytesIO()
    Image.fromarray(pattern()).save(gif, format="GIF")
    cases = [
        ({"mask_image": mask}, "mask_image", "needs init_image"),
        ({"strength": 0.5}, "strength", "only with init_image"),
        ({"init_image": image, "strength": 0.0}, "strength", "greater than 0"),
        ({"init_image": image, "strength": 1.5}, "strength", "at most 1"),
        ({"init_image": image, "strength": 0.1, "steps": 4}, "strength", "0 denoising steps"),
        ({"init_image": image, "mask_image": mask, "mask_blur": 65}, "mask_blur", "between 0 and 64"),
        ({"init_image": image, "mask_blur": 4}, "mask_blur", "only with mask_image"),
        ({"init_image": image, "mask_image": encode(right_half_mask(32, 32))}, "mask_image", "size of init_image"),
        ({"init_image": image, "width": 64, "height": 128}, "init_image", "aspect"),
        ({"init_image": encode(pattern(2000, 16))}, "init_image", "between"),
        ({"init_image": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40}, "init_image", "could not be decoded"),
        ({"init_image": image[: len(image) // 2]}, "init_image", "could not be decoded"),
        ({"init_image": gif.getvalue()}, "init_image", "not a PNG, JPEG or WebP"),
        ({"init_image": b"hello"}, "init_image", "not a PNG, JPEG or WebP"),
        ({"init_image": bomb_png(30000, 30000)}, "init_image", "pixels"),
        ({"init_image": image, "mask_image": b"\xff\xd8\xff" + b"\x00" * 20}, "mask_image", ""),
        ({"init_image": b"\x00" * (9 << 20)}, "init_image", "bytes"),
    ]
    for fields, field, words in cases:
        request = pb.GenerateRequest(model="tiny", prompt="x", steps=fields.pop("steps", 8), **fields)  # type: ignore[arg-type]
        bad = refused(server.target, request)
        assert field in bad and words in bad[field], (fields.keys(), bad)
    assert stream(server.target, pb.GenerateRequest(model="tiny", prompt="still serving", steps=1))[-1].artifact.data


def test_cost_counts_the_steps_run(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Charged by int(steps x strength), and at the init image's size when width/height are unset."""
    from model_store import BundleRef
    from runtime.pool.card import BundleCard

    card = BundleCard(BundleRef(tiny_model.path, tiny_model.manifest))
    image = encode(pattern())
    text = resolve(card, pb.GenerateRequest(model="tiny", steps=20))
    half = resolve(card, pb.GenerateRequest(model="tiny", steps=20, init_image=image, strength=0.5))
    default = resolve(card, pb.GenerateRequest(model="tiny", steps=20, init_image=image))
    big = resolve(card, pb.GenerateRequest(model="tiny", steps=10, init_image=encode(pattern(1024, 600))))
    assert text is not None and half is not None and default is not None and big is not None
    assert (text.steps, text.cost) == (20, 2)
    assert (half.steps, half.cost) == (10, 1)
    assert default.steps == 16  # 0.8 by default
    assert (big.width, big.height, big.steps, big.cost) == (1024, 600, 8, 3)


SEEDS = [encode(pattern(16, 16)), encode(pattern(16, 16), "JPEG", quality=80),
         encode(pattern(16, 16), "WEBP", quality=80), encode(np.full((16, 16), 200, np.uint8))]


def mutated(data: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    b = bytearray(data)
    for pos, bit in flips:
        b[pos % len(b)] ^= 1 << bit
    return bytes(b[: max(cut % (len(b) + 1), 1)]) if cut else bytes(b)


image_bytes = st.one_of(
    st.sampled_from(SEEDS),
    st.binary(max_size=200),
    st.builds(mutated, st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)),
                                                       max_size=4), st.integers(0, 10_000)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(init=image_bytes, mask=st.one_of(st.just(b""), image_bytes))
def test_fuzzed_images_get_invalid_argument_or_an_image(server: ServerProcess, init: bytes, mask: bytes) -> None:
    request = pb.GenerateRequest(model="tiny", prompt="fuzz", steps=2, init_image=init, mask_image=mask,
                                 width=64, height=64)
    with channel(server.target) as ch:
        try:
            got = list(pb_grpc.KilnStub(ch).Generate(request, timeout=60))
            assert got[-1].WhichOneof("event") == "artifact"
            event("generated")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            assert set(violations(e)) <= {"init_image", "mask_image"}, violations(e)
            event("refused")
        # and the server still answers
        assert pb_grpc.KilnStub(ch).ListModels(pb.ListModelsRequest(), timeout=10).models


def test_cli_img2img_and_inpainting(server: ServerProcess, tmp_path: Path) -> None:
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    init.write_bytes(encode(pattern()))
    mask.write_bytes(encode(right_half_mask()))
    out = kiln("generate", "--target", server.target, "--model", "tiny", "--prompt", "a blue square", "--steps", "6",
               "--init-image", str(init), "--strength", "0.5", "--out", str(tmp_path / "a.png"), "--quiet")
    assert out.returncode == 0, out.stderr
    assert "img2img, strength 0.5: 3 of 6 steps" in out.stdout
    out = kiln("generate", "--target", server.target, "--model", "tiny", "--prompt", "a blue square", "--steps", "4",
               "--init-image", str(init), "--mask", str(mask), "--mask-blur", "2", "--out", str(tmp_path / "b.png"),
               "--quiet")
    assert out.returncode == 0, out.stderr
    assert "inpaint, strength 1: 4 of 4 steps" in out.stdout
    result = np.asarray(Image.open(tmp_path / "b.png").convert("RGB"))
    np.testing.assert_array_equal(result[:, :20], pattern()[:, :20])
    out = kiln("generate", "--target", server.target, "--model", "tiny", "--prompt", "x", "--mask", str(mask))
    assert out.returncode == 2 and "--mask needs --init-image" in out.stderr
