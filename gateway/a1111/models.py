"""Request and response bodies of AUTOMATIC1111's API (`modules/api/models.py`), the fields Kiln uses typed and
checked; every other field a client sends is accepted, kept for the `parameters` echo, and ignored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class Txt2Img(_Request):
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1: random (reported in info.seed)")
    width: int | None = Field(None, description="unset or 0: the model's default (AUTOMATIC1111 would use 512)")
    height: int | None = Field(None, description="unset or 0: the model's default")
    steps: int | None = Field(None, description="unset or 0: the model's default")
    cfg_scale: float | None = Field(None, description="unset: the model's default")
    sampler_name: str | None = Field(None, description="e.g. 'Euler a', 'DPM++ 2M Karras', 'DDIM', 'LCM'")
    sampler_index: str | None = Field(None, description="deprecated twin of sampler_name, used when it is unset")
    scheduler: str | None = Field(None, description="'Automatic' (the sampler's own) or 'Karras' with 'DPM++ 2M'")
    batch_size: int = Field(1, description="images per gRPC call")
    n_iter: int = Field(1, description="calls in a row; seeds continue from one call to the next")
    override_settings: dict[str, Any] | None = Field(None, description="`sd_model_checkpoint` picks the model")
    send_images: bool = True
    guidance_end: float | None = Field(
        None, description="Kiln's own field (AUTOMATIC1111 has none): classifier-free guidance on this fraction of the "
                          "steps only, 0..1 (the rest run the prompt alone: faster, images differ); unset: 1, every step")


class Img2Img(Txt2Img):
    init_images: list[str] | None = Field(None, description="base64 images (a data: URL prefix is accepted); "
                                                            "the first is used")
    denoising_strength: float | None = Field(None, description="how much to redraw, (0, 1]; unset: 0.75")
    mask: str | None = Field(None, description="base64 mask: white = redraw (inpainting)")
    mask_blur: int | None = Field(None, description="mask edge blur in pixels, 0..64; unset: 4")
    inpainting_mask_invert: int = Field(0, description="1: black = redraw")


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each with its `parameters` text chunk")
    parameters: dict[str, Any]
    info: str = Field(description="JSON: seed, all_seeds, infotexts, ... as AUTOMATIC1111 returns it")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class Progress(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    image: str


class PngInfo(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None
