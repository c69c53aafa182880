"""Client-sent images (img2img init image, inpainting mask) -> pixels: the only place request bytes are decoded.

Rules, in the order they are applied; every refusal is InvalidArgument([FieldViolation(field, message)]) with
the field named in the message:

1. Empty data is refused ("init_image is empty"); more than `max_bytes` is refused before any parsing.
2. Only PNG, JPEG and WebP are accepted, identified from the bytes, never from a name or a client-sent type.
   Anything else (GIF, BMP, TIFF, text, random bytes) "is not a PNG, JPEG or WebP image".
3. Decompression bombs are refused before decoding: the size is read from the header and width*height must
   be at most `max_pixels` (the size as stored, before EXIF rotation), width and height at least 1. A JPEG
   may have at most `max_jpeg_scans` start-of-scan markers: every progressive scan re-walks the whole image,
   so a small file with thousands of scans is a CPU bomb (libjpeg-turbo's "LJT-01-003"). Pillow's own bomb
   guard (`Image.MAX_IMAGE_PIXELS`, left as it is) is reported as the same InvalidArgument.
4. The image is then decoded in full; corrupt or truncated data "could not be decoded as PNG: <reason>"
   (the format named when the bytes claim one; data that claims one with a broken header also). Truncated
   images are never completed with grey: decoding refuses to run at all (RuntimeError, a server bug) if
   something in the process has set `PIL.ImageFile.LOAD_TRUNCATED_IMAGES`.
5. Animated images (APNG, animated WebP): the first frame only.
6. EXIF orientation is applied, so a phone photo comes out upright; unreadable EXIF is ignored, as browsers
   do, since it is metadata and not pixels.
7. decode_image -> uint8 [H, W, 3] RGB: palettes are expanded (keeping their transparency), alpha (an alpha
   channel or a PNG transparent colour) is composited over WHITE, 16-bit grey is scaled to 8 bits (value/257,
   rounded; 32-bit and float grey are clipped to 0..65535 first), grey is repeated into R, G and B, CMYK and
   YCbCr go through Pillow's convert.
8. decode_mask -> uint8 [H, W] grey, 0..255, not binarised: the same, except alpha is composited over BLACK
   (transparent = 0 = keep; white = repaint) and colour becomes 8-bit luma as Pillow's convert("L") computes
   it (ITU-R 601-2).
9. Results are C-contiguous, writable numpy arrays. MemoryError is never reported as the client's fault.

header_size() reads the size decode_image would return from the header alone (rules 1-3, EXIF orientation
when the header holds it), for pricing a request before it is validated.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from runtime.errors import FieldViolation, InvalidArgument

MAX_IMAGE_BYTES = 8 << 20
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_JPEG_SCANS = 100
FORMATS = ("PNG", "JPEG", "WEBP")

_MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}
_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                Image.Transpose.ROTATE_90)


@dataclass(frozen=True)
class ImageLimits:
    """What one client-sent image may cost to decode."""

    max_bytes: int = MAX_IMAGE_BYTES
    """Encoded size in bytes; checked before any parsing."""
    max_pixels: int = MAX_IMAGE_PIXELS
    """Decoded width*height as stored (before EXIF rotation); checked from the header before decoding."""
    max_jpeg_scans: int = MAX_JPEG_SCANS
    """Start-of-scan markers in a JPEG (a progressive JPEG has about 10); bounds decoding time."""

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_jpeg_scans"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageLimits.{name}={value!r} must be an integer >= 1")


def decode_image(data: bytes, field: str, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """uint8 [H, W, 3] RGB. Raises runtime.errors.InvalidArgument([FieldViolation(field, message)])."""
    color, alpha = _decode(data, field, limits)
    if alpha is not None:
        color = _over(color, alpha, 255)
    if color.shape[2] == 1:
        color = np.repeat(color, 3, axis=2)
    return np.require(color, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])


def decode_mask(data: bytes, field: str, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """uint8 [H, W] grayscale (0..255, not yet binarised). Same errors."""
    color, alpha = _decode(data, field, limits)
    if alpha is not None:
        color = _over(color, alpha, 0)
    grey = color[..., 0] if color.shape[2] == 1 else np.asarray(Image.fromarray(color, "RGB").convert("L"))
    return np.array(grey, dtype=np.uint8, order="C")


def resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resize (PIL Image.LANCZOS) of a uint8 [H,W,3] or [H,W] array to width x height; unchanged (same
    array) when already that size."""
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"pixels must be uint8 [H, W, 3] or [H, W], got {pixels.dtype} {list(pixels.shape)}")
    if width < 1 or height < 1:
        raise ValueError(f"resize to {width}x{height}: width and height must be at least 1")
    if pixels.shape[:2] == (height, width):
        return pixels
    img = Image.fromarray(np.ascontiguousarray(pixels), "RGB" if pixels.ndim == 3 else "L")
    return np.array(img.resize((width, height), Image.Resampling.LANCZOS), dtype=np.uint8, order="C")


def header_size(data: bytes, limits: ImageLimits = ImageLimits()) -> tuple[int, int] | None:
    """(width, height) that decode_image would return, read from the header without decoding a pixel; None
    for anything decode_image is sure to refuse at the header (empty, too many bytes, not PNG/JPEG/WebP, too
    many pixels). Never raises for bad data. EXIF orientation is applied when the header holds the EXIF (JPEG,
    WebP, PNG with eXIf before the image data); decode_image may still refuse the image later."""
    try:
        with _open(data, "image", limits) as img:
            width, height = img.size
            # PngImageFile.getexif() decodes the image when the EXIF is not in the header: only ask when it is
            if img.format != "PNG" or "exif" in img.info:
                with contextlib.suppress(Exception):
                    if _TRANSPOSE.get(img.getexif().get(ExifTags.Base.Orientation, 1)) in _SWAPS_SIDES:
                        width, height = height, width
            return width, height
    except InvalidArgument:
        return None


def _refuse(field: str, message: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, message)])


@contextlib.contextmanager
def _pillow_errors(field: str, limit: int, fmt: str = "") -> Iterator[None]:
    """Whatever Pillow raises on hostile bytes becomes InvalidArgument; MemoryError and BaseException stay."""
    try:
        yield
    except (InvalidArgument, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own guard fired inside Image.open, before ours could run; it names only the pixel count
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{found[1]} pixels" if found else "too large"
        raise _refuse(field, f"{field} is {size}; at most {limit} pixels are allowed") from e
    except Exception as e:
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise _refuse(field, f"{field} could not be decoded{' as ' + fmt if fmt else ''}: {reason}") from e


def _looks_like(data: bytes) -> str:
    """The accepted format the magic bytes claim, for a clearer message when Pillow cannot open it."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for fmt, magic in _MAGIC.items() if data.startswith(magic)), "")


def _decode(data: bytes, field: str, limits: ImageLimits) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (colour uint8 [H, W, 1 or 3], alpha uint8 [H, W] or None), upright, first frame."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; runtime.images "
                           "refuses to decode client images with it (truncated images would be accepted)")
    with _open(data, field, limits) as img:
        if img.format in ("JPEG", "MPO"):
            # Rule 3's scan count. An upper bound on the scans libjpeg will run: entropy-coded data never holds FF DA (0xFF bytes
            # are stuffed with 0x00), so only markers and metadata payloads can; counting every pair cannot
            # be dodged by a crafted marker layout.
            scans = data.count(b"\xff\xda")
            if scans > limits.max_jpeg_scans:
                raise _refuse(field, f"{field} has {scans} JPEG scans; at most {limits.max_jpeg_scans} are "
                                     "allowed")
        # rule 4: decode the first frame in full, then upright it
        with _pillow_errors(field, limits.max_pixels, _format(img)):
            img.load()
            return _planes(_upright(img))
    raise AssertionError("unreachable")  # for type checkers: the with-block returns or raises


def _format(img: Image.Image) -> str:
    return "JPEG" if img.format == "MPO" else str(img.format)  # a multi-picture JPEG (first picture decoded)


def _open(data: bytes, field: str, limits: ImageLimits) -> Image.Image:
    """Rules 1-3 (without the scan count): identify from the header only (WebP's demuxer indexes the chunks
    but allocates lazily) and check the bounds before a single pixel is decoded."""
    size = len(data)
    if size == 0:
        raise _refuse(field, f"{field} is empty")
    if size > limits.max_bytes:
        raise _refuse(field, f"{field} is {size} bytes; at most {limits.max_bytes} bytes are allowed")
    claimed = _looks_like(data)
    with _pillow_errors(field, limits.max_pixels, claimed):
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError as e:
            message = (f"{field} could not be decoded as {claimed}: its {claimed} header is invalid" if claimed
                       else f"{field} is not a PNG, JPEG or WebP image")
            raise _refuse(field, message) from e
    try:
        if _format(img) not in FORMATS:
            raise _refuse(field, f"{field} is not a PNG, JPEG or WebP image")
        width, height = img.size
        if width < 1 or height < 1:
            raise _refuse(field, f"{field} is {width}x{height}; width and height must be at least 1")
        if width * height > limits.max_pixels:
            raise _refuse(field, f"{field} is {width}x{height} = {width * height} pixels; at most "
                                 f"{limits.max_pixels} pixels are allowed")
    except BaseException:
        img.close()
        raise
    return img


def _upright(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation (the table of ImageOps.exif_transpose, without rewriting the metadata)."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return img  # unreadable EXIF: pixels as stored
    method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return img if method is None else img.transpose(method)


def _planes(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """A decoded image -> (colour uint8 [H, W, 1 or 3], alpha uint8 [H, W] or None)."""
    key = img.info.get("transparency")
    if img.mode in _WIDE_GREY:
        raw = np.asarray(img)
        return _to_8bit(raw)[..., None], _color_key(raw[..., None], key)
    if img.mode == "1":
        grey = np.asarray(img).astype(np.uint8) * 255
        return grey[..., None], _color_key(grey[..., None], key)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # applies the palette's transparency
    elif img.mode not in ("L", "LA", "RGB", "RGBA"):
        has_alpha = "A" in img.getbands() or "a" in img.getbands()
        img = img.convert("RGBA" if has_alpha else "RGB")  # CMYK, YCbCr, premultiplied RGBa/La, ...
    arr = np.asarray(img)
    if img.mode == "L":
        return arr[..., None], _color_key(arr[..., None], key)
    if img.mode == "RGB":
        return arr, _color_key(arr, key)
    colors = 1 if img.mode == "LA" else 3
    alpha = arr[..., colors]
    return arr[..., :colors], (None if alpha.min() == 255 else alpha)


def _to_8bit(raw: np.ndarray) -> np.ndarray:
    """16-bit grey (I;16, or 32-bit I/F holding 16-bit values as PNG gives them) -> 8 bits: value/257, rounded."""
    if raw.dtype.kind == "f":
        raw = np.rint(np.nan_to_num(raw.astype(np.float64), nan=0.0))
    wide = np.clip(raw, 0, 65535).astype(np.uint32)
    return ((wide + 128) // 257).astype(np.uint8)


def _color_key(arr: np.ndarray, key: object) -> np.ndarray | None:
    """PNG tRNS colour key (one value per channel, in the decoded bit depth) -> alpha, or None if unused."""
    if isinstance(key, int):
        key = (key,)
    if not (isinstance(key, tuple) and len(key) == arr.shape[2] and all(isinstance(k, int) for k in key)):
        return None
    transparent = np.all(arr == np.array(key, dtype=np.int64), axis=2)
    return np.where(transparent, 0, 255).astype(np.uint8) if transparent.any() else None


def _over(color: np.ndarray, alpha: np.ndarray, background: int) -> np.ndarray:
    """Composite straight-alpha colour over a flat grey level (0 black, 255 white), rounded to nearest."""
    a = alpha[..., None].astype(np.uint16)
    mixed = color.astype(np.uint16) * a + np.uint16(background) * (255 - a) + 127
    return (mixed // 255).astype(np.uint8)
