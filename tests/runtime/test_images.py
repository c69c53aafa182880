"""runtime.images: real PNG/JPEG/WebP bytes made with Pillow, hostile ones included, decode to the documented
pixels or to InvalidArgument naming the field; nothing else ever comes out."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

from runtime.errors import FieldViolation, InvalidArgument
from runtime.images import (
    FORMATS,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_JPEG_SCANS,
    ImageLimits,
    decode_image,
    decode_mask,
    header_size,
    resize,
)

FIELD = "init_image"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def smooth(h: int, w: int) -> np.ndarray:
    """A gradient: lossy codecs keep it within a few levels."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], axis=2).astype(np.uint8)


def over(color: np.ndarray, alpha: np.ndarray, background: float) -> np.ndarray:
    """Straight-alpha compositing in float, the oracle for the module's integer version."""
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(color * a + background * (1 - a)).astype(np.uint8)


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """A valid PNG whose IHDR declares another size (CRC fixed, so only the size is a lie)."""
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:8] + chunk(b"IHDR", ihdr) + png[33:]


def refused(fn, data: bytes, *args: object) -> str:  # type: ignore[no-untyped-def]
    """The message of the InvalidArgument `fn` must raise, after checking that it names the field."""
    with pytest.raises(InvalidArgument) as info:
        fn(data, FIELD, *args)
    [violation] = info.value.violations
    assert violation.field == FIELD
    assert FIELD in violation.description
    return violation.description


def check_array(out: np.ndarray, shape: tuple[int, ...]) -> None:
    assert out.dtype == np.uint8 and out.shape == shape
    assert out.flags.c_contiguous and out.flags.writeable


# ---- formats round-trip


def test_png_round_trips_exactly() -> None:
    pixels = noise(7, 11, 3)
    out = decode_image(encode(Image.fromarray(pixels), "PNG"), FIELD)
    check_array(out, (7, 11, 3))
    np.testing.assert_array_equal(out, pixels)


def test_webp_lossless_round_trips_exactly() -> None:
    pixels = noise(9, 5, 3, seed=1)
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(pixels), "WEBP", lossless=True), FIELD), pixels)


@pytest.mark.parametrize(("fmt", "kw"), [("JPEG", {"quality": 95}), ("WEBP", {"quality": 95})])
def test_lossy_formats_round_trip_within_tolerance(fmt: str, kw: dict) -> None:
    pixels = smooth(48, 64)
    out = decode_image(encode(Image.fromarray(pixels), fmt, **kw), FIELD)
    check_array(out, (48, 64, 3))
    diff = np.abs(out.astype(int) - pixels)
    assert diff.mean() < 3 and diff.max() < 40, (diff.mean(), diff.max())


def test_mask_of_grey_png_is_exact_and_2d() -> None:
    grey = noise(6, 10, 1)[..., 0]
    out = decode_mask(encode(Image.fromarray(grey), "PNG"), FIELD)
    check_array(out, (6, 10))
    np.testing.assert_array_equal(out, grey)


# ---- mode conversion, image: alpha over white


def test_rgba_is_composited_over_white() -> None:
    rgba = noise(8, 8, 4, seed=2)
    rgba[0, 0] = (10, 20, 30, 0)
    rgba[0, 1] = (10, 20, 30, 255)
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), FIELD)
    np.testing.assert_array_equal(out, over(rgba[..., :3], rgba[..., 3], 255))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (10, 20, 30)


def test_rgba_webp_is_composited_over_white() -> None:
    rgba = noise(8, 8, 4, seed=3)
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True), FIELD)
    np.testing.assert_array_equal(out, over(rgba[..., :3], rgba[..., 3], 255))


def test_la_is_grey_over_white_in_three_channels() -> None:
    la = noise(5, 6, 2, seed=4)
    out = decode_image(encode(Image.fromarray(la, "LA"), "PNG"), FIELD)
    check_array(out, (5, 6, 3))
    np.testing.assert_array_equal(out, np.repeat(over(la[..., :1], la[..., 1], 255), 3, axis=2))


def test_palette_with_transparent_index_and_per_entry_alpha() -> None:
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 40, 50, 60]
    indices = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8)
    img = Image.fromarray(indices, "P")
    img.putpalette(palette)
    colors = np.array(palette, dtype=np.uint8).reshape(4, 3)

    out = decode_image(encode(img, "PNG", transparency=1), FIELD)  # index 1 fully transparent
    expected = colors[indices].copy()
    expected[indices == 1] = 255
    np.testing.assert_array_equal(out, expected)

    alphas = np.array([255, 0, 128, 64], dtype=np.uint8)
    out = decode_image(encode(img, "PNG", transparency=bytes(alphas)), FIELD)
    np.testing.assert_array_equal(out, over(colors[indices], alphas[indices], 255))


def test_opaque_palette_expands_exactly() -> None:
    img = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    img.putpalette([9, 8, 7, 200, 100, 50])
    np.testing.assert_array_equal(decode_image(encode(img, "PNG"), FIELD)[0], [[9, 8, 7], [200, 100, 50]])


def test_rgb_transparent_colour_key_becomes_white() -> None:
    rgb = noise(4, 4, 3, seed=5)
    rgb[1, 2] = (1, 2, 3)
    data = encode(Image.fromarray(rgb), "PNG", transparency=(1, 2, 3))
    out = decode_image(data, FIELD)
    assert tuple(out[1, 2]) == (255, 255, 255)
    keep = np.ones((4, 4), bool)
    keep[1, 2] = False
    np.testing.assert_array_equal(out[keep], rgb[keep])
    assert decode_mask(data, FIELD)[1, 2] == 0


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 128, 129, 257], [300, 1000, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    expected = np.array([[0, 0, 1, 1], [1, 4, 128, 255]], dtype=np.uint8)  # round(v / 257)
    np.testing.assert_array_equal(decode_image(data, FIELD), np.repeat(expected[..., None], 3, axis=2))
    np.testing.assert_array_equal(decode_mask(data, FIELD), expected)


def test_16_bit_grey_transparent_key_matches_the_16_bit_value() -> None:
    values = np.array([[300, 301], [65535, 0]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG", transparency=300)
    np.testing.assert_array_equal(decode_image(data, FIELD)[..., 0], [[255, 1], [255, 0]])
    np.testing.assert_array_equal(decode_mask(data, FIELD), [[0, 1], [255, 0]])


def test_one_bit_png_is_black_and_white() -> None:
    bits = np.array([[True, False, True], [False, False, True]])
    out = decode_image(encode(Image.fromarray(bits), "PNG"), FIELD)
    np.testing.assert_array_equal(out[..., 1], bits * 255)


def test_grey_and_cmyk_jpegs_become_rgb() -> None:
    grey = encode(Image.fromarray(smooth(16, 16)[..., 0]), "JPEG")
    out = decode_image(grey, FIELD)
    check_array(out, (16, 16, 3))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()

    cmyk = encode(Image.fromarray(noise(16, 16, 4, seed=6), "CMYK"), "JPEG")
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    np.testing.assert_array_equal(decode_image(cmyk, FIELD), np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB")))


# ---- mode conversion, mask: alpha over black, then luma


def test_mask_alpha_is_composited_over_black() -> None:
    rgba = np.array([[[255, 255, 255, 0], [255, 255, 255, 255], [255, 255, 255, 128], [0, 0, 0, 255]]], np.uint8)
    out = decode_mask(encode(Image.fromarray(rgba, "RGBA"), "PNG"), FIELD)
    check_array(out, (1, 4))
    np.testing.assert_array_equal(out, [[0, 255, 128, 0]])


def test_mask_of_colour_is_pillow_luma() -> None:
    rgb = noise(8, 8, 3, seed=7)
    out = decode_mask(encode(Image.fromarray(rgb), "PNG"), FIELD)
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(rgb).convert("L")))


def test_mask_with_transparent_palette_index_is_black_there() -> None:
    img = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    img.putpalette([255, 255, 255, 255, 255, 255])
    np.testing.assert_array_equal(decode_mask(encode(img, "PNG", transparency=0), FIELD), [[0, 255]])


# ---- EXIF orientation and animation


def oriented_jpeg(orientation: int) -> tuple[bytes, np.ndarray]:
    """A 48x32 JPEG of six flat 16x16 colour blocks, so every rotation and flip is distinguishable."""
    grid = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[255, 255, 0], [0, 255, 255], [255, 0, 255]]])
    stored = np.repeat(np.repeat(grid, 16, axis=0), 16, axis=1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(stored), "JPEG", quality=95, subsampling=0, exif=exif), stored


@pytest.mark.parametrize(("orientation", "upright"), [
    (1, lambda a: a),
    (3, lambda a: np.rot90(a, 2)),
    (6, lambda a: np.rot90(a, -1)),  # the phone was turned: rotate 90 degrees clockwise to view
    (8, lambda a: np.rot90(a, 1)),
])
def test_exif_orientation_is_applied(orientation: int, upright) -> None:  # type: ignore[no-untyped-def]
    data, stored = oriented_jpeg(orientation)
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == orientation
    out = decode_image(data, FIELD)
    expected = upright(stored)
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected).max() < 12
    np.testing.assert_array_equal(out, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))))
    assert decode_mask(data, FIELD).shape == expected.shape[:2]


@pytest.mark.parametrize(("fmt", "kw"), [("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_images_give_the_first_frame(fmt: str, kw: dict) -> None:
    frames = [Image.new("RGB", (16, 8), color) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kw)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data, FIELD)
    check_array(out, (8, 16, 3))
    assert (out == (255, 0, 0)).all()


def test_multi_picture_jpeg_gives_the_first_picture() -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=95)
    assert Image.open(io.BytesIO(data), formats=["JPEG"]).format == "MPO"
    assert np.abs(decode_image(data, FIELD).astype(int) - (255, 0, 0)).max() < 8


# ---- refusals


def test_empty_and_oversize_are_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[object] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    assert refused(decode_image, b"") == "init_image is empty"
    assert refused(decode_mask, b"") == "init_image is empty"
    big = PNG_MAGIC + bytes(MAX_IMAGE_BYTES)
    assert refused(decode_image, big) == f"init_image is {len(big)} bytes; at most {MAX_IMAGE_BYTES} bytes are allowed"
    small = encode(Image.fromarray(noise(16, 16, 3)), "PNG")
    assert "at most 100 bytes" in refused(decode_mask, small, ImageLimits(max_bytes=100))
    assert not opened
    decode_image(small, FIELD, ImageLimits(max_bytes=len(small)))
    assert opened


@pytest.mark.parametrize("data", [
    encode(Image.new("RGB", (8, 8)), "GIF"),
    encode(Image.new("RGB", (8, 8)), "BMP"),
    encode(Image.new("RGB", (8, 8)), "TIFF"),
    encode(Image.new("RGB", (16, 16)), "ICO"),
    b"a prompt, not a picture",
    np.random.default_rng(8).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
], ids=["gif", "bmp", "tiff", "ico", "text", "random"])
def test_other_formats_and_junk_are_refused(data: bytes) -> None:
    assert refused(decode_image, data) == "init_image is not a PNG, JPEG or WebP image"
    assert refused(decode_mask, data) == "init_image is not a PNG, JPEG or WebP image"


@pytest.mark.parametrize(("data", "fmt"), [(PNG_MAGIC + b"\0\0\0\rIHDR" + bytes(17), "PNG"),
                                          (b"\xff\xd8\xff\xe0" + bytes(30), "JPEG"),
                                          (b"RIFF\x20\0\0\0WEBPVP8 " + bytes(20), "WEBP")])
def test_broken_header_of_an_accepted_format_says_so(data: bytes, fmt: str) -> None:
    assert refused(decode_image, data).startswith(f"init_image could not be decoded as {fmt}: ")


@pytest.mark.parametrize(("fmt", "kw"), [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}),
                                         ("WEBP", {}), ("WEBP", {"lossless": True})])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.95])
def test_truncated_images_are_refused(fmt: str, kw: dict, keep: float) -> None:
    data = encode(Image.fromarray(noise(32, 32, 3, seed=9)), fmt, **kw)
    message = refused(decode_image, data[: int(len(data) * keep)])
    assert "could not be decoded" in message, message


def test_corrupt_png_data_is_refused() -> None:
    data = bytearray(encode(Image.fromarray(noise(16, 16, 3)), "PNG"))
    data[60] ^= 0xFF  # inside IDAT: the CRC no longer matches
    assert "could not be decoded as PNG" in refused(decode_image, bytes(data))


def test_pillow_value_errors_are_refused_too() -> None:
    """Pillow raises more than OSError on malformed files (here ValueError, from Image.open and from load)."""
    png = encode(Image.new("RGB", (4, 4)), "PNG")
    short_ihdr = png[:8] + chunk(b"IHDR", png[16:28]) + png[33:]
    assert refused(decode_image, short_ihdr) == "init_image could not be decoded as PNG: Truncated IHDR chunk"
    frames = [Image.new("RGB", (4, 4), color) for color in [(255, 0, 0), (0, 255, 0)]]
    apng = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    at = apng.index(b"fcTL") - 4
    short_fctl = apng[:at] + chunk(b"fcTL", apng[at + 8: at + 18]) + apng[at + 12 + int.from_bytes(apng[at: at + 4]):]
    assert "truncated fcTL chunk" in refused(decode_mask, short_fctl)


def png_bomb(side: int) -> bytes:
    """A real side x side 1-bit PNG of zeros: 30000 -> 112 MB of scanlines (900 M pixels, 2.7 GB as RGB)
    deflated to ~110 KB, built row by row so the test stays small."""
    z = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("side", "size"), [
    (30000, "900000000 pixels"),  # past Pillow's own guard (2 x Image.MAX_IMAGE_PIXELS): raised in Image.open
    (8192, "8192x8192 = 67108864 pixels"),  # under Pillow's guard: only the module's limit stops it
])
def test_decompression_bomb_is_refused_before_decoding(side: int, size: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = png_bomb(side)
    assert len(bomb) < 200_000
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or real_load(self))
    pillow_limit = Image.MAX_IMAGE_PIXELS
    for fn in (decode_image, decode_mask):
        message = refused(fn, bomb)
        assert message == f"init_image is {size}; at most {MAX_IMAGE_PIXELS} pixels are allowed", message
    assert not loads
    assert pillow_limit == Image.MAX_IMAGE_PIXELS  # the global guard is left alone


def test_a_lower_limit_refuses_a_larger_image() -> None:
    data = encode(Image.fromarray(noise(16, 16, 3)), "PNG")
    assert "16x16 = 256 pixels; at most 255 pixels" in refused(decode_image, data, ImageLimits(max_pixels=255))
    check_array(decode_image(data, FIELD, ImageLimits(max_pixels=256)), (16, 16, 3))


def test_pixel_limit_applies_to_the_size_as_stored() -> None:
    data, _ = oriented_jpeg(6)  # stored 48x32, shown 32x48
    assert "48x32 = 1536 pixels" in refused(decode_image, data, ImageLimits(max_pixels=1535))


def test_pillow_bomb_guard_becomes_invalid_argument() -> None:
    jpeg = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5: sof + 9] = struct.pack(">HH", 65535, 65535)  # 4.3 G pixels: Pillow raises in Image.open
    assert f"is {65535 ** 2} pixels; at most {2**40} pixels" in refused(decode_image, bytes(jpeg), ImageLimits(max_pixels=2**40))

    png = with_ihdr_size(encode(Image.new("L", (4, 4)), "PNG"), 10000, 10000)  # over Pillow's warning limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as `python -W error` would: Pillow's warning is raised in Image.open
        assert refused(decode_mask, png) == f"init_image is 100000000 pixels; at most {MAX_IMAGE_PIXELS} pixels are allowed"
    with pytest.warns(Image.DecompressionBombWarning):  # only a warning: the module's own check refuses it
        assert "is 10000x10000 = 100000000 pixels; at most" in refused(decode_mask, png)


def test_zero_sized_header_is_refused() -> None:
    png = with_ihdr_size(encode(Image.new("RGB", (4, 4)), "PNG"), 0, 4)
    refused(decode_image, png)


def progressive_with_extra_scans(extra: int) -> bytes:
    """A valid progressive JPEG whose last scan is repeated: each scan re-walks the whole image (LJT-01-003)."""
    data = encode(Image.new("RGB", (16, 16), (128, 128, 128)), "JPEG", progressive=True)
    last = data[data.rindex(b"\xff\xda"): -2]
    return data[:-2] + last * extra + data[-2:]


def test_jpeg_scan_bomb_is_refused() -> None:
    ok = progressive_with_extra_scans(0)
    check_array(decode_image(ok, FIELD), (16, 16, 3))
    scans = ok.count(b"\xff\xda")
    assert 5 < scans < 20
    assert f"has {scans} JPEG scans; at most 5" in refused(decode_image, ok, ImageLimits(max_jpeg_scans=5))
    assert f"JPEG scans; at most {MAX_JPEG_SCANS}" in refused(decode_mask, progressive_with_extra_scans(MAX_JPEG_SCANS))


def test_truncated_loading_switched_on_elsewhere_is_a_server_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), FIELD)


@pytest.mark.parametrize("field", ["max_bytes", "max_pixels", "max_jpeg_scans"])
def test_limits_are_checked(field: str) -> None:
    with pytest.raises(ValueError, match=f"ImageLimits.{field}=0 must be an integer >= 1"):
        ImageLimits(**{field: 0})


def test_formats() -> None:
    assert FORMATS == ("PNG", "JPEG", "WEBP")


# ---- header_size: the size decode_image would give, without decoding


def test_header_size_is_the_decoded_size_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb = Image.fromarray(noise(7, 11, 3))
    cases = [encode(rgb, "PNG"), encode(rgb, "WEBP"), encode(rgb, "PNG", exif=exif), encode(rgb, "WEBP", exif=exif),
             oriented_jpeg(6)[0], oriented_jpeg(3)[0]]
    expected = [decode_image(data, FIELD).shape[1::-1] for data in cases]
    assert expected == [(11, 7), (11, 7), (7, 11), (7, 11), (32, 48), (48, 32)]
    loads: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    assert [header_size(data) for data in cases] == expected
    assert not loads


def test_header_size_is_none_where_decoding_is_refused_at_the_header() -> None:
    png = encode(Image.new("RGB", (16, 16)), "PNG")
    assert header_size(png, ImageLimits(max_pixels=255)) is None
    assert header_size(png, ImageLimits(max_bytes=len(png) - 1)) is None
    for data in [b"", b"junk", encode(Image.new("RGB", (8, 8)), "GIF"), png_bomb(30000), png_bomb(8192), png[:20]]:
        assert header_size(data) is None


# ---- resize


def test_resize_to_size_and_identity() -> None:
    rgb = noise(10, 20, 3)
    out = resize(rgb, 7, 5)
    check_array(out, (5, 7, 3))
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(rgb).resize((7, 5), Image.LANCZOS)))
    assert resize(rgb, 20, 10) is rgb
    mask = rgb[..., 0].copy()
    check_array(resize(mask, 40, 30), (30, 40))
    assert resize(mask, 20, 10) is mask
    with pytest.raises(ValueError, match="uint8"):
        resize(rgb.astype(np.float32), 4, 4)
    with pytest.raises(ValueError, match="at least 1"):
        resize(rgb, 0, 4)


# ---- fuzz: hostile bytes give an array as documented or InvalidArgument naming the field, nothing else


def _seeds() -> list[bytes]:
    rgb, rgba = Image.fromarray(noise(16, 16, 3, seed=10)), Image.fromarray(noise(16, 16, 4, seed=11), "RGBA")
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0)]]
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        encode(rgb, "PNG"),
        encode(rgba, "PNG"),
        encode(rgb.convert("P"), "PNG", transparency=3),
        encode(Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 200), "PNG"),
        encode(rgb.convert("LA"), "PNG"),
        encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        encode(rgb, "JPEG", exif=exif),
        encode(rgb, "JPEG", progressive=True),
        encode(rgb.convert("CMYK"), "JPEG"),
        encode(rgb, "WEBP"),
        encode(rgba, "WEBP", lossless=True),
        encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
    ]


SEEDS = _seeds()
FUZZ_LIMITS = ImageLimits(max_pixels=256 * 256)  # mutated headers may claim big sizes: keep the fuzz fast
_AT = st.integers(0, 1 << 16)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), _AT, st.integers(0, 7)),
    st.tuples(st.just("truncate"), _AT),
    st.tuples(st.just("insert"), _AT, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("overwrite"), _AT, st.binary(min_size=1, max_size=8)),
)


def fix_png_crcs(data: bytearray) -> bytearray:
    """Recompute every chunk CRC, so mutations reach the decoders instead of stopping at the checksum."""
    i = 8
    while i + 12 <= len(data):
        end = i + 8 + int.from_bytes(data[i: i + 4], "big")
        if end + 4 > len(data):
            break
        data[end: end + 4] = struct.pack(">I", zlib.crc32(data[i + 4: end]))
        i = end + 4
    return data


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 7)) == 0:
        magic = draw(st.sampled_from([b"", PNG_MAGIC, b"\xff\xd8\xff", b"RIFF\x20\0\0\0WEBPVP8 "]))
        return magic + draw(st.binary(max_size=256))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for op in draw(st.lists(MUTATION, min_size=1, max_size=5)):
        at = op[1] % (len(data) + 1)
        if op[0] == "flip" and at < len(data):
            data[at] ^= 1 << op[2]
        elif op[0] == "truncate":
            del data[at:]
        elif op[0] == "insert":
            data[at:at] = op[2]
        elif op[0] == "overwrite":
            data[at: at + len(op[2])] = op[2]
    if data.startswith(PNG_MAGIC) and draw(st.booleans()):
        fix_png_crcs(data)
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about corrupt EXIF/MPO data, then goes on
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile_bytes())
def test_fuzz_only_arrays_or_invalid_argument(data: bytes) -> None:
    for fn, ndim in ((decode_image, 3), (decode_mask, 2)):
        try:
            out = fn(data, FIELD, FUZZ_LIMITS)
        except InvalidArgument as e:
            assert e.violations == [FieldViolation(FIELD, str(e))]
            assert FIELD in str(e)
            continue
        assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == ndim
        assert out.flags.c_contiguous and 1 <= out.shape[0] * out.shape[1] <= FUZZ_LIMITS.max_pixels
        assert ndim == 2 or out.shape[2] == 3
        assert header_size(data, FUZZ_LIMITS) == (out.shape[1], out.shape[0])
    size = header_size(data, FUZZ_LIMITS)  # never raises
    assert size is None or (isinstance(size, tuple) and len(size) == 2)


def test_fuzz_seeds_all_decode() -> None:
    """The fuzz starts from valid files of every kind, so its mutations probe the decoders, not just the gate."""
    for data in SEEDS:
        assert decode_image(data, FIELD).shape[:2] == decode_mask(data, FIELD).shape
