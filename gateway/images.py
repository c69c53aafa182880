"""Images in HTTP bodies: strict base64 (a `data:` URL prefix accepted), and the few Pillow operations the
gateway does itself (AUTOMATIC1111's stretch-to-size and mask inversion). Decoding and checking images for
generation is the gRPC server's job; these refuse only what the gateway must read."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from gateway.errors import bad_request

MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest image the gateway opens (the server's own limit)."""


def decode_base64(value: object, field: str) -> bytes:
    """base64 (optionally a `data:image/...;base64,` URL) -> bytes; 422 naming the field when it is not."""
    if not isinstance(value, str) or not value:
        raise bad_request(field, f"{field} must be a non-empty base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    value = value.strip()
    try:  # standard or URL-safe alphabet (proto JSON writes bytes either way)
        return base64.b64decode(value, altchars=b"-_" if "-" in value or "_" in value else None, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(field, f"{field} is not valid base64 ({len(value)} characters)") from None


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
"""What the gRPC server decodes, and so all the gateway opens."""


def open_image(data: bytes, field: str, load: bool = True) -> Image.Image:
    """The image (pixels decoded unless `load=False`: then only the header is checked), or 422 naming the field:
    not PNG, JPEG or WebP, unreadable, or over MAX_IMAGE_PIXELS."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise bad_request(field, f"{field} is {image.width}x{image.height}; at most {MAX_IMAGE_PIXELS} pixels "
                                     "are allowed")
        if load:
            image.load()
        return image
    except UnidentifiedImageError:
        raise bad_request(field, f"{field} is not a PNG, JPEG or WebP image") from None
    except (OSError, Image.DecompressionBombError, ValueError, SyntaxError) as e:  # broken headers and data
        raise bad_request(field, f"{field} could not be read as PNG, JPEG or WebP "
                                 f"({' '.join(str(e).split())[:80]})") from None


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
