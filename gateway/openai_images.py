"""OpenAI's Images API over Kiln, for chat front-ends and the OpenAI SDKs: `POST /v1/images/generations` (JSON)
and `POST /v1/images/edits` (multipart; OpenAI's mask, transparent = edit, becomes Kiln's white = redraw mask),
both answered as OpenAI's ImagesResponse. `response_format=url` images are kept in the gateway's memory
(gateway/image_store.py) and served at `GET /v1/images/files/{id}.png`. Refusals come in OpenAI's error shape
(gateway/app.py), with `param` naming OpenAI's field; statuses are the gateway's (422 for a bad field)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.context import Caller, CallerDep, Gateway, gateway
from gateway.errors import ApiError, bad_request, from_validation, passed_headers
from gateway.images import open_image, png_bytes
from gateway.jobs import run
from proto.kiln.v1 import kiln_pb2 as pb

router = APIRouter(prefix="/v1/images", tags=["openai"])

FIELD_NAMES = {"num_images": "n", "init_image": "image", "mask_image": "mask", "width": "size", "height": "size"}
"""Kiln's GenerateRequest fields -> OpenAI's, for the errors the gRPC server sends back."""
OPENAI_MODEL_PREFIXES = ("dall-e", "gpt-image", "chatgpt-image")
"""OpenAI's image model names: a request naming one (and no Kiln model of that name) gets the server's first
model, so clients hard-wired to OpenAI's names work unchanged."""
B64_ONLY_PREFIXES = ("gpt-image", "chatgpt-image")
"""OpenAI's GPT image models always answer `b64_json`; a request naming one without `response_format` too."""
UINT32 = 1 << 32
MAX_UPLOADS = 20
"""File parts one edit request may carry (OpenAI's newer models take up to 16 images; Kiln edits one)."""
_KILN_WORDS = re.compile(r"\b(num_images|init_image|mask_image)\b")


class ImageRequest(BaseModel):
    """The fields Kiln reads; OpenAI's others (quality, style, user, background, output_format, ...) and any
    unknown field are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    """What to draw (the gRPC server checks its length)."""
    model: str | None = None
    """A Kiln model name; unset or an OpenAI name (dall-e-*, gpt-image-*): the server's first model."""
    n: int | None = None
    """Images to make, 1..the model's max_images; unset: 1."""
    size: str | None = None
    """`WIDTHxHEIGHT`; unset or `auto`: the model's default (edits: the image's size)."""
    response_format: Literal["url", "b64_json"] | None = None
    """Unset: `url`, or `b64_json` for a GPT image model name (as OpenAI answers)."""
    stream: bool | None = None
    """Streaming (partial images) is not offered: `true` is refused."""
    negative_prompt: str | None = None
    """Kiln's extension: text to steer away from."""
    seed: int | None = None
    """Kiln's extension: the seed of the first image (image k uses seed + k); unset: random."""


class EditRequest(ImageRequest):
    strength: float | None = None
    """Kiln's extension: how much of the image to redraw, 0 < strength <= 1; unset: 1.0 where there is an edit
    area (inpainting), 0.8 without one (img2img)."""


# ---- routes ----------------------------------------------------------------------------------------------------

@router.post("/generations", summary="OpenAI: create images from a prompt")
async def generations(request: Request, req: ImageRequest, who: CallerDep) -> JSONResponse:
    gw = gateway(request)
    model = await _model(gw, who, req.model)
    message = _generate_request(req, model)
    message.width, message.height = _size(req.size)
    return await _answer(request, gw, who, req, message)


EDIT_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary",
                  "description": "PNG, JPEG or WebP. Without a mask, its fully transparent pixels are the edit area; "
                                 "with none, the whole image is redrawn (img2img)."},
        "mask": {"type": "string", "format": "binary",
                 "description": "A PNG with alpha, the image's size: fully transparent pixels = where to edit."},
        "prompt": {"type": "string"}, "n": {"type": "integer"}, "size": {"type": "string"},
        "response_format": {"type": "string", "enum": ["url", "b64_json"]}, "model": {"type": "string"},
        "negative_prompt": {"type": "string"}, "seed": {"type": "integer"}, "strength": {"type": "number"},
    }}}}}}


@router.post("/edits", summary="OpenAI: edit an image (inpainting through an alpha mask, or img2img)",
             openapi_extra=EDIT_FORM)
async def edits(request: Request, who: CallerDep) -> JSONResponse:
    gw = gateway(request)
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "INVALID_ARGUMENT", "/v1/images/edits takes multipart/form-data (image and mask as file "
                                                f"parts), not {content_type[:60] or 'a body without a content type'}")
    try:
        form = await request.form(max_files=MAX_UPLOADS, max_fields=64)
    except StarletteHTTPException as e:  # python-multipart's refusal of a malformed or oversized body
        raise ApiError(422, "INVALID_ARGUMENT", f"malformed multipart/form-data body: {e.detail}") from None
    try:
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        try:
            req = EditRequest.model_validate(fields)
        except ValidationError as e:
            raise from_validation(e.errors()) from None  # type: ignore[arg-type]
        uploads = [v for k, v in form.multi_items() if k in ("image", "image[]")]
        if not uploads:
            raise bad_request("image", "image is required: the picture to edit, as a file part")
        if len(uploads) > 1:
            raise bad_request("image", f"Kiln edits one image per request; this one has {len(uploads)}")
        image = await _file(uploads[0], "image")
        mask = await _file(form["mask"], "mask") if "mask" in form else None
    finally:
        await form.close()
    model = await _model(gw, who, req.model)
    message = _generate_request(req, model)
    message.width, message.height = _size(req.size)
    message.init_image = image
    message.mask_image = await asyncio.to_thread(edit_mask, image, mask)  # decoding: off the event loop
    if req.strength is not None:
        message.strength = req.strength
    return await _answer(request, gw, who, req, message)


@router.get("/files/{image_id}.png", name="openai_image_file", summary="An image a `url` answer points at",
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
async def image_file(request: Request, image_id: str) -> Response:
    """No credentials: the unguessable id is the capability, as OpenAI's signed URLs are."""
    gw = gateway(request)
    data = gw.images.get(image_id)
    if data is None:
        raise ApiError(404, "NOT_FOUND", f"image {image_id[:40]!r} is not here: it expired (URLs last "
                                         f"{gw.config.image_url_ttl_s:g} s), was pushed out of the gateway's image "
                                         "store by newer images, or never existed", reason="image_expired")
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


# ---- request translation ---------------------------------------------------------------------------------------

async def _model(gw: Gateway, who: Caller, wanted: str | None) -> str:
    """A Kiln model name is sent as it is (the server refuses one it does not serve); unset or an OpenAI name
    is the server's first model."""
    if wanted and not wanted.lower().startswith(OPENAI_MODEL_PREFIXES):
        return wanted
    return await gw.default_model(who)


def _size(size: str | None) -> tuple[int, int]:
    """`WIDTHxHEIGHT` -> (width, height); unset, "" or `auto` -> (0, 0), the model's default. The gRPC server
    checks the range and the multiple of 8."""
    if size is None or size.strip().lower() in ("", "auto"):
        return 0, 0
    m = re.fullmatch(r"\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*", size)
    if not m or not int(m[1]) or not int(m[2]):
        raise bad_request("size", f"size={size[:40]!r} must be WIDTHxHEIGHT in pixels (e.g. '512x512') or 'auto'")
    return int(m[1]), int(m[2])


def _generate_request(req: ImageRequest, model: str) -> pb.GenerateRequest:
    if req.stream:
        raise bad_request("stream", "stream=true (partial images) is not offered here; leave stream unset or false")
    n = 1 if req.n is None else req.n
    if not 1 <= n < UINT32:  # 0 would mean 1 to the server; its own limit (the model's max_images) comes back as n
        raise bad_request("n", f"n={n} must be between 1 and the model's max_images")
    message = pb.GenerateRequest(model=model, prompt=req.prompt, negative_prompt=req.negative_prompt or "",
                                 num_images=n)
    if req.seed is not None:
        if not 0 <= req.seed < UINT32:
            raise bad_request("seed", f"seed={req.seed} must be between 0 and {UINT32 - 1}")
        message.seed = req.seed
    return message


async def _file(part: str | UploadFile, field: str) -> bytes:
    if not isinstance(part, UploadFile):
        raise bad_request(field, f"{field} must be a file part (multipart/form-data with a filename), not a text "
                                 "field")
    data = await part.read()
    if not data:
        raise bad_request(field, f"{field} is empty")
    return data


def _alpha(image: Image.Image, field: str) -> Image.Image | None:
    """The upright alpha channel ("L"), or None when the image has no transparency."""
    if image.format == "JPEG" or ("A" not in image.getbands() and "transparency" not in image.info):
        return None
    try:
        image.load()
        with contextlib.suppress(Exception):  # unreadable EXIF: pixels as stored, as the gRPC server does
            image = ImageOps.exif_transpose(image)
        return image.convert("RGBA").getchannel("A")
    except Exception as e:
        raise bad_request(field, f"{field} could not be decoded ({' '.join(str(e).split())[:80]})") from None


def edit_mask(image: bytes, mask: bytes | None) -> bytes:
    """OpenAI's convention -> Kiln's mask_image: a black PNG, white where the mask (or, without one, the image)
    is fully transparent (alpha 0). b"" (img2img) when there is no mask and the image has no such pixel."""
    source, field = (mask, "mask") if mask is not None else (image, "image")
    alpha = _alpha(open_image(source, field, load=False), field)
    if alpha is None:
        if mask is not None:
            raise bad_request("mask", "mask has no alpha channel; its fully transparent pixels (alpha 0) mark where "
                                      "to edit, so it must be a PNG or WebP with alpha")
        return b""
    edit = alpha.point(lambda a: 255 if a == 0 else 0)
    if edit.getextrema()[1] == 0:
        if mask is not None:
            raise bad_request("mask", "mask has no fully transparent pixel (alpha 0), so nothing would be edited")
        return b""
    return png_bytes(edit)


def openai_fields(e: ApiError) -> ApiError:
    """A gRPC refusal with Kiln's field names -> OpenAI's: `param` (n, size, image, mask) and the text."""
    sized = [("size", d) if f in ("width", "height") else (f, d) for f, d in e.violations]
    e.violations = sized
    e.renamed(FIELD_NAMES)
    if e.violations:
        e.violations = [(f, _KILN_WORDS.sub(lambda m: FIELD_NAMES[m[0]], d).replace(
            "leave width and height at 0", "leave size unset or 'auto'")) for f, d in e.violations]
        e.message = "; ".join(d for _, d in e.violations)
    return e


# ---- generation and answer -------------------------------------------------------------------------------------

async def _answer(request: Request, gw: Gateway, who: Caller, req: ImageRequest,
                  message: pb.GenerateRequest) -> JSONResponse:
    gw.progress_for(who.client, message)
    fmt = req.response_format or ("b64_json" if (req.model or "").lower().startswith(B64_ONLY_PREFIXES) else "url")
    with gw.jobs.track(who.client) as job:
        try:
            result = await run(gw.upstream, job, message, who.metadata(), gateway_previews=True)
        except ApiError as e:
            if e.unknown_model:
                e.reason = "model_not_found"
                e.message += " (an OpenAI model name such as dall-e-2 or gpt-image-1 means the first of them)"
            raise openai_fields(e) from None
    artifacts = sorted(result.artifacts, key=lambda a: a.index)
    if not artifacts:
        raise ApiError(499, "CANCELLED", "the generation was interrupted (/sdapi/v1/interrupt or /v1/interrupt) "
                                         "before any image was made")
    data: list[dict[str, Any]]
    if fmt == "url":
        if not gw.images.fits([len(a.data) for a in artifacts]):
            raise ApiError(507, "RESOURCE_EXHAUSTED", f"these {len(artifacts)} images do not fit the gateway's image "
                                                      f"store ({gw.config.image_store_bytes} bytes); ask for "
                                                      "response_format=b64_json", [("response_format", "too large")])
        data = [{"url": str(request.url_for("openai_image_file", image_id=gw.images.put(a.data))),
                 "revised_prompt": req.prompt} for a in artifacts]
    else:
        data = [{"b64_json": base64.b64encode(a.data).decode(), "revised_prompt": req.prompt} for a in artifacts]
    started = result.started
    body = {"created": int(time.time()), "data": data, "output_format": "png",
            "size": f"{started.width}x{started.height}"}
    headers = passed_headers(result.metadata)
    return JSONResponse(body, headers=headers)
