"""`/sdapi/v1/*`: AUTOMATIC1111's routes, each turned into Kiln gRPC calls. Fields a request leaves out take the
model's defaults; fields Kiln has no use for are accepted and ignored; refusals name AUTOMATIC1111's fields."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response
from PIL import Image, ImageOps

from gateway import jsoncheck
from gateway.a1111 import infotext, samplers
from gateway.a1111.models import (
    GenerationResponse,
    Img2Img,
    PngInfo,
    PngInfoRequest,
    Progress,
    ProgressState,
    SamplerItem,
    SDModelItem,
    Txt2Img,
)
from gateway.context import Caller, CallerDep, Gateway, gateway
from gateway.errors import ApiError, bad_request, no_models, passed_headers, rpc_errors
from gateway.images import decode_base64, open_image, png_bytes
from gateway.jobs import run
from proto.kiln.v1 import kiln_pb2 as pb

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])

FIELD_NAMES = {"guidance_scale": "cfg_scale", "sampler": "sampler_name", "num_images": "batch_size",
               "init_image": "init_images[0]", "mask_image": "mask", "strength": "denoising_strength",
               "model": "sd_model_checkpoint"}
"""Kiln's GenerateRequest fields -> AUTOMATIC1111's, for the errors the gRPC server sends back."""

MAX_N_ITER = 100
UINT32 = 1 << 32
"""The gRPC request's integer fields are uint32: larger values are refused here, naming the field."""
A1111_IMG2IMG_STRENGTH = 0.75
A1111_MASK_BLUR = 4
EXIF_ORIENTATION = 0x0112


# ---- model choice ----------------------------------------------------------------------------------------------

async def _models(gw: Gateway, who: Caller) -> list[pb.ModelInfo]:
    with rpc_errors():
        return list((await gw.upstream.list_models(who.key)).models)


def _checkpoint_name(title: str) -> str:
    """`name [hash]` (an AUTOMATIC1111 title) -> `name`."""
    title = title.strip()
    return title.rsplit(" [", 1)[0] if title.endswith("]") and " [" in title else title


def _pick(models: list[pb.ModelInfo], wanted: str, field: str) -> pb.ModelInfo:
    if not models:
        raise no_models()
    if not wanted:
        return models[0]
    name = _checkpoint_name(wanted)
    for m in models:
        if name in (m.name, f"{m.name}.safetensors"):
            return m
    raise bad_request(field, f"{field}={wanted[:60]!r} is not served here; available: "
                             f"{', '.join(m.name for m in models)}")


async def _model_for(gw: Gateway, who: Caller, req: Txt2Img) -> tuple[str, str]:
    """(model name, the field that named it). A model the request or the client's options name is sent as it
    is (the server refuses an unknown one); only a request naming none needs the server's list."""
    override = (req.override_settings or {}).get("sd_model_checkpoint")
    if override is not None and not isinstance(override, str):
        raise bad_request("override_settings.sd_model_checkpoint", "sd_model_checkpoint must be a string")
    if override:
        return _checkpoint_name(override).removesuffix(".safetensors"), "override_settings.sd_model_checkpoint"
    chosen = gw.checkpoints.get(who.client)
    if chosen:
        return chosen, "sd_model_checkpoint"
    return await gw.default_model(who), "sd_model_checkpoint"


def _model_item(m: pb.ModelInfo) -> SDModelItem:
    return SDModelItem(title=m.name, model_name=m.name, hash=m.version[:10] or None, sha256=m.version or None,
                       filename=m.name, config=None)


# ---- request translation ---------------------------------------------------------------------------------------

def _images(req: Img2Img) -> tuple[bytes, bytes, tuple[int, int] | None]:
    """(init image, mask, the size AUTOMATIC1111 resized to or None). AUTOMATIC1111 stretches the init image to
    width x height ("Just resize"); Kiln only resizes within 1% of the aspect ratio, so the gateway stretches
    when the aspect differs, and inverts the mask for `inpainting_mask_invert`."""
    if not req.init_images:
        raise bad_request("init_images", "img2img needs init_images: a list with one base64 image")
    init = decode_base64(req.init_images[0], "init_images[0]")
    mask = decode_base64(req.mask, "mask") if req.mask else b""
    target = (req.width, req.height) if req.width and req.height else None
    stretch = None
    if target:
        image = open_image(init, "init_images[0]", load=False)  # the header says the size: pixels only to stretch
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # upright, as the server reads it: turned 90°
            width, height = height, width
        if abs(width / height - target[0] / target[1]) > 0.01 * target[0] / target[1]:
            stretch = target
            image = open_image(init, "init_images[0]")
            init = png_bytes(ImageOps.exif_transpose(image).resize(target, Image.Resampling.LANCZOS))
    if mask and (stretch or req.inpainting_mask_invert):
        m = ImageOps.exif_transpose(open_image(mask, "mask")).convert("L")
        if stretch:
            m = m.resize(stretch, Image.Resampling.LANCZOS)
        if req.inpainting_mask_invert:
            m = ImageOps.invert(m)
        mask = png_bytes(m)
    return init, mask, stretch


def _grpc_request(req: Txt2Img, model: str) -> pb.GenerateRequest:
    if not 0 <= req.seed < UINT32 and req.seed != -1:
        raise bad_request("seed", f"seed={req.seed} must be -1 (random) or between 0 and {UINT32 - 1}")
    for name in ("width", "height", "steps"):  # the server checks the model's limits; past uint32 the message can't
        value = getattr(req, name)
        if value is not None and not 0 <= value < UINT32:
            raise bad_request(name, f"{name}={value} must be 0 (the model's default) or more, below {UINT32}")
    if not 1 <= req.batch_size < UINT32:
        raise bad_request("batch_size", f"batch_size={req.batch_size} must be at least 1 (and below {UINT32})")
    if not 1 <= req.n_iter <= MAX_N_ITER:
        raise bad_request("n_iter", f"n_iter={req.n_iter} must be between 1 and {MAX_N_ITER}")
    sampler = samplers.to_kiln(req.sampler_name or req.sampler_index, req.scheduler,
                               "sampler_name" if req.sampler_name else "sampler_index")
    message = pb.GenerateRequest(
        model=model, prompt=req.prompt, negative_prompt=req.negative_prompt, width=req.width or 0,
        height=req.height or 0, steps=req.steps or 0, sampler=sampler, num_images=req.batch_size)
    if req.cfg_scale is not None:
        message.guidance_scale = req.cfg_scale
    if req.guidance_end is not None:
        message.guidance_end = req.guidance_end
    if req.seed != -1:
        message.seed = req.seed
    return message


def _img2img_fields(req: Img2Img, message: pb.GenerateRequest) -> None:
    if req.mask_blur is not None and not 0 <= req.mask_blur <= 64:
        raise bad_request("mask_blur", f"mask_blur={req.mask_blur} must be between 0 and 64")
    init, mask, stretched = _images(req)
    message.init_image, message.mask_image = init, mask
    message.strength = req.denoising_strength if req.denoising_strength is not None else A1111_IMG2IMG_STRENGTH
    message.mask_blur = (req.mask_blur if req.mask_blur is not None else A1111_MASK_BLUR) if mask else 0
    if stretched:
        message.width, message.height = stretched


# ---- generation ------------------------------------------------------------------------------------------------

def _model_not_found(e: ApiError, field: str) -> ApiError | None:
    """The server's NOT_FOUND for the model, as the 422 naming the setting that chose it."""
    if e.unknown_model:
        return bad_request(field, f"{field}: {e.message}")
    return None


async def _generate(request: Request, response: Response, req: Txt2Img, who: Caller) -> GenerationResponse:
    gw = gateway(request)
    parameters = req.model_dump()  # echoed back, as AUTOMATIC1111 does
    jsoncheck.check(parameters)  # every field, the ignored ones included
    model, model_field = await _model_for(gw, who, req)
    message = _grpc_request(req, model)
    if isinstance(req, Img2Img):  # decoding and resizing client images takes a while: off the event loop
        await asyncio.to_thread(_img2img_fields, req, message)
    gw.progress_for(who.client, message)
    names = {**FIELD_NAMES, "model": model_field}
    images: list[str] = []
    seeds: list[int] = []
    infotexts: list[str] = []
    started = pb.Started()
    incomplete: ApiError | None = None
    with gw.jobs.track(who.client, req.n_iter) as job:
        for i in range(req.n_iter):
            if i:  # AUTOMATIC1111: seeds run on across n_iter
                message.seed = (started.seed + i * req.batch_size) % UINT32
            try:
                result = await run(gw.upstream, job, message, who.metadata(i), gateway_previews=True)
            except ApiError as e:
                if not i:
                    raise _model_not_found(e, model_field) or e.renamed(names) from None
                # a later call refused (credits ran out, say): the images already made and paid for are
                # returned, with the refusal in info.error and the x-kiln-incomplete header
                incomplete = e
                response.headers.update(passed_headers(e.headers))
                response.headers["x-kiln-incomplete"] = f"{e.code}: {e.message}"[:500]
                break
            if i == 0:
                started = result.started
            for a in sorted(result.artifacts, key=lambda a: a.index):
                images.append(base64.b64encode(a.data).decode())
                seeds.append(a.seed)
                infotexts.append(infotext.png_text(a.data).get("parameters", ""))
            response.headers.update(passed_headers(result.metadata))  # the last call's credit figures
            if result.interrupted:
                break
    if not req.send_images:
        images = []
    s = started
    img2img = isinstance(req, Img2Img)
    strength = s.strength if img2img else None
    info = {
        "prompt": req.prompt, "all_prompts": [req.prompt] * len(seeds), "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * len(seeds), "seed": seeds[0] if seeds else s.seed,
        "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
        "width": s.width, "height": s.height, "sampler_name": samplers.label(s.sampler), "cfg_scale": s.guidance_scale,
        "steps": s.steps, "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": s.model, "sd_model_hash": s.model_version[:10], "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": strength,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": job.timestamp, "clip_skip": 1, "is_using_inpainting_conditioning": False,
        "version": "kiln", "interrupted": job.interrupted,
        "error": {"error": incomplete.code, "message": incomplete.message} if incomplete else None,
    }
    if img2img:
        parameters.update(init_images=None, mask=None)
    return GenerationResponse(images=images, parameters=parameters, info=json.dumps(info))


@router.post("/txt2img", response_model=GenerationResponse)
async def txt2img(request: Request, response: Response, req: Txt2Img,
                  who: CallerDep) -> GenerationResponse:
    return await _generate(request, response, req, who)


@router.post("/img2img", response_model=GenerationResponse)
async def img2img(request: Request, response: Response, req: Img2Img,
                  who: CallerDep) -> GenerationResponse:
    return await _generate(request, response, req, who)


# ---- progress and interrupt ------------------------------------------------------------------------------------

@router.get("/progress", response_model=Progress)
async def progress(request: Request, who: CallerDep,
                   skip_current_image: Annotated[bool, Query()] = False) -> Progress:
    jobs = gateway(request).jobs
    jobs.watch(who.client, images=not skip_current_image)  # its next generations ask the server for what it watches
    job = jobs.current(who.client)
    if job is None:
        return Progress(progress=0.0, eta_relative=0.0, state=ProgressState())
    preview = base64.b64encode(job.preview_png).decode() if job.preview_png and not skip_current_image else None
    state = ProgressState(interrupted=job.interrupted, job=f"kiln {job.stage}", job_count=job.job_count,
                          job_timestamp=job.timestamp, job_no=job.job_no, sampling_step=job.step,
                          sampling_steps=job.total_steps)
    return Progress(progress=round(job.progress, 4), eta_relative=round(job.eta_s, 3), state=state,
                    current_image=preview)


@router.post("/interrupt")
async def interrupt(request: Request, who: CallerDep) -> None:
    gateway(request).jobs.interrupt(who.client)


@router.post("/skip")
async def skip(request: Request, who: CallerDep) -> None:
    """Kiln cannot skip one image of a batch: skip interrupts, as AUTOMATIC1111 does for a batch of one."""
    gateway(request).jobs.interrupt(who.client)


# ---- listings and options --------------------------------------------------------------------------------------

@router.get("/sd-models", response_model=list[SDModelItem])
async def sd_models(request: Request, who: CallerDep) -> list[SDModelItem]:
    return [_model_item(m) for m in await _models(gateway(request), who)]


@router.get("/samplers", response_model=list[SamplerItem])
async def sampler_list(request: Request, who: CallerDep) -> list[SamplerItem]:
    offered = {s for m in await _models(gateway(request), who) for s in m.samplers}
    return [SamplerItem(name=label, aliases=[kiln, *aliases], options={})
            for kiln, (label, aliases) in samplers.SAMPLERS.items() if kiln in offered]


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
            {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/options")
async def get_options(request: Request, who: CallerDep) -> dict[str, Any]:
    gw = gateway(request)
    models = await _models(gw, who)
    chosen = _pick(models, gw.checkpoints.get(who.client, ""), "sd_model_checkpoint") if models else None
    return {"sd_model_checkpoint": chosen.name if chosen else None,
            "sd_checkpoint_hash": chosen.version if chosen else None,
            "samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
            "live_previews_enable": gw.config.preview_every > 0, "show_progress_every_n_steps": gw.config.preview_every}


@router.post("/options")
async def set_options(request: Request, options: Annotated[dict[str, Any], Body()], who: CallerDep) -> None:
    """Only `sd_model_checkpoint` has an effect: it picks the model for this client's later requests."""
    gw = gateway(request)
    wanted = options.get("sd_model_checkpoint")
    if wanted is None:
        return
    if not isinstance(wanted, str):
        raise bad_request("sd_model_checkpoint", "sd_model_checkpoint must be a string")
    gw.choose(who.client, _pick(await _models(gw, who), wanted, "sd_model_checkpoint").name)


@router.post("/refresh-checkpoints")
async def refresh_checkpoints(request: Request, who: CallerDep) -> None:
    await gateway(request).upstream.list_models(who.key, fresh=True)


@router.post("/png-info", response_model=PngInfo)
async def png_info(req: PngInfoRequest) -> PngInfo:
    try:
        texts = infotext.png_text(decode_base64(req.image, "image"))
    except ValueError as e:
        raise bad_request("image", f"image is {e}") from None
    text = texts.pop("parameters", "")
    return PngInfo(info=text, items=texts, parameters=infotext.parse(text) if text else {})


for _path in ("sd-vae", "upscalers", "latent-upscale-modes", "hypernetworks", "face-restorers", "realesrgan-models",
              "prompt-styles", "loras"):
    router.add_api_route(f"/{_path}", lambda: [], methods=["GET"], summary="none in Kiln: an empty list")


@router.get("/embeddings")
async def embeddings(request: Request, who: CallerDep) -> dict[str, Any]:
    tokens = {t for m in await _models(gateway(request), who) for t in m.embedding_tokens}
    return {"loaded": {t: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 0,
                           "vectors": 1} for t in sorted(tokens)}, "skipped": {}}


@router.get("/cmd-flags")
async def cmd_flags(request: Request) -> dict[str, Any]:
    return {"api": True, "nowebui": True, "cors_allow_origins": list(gateway(request).config.cors_allow_origins)}

