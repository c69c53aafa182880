"""AUTOMATIC1111's /sdapi/v1 API through a real `kiln gateway` in front of a real `kiln serve` (tiny model):
requests shaped as AUTOMATIC1111 clients send them, the `webuiapi` package as a real client, progress and
interrupt, png-info, options, CORS, and gRPC errors as HTTP errors naming AUTOMATIC1111's fields."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from proto.kiln.v1 import kiln_pb2 as pb
from proto.kiln.v1 import kiln_pb2_grpc as pb_grpc
from tests.gateway.conftest import GatewayProcess

# AUTOMATIC1111 clients send every field of StableDiffusionProcessingTxt2Img, most of which Kiln has no use for
A1111_TXT2IMG = {
    "enable_hr": False, "denoising_strength": 0, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
    "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "prompt": "a red circle",
    "styles": [], "seed": 1234, "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1,
    "seed_resize_from_w": -1, "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1, "steps": 3, "cfg_scale": 7,
    "width": 64, "height": 64, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "negative_prompt": "blurry", "eta": 0, "s_min_uncond": 0, "s_churn": 0,
    "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
    "script_args": [], "sampler_index": "Euler", "script_name": None, "send_images": True, "save_images": False,
    "alwayson_scripts": {}, "scheduler": "Automatic", "infotext": None, "force_task_id": None,
}
SLOW = {"prompt": "slow", "width": 512, "height": 512, "steps": 150, "sampler_name": "Euler", "seed": 3}


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def direct(target: str, **fields: object) -> list[bytes]:
    """The same request straight over gRPC: the PNGs the server makes."""
    with grpc.insecure_channel(target) as ch:
        events = list(pb_grpc.KilnStub(ch).Generate(pb.GenerateRequest(model="tiny", **fields), timeout=120))
    return [e.artifact.data for e in events if e.WhichOneof("event") == "artifact"]


def test_txt2img_as_automatic1111_clients_send_it(gateway: GatewayProcess, server) -> None:
    r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json=A1111_TXT2IMG, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    info = json.loads(body["info"])
    assert info["seed"] == 1234 and info["all_seeds"] == [1234] and info["sampler_name"] == "Euler a"
    assert info["sd_model_name"] == "tiny" and info["steps"] == 3 and info["cfg_scale"] == 7
    assert info["infotexts"][0].startswith("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a")
    assert body["parameters"]["prompt"] == "a red circle" and body["parameters"]["tiling"] is False  # echoed
    # the same PNG bytes as the gRPC server makes for the same request: the gateway translates, nothing more
    want = direct(server.target, prompt="a red circle", negative_prompt="blurry", seed=1234, steps=3,
                  guidance_scale=7, sampler="euler_a", width=64, height=64)
    assert base64.b64decode(body["images"][0]) == want[0]
    assert png(body["images"][0]).size == (64, 64)


def test_n_iter_and_batch_size_continue_the_seeds(gateway: GatewayProcess, server) -> None:
    r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={"prompt": "a blue square", "seed": 7, "steps": 2,
                                                            "batch_size": 2, "n_iter": 2}, timeout=120)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [7, 8, 9, 10] and len(r.json()["images"]) == 4
    assert [f"Seed: {s}," in t for s, t in zip(info["all_seeds"], info["infotexts"], strict=True)] == [True] * 4
    # the second call's first image is the image a direct call with seed 9 makes
    assert base64.b64decode(r.json()["images"][2]) == direct(server.target, prompt="a blue square", seed=9, steps=2)[0]


def test_random_seed_is_reported(gateway: GatewayProcess) -> None:
    r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={"prompt": "x", "seed": -1, "steps": 1, "n_iter": 2},
                   timeout=120)
    info = json.loads(r.json()["info"])
    assert info["all_seeds"][1] == (info["all_seeds"][0] + 1) % (1 << 32) and info["seed"] == info["all_seeds"][0]


def test_samplers_and_schedulers_map_to_kiln(gateway: GatewayProcess) -> None:
    names = {s["name"] for s in httpx.get(f"{gateway.url}/sdapi/v1/samplers").json()}
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "LCM"} <= names

    def seed_image(**kw: object) -> bytes:
        r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={"prompt": "x", "seed": 5, "steps": 3, **kw},
                       timeout=120)
        assert r.status_code == 200, r.text
        return base64.b64decode(r.json()["images"][0])

    karras = seed_image(sampler_name="DPM++ 2M Karras")
    assert seed_image(sampler_name="DPM++ 2M", scheduler="Karras") == karras
    assert seed_image(sampler_index="k_dpmpp_2m_ka") == karras
    assert seed_image(sampler_name="DPM++ 2M") != karras
    r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Heun"})
    assert r.status_code == 422 and r.json()["field"] == "sampler_name" and "'Euler a'" in r.json()["message"]
    r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Euler", "scheduler": "Karras"})
    assert r.status_code == 422 and r.json()["field"] == "scheduler"


def test_guidance_end_is_kilns_own_field(gateway: GatewayProcess, server) -> None:
    """AUTOMATIC1111 has no guidance_end; the gateway takes Kiln's under that name, and the server checks it."""
    fields = {"prompt": "a red circle", "seed": 7, "steps": 4, "cfg_scale": 7, "width": 64, "height": 64,
              "sampler_name": "Euler a"}
    r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={**fields, "guidance_end": 0.5}, timeout=120)
    assert r.status_code == 200, r.text
    assert "CFG scale: 7, CFG end: 0.5, Seed: 7" in json.loads(r.json()["info"])["infotexts"][0]
    want = direct(server.target, prompt="a red circle", seed=7, steps=4, guidance_scale=7, guidance_end=0.5,
                  sampler="euler_a", width=64, height=64)
    assert base64.b64decode(r.json()["images"][0]) == want[0]
    r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={**fields, "guidance_end": 1.5}, timeout=120)
    assert r.status_code == 422 and r.json()["field"] == "guidance_end", r.text


def test_server_refusals_name_automatic1111_fields(gateway: GatewayProcess) -> None:
    r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 13, "cfg_scale": 999,
                                                            "batch_size": 99})
    assert r.status_code == 422
    body = r.json()
    fields = [d["loc"][-1] for d in body["detail"]]
    assert fields == ["width", "cfg_scale", "batch_size"] and body["field"] == "width"
    assert body["detail"][1]["msg"].startswith("cfg_scale=999")
    assert body["details"][0]["@type"].endswith("google.rpc.BadRequest")
    r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={"prompt": ""})
    assert r.status_code == 422 and r.json()["field"] == "prompt"
    r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {
        "sd_model_checkpoint": "nope"}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.sd_model_checkpoint"
    r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["message"]
    r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": "many"})
    assert r.status_code == 422 and r.json()["field"] == "steps"


def test_img2img_with_mask_and_data_urls(gateway: GatewayProcess) -> None:
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))  # white = redraw (AUTOMATIC1111's default, inpainting_mask_invert=0)
    body = {"prompt": "a green circle", "seed": 11, "steps": 4, "init_images": ["data:image/png;base64," + b64png(init)],
            "mask": b64png(mask), "mask_blur": 0, "denoising_strength": 1.0, "inpainting_fill": 1,
            "inpaint_full_res": True, "resize_mode": 0, "width": 64, "height": 64}
    r = httpx.post(f"{gateway.url}/sdapi/v1/img2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = np.asarray(png(r.json()["images"][0]).convert("RGB")).astype(int)
    keep = np.asarray(mask) == 0
    assert np.abs(out[keep] - np.asarray(init)[keep]).max() <= 1  # outside the mask: the init image
    assert np.abs(out[~keep] - np.asarray(init)[~keep]).mean() > 10  # inside: redrawn
    assert r.json()["parameters"]["init_images"] is None and json.loads(r.json()["info"])["denoising_strength"] == 1
    # inverted: black = redraw
    r2 = httpx.post(f"{gateway.url}/sdapi/v1/img2img", json={**body, "inpainting_mask_invert": 1}, timeout=120)
    out2 = np.asarray(png(r2.json()["images"][0]).convert("RGB")).astype(int)
    assert np.abs(out2[~keep] - np.asarray(init)[~keep]).max() <= 1
    assert np.abs(out2[keep] - np.asarray(init)[keep]).mean() > 10


def test_img2img_stretches_to_the_requested_size_and_refuses_bad_images(gateway: GatewayProcess) -> None:
    wide = Image.new("RGB", (128, 64), (10, 120, 200))
    r = httpx.post(f"{gateway.url}/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                                            "init_images": [b64png(wide)]}, timeout=120)
    assert r.status_code == 200, r.text
    assert png(r.json()["images"][0]).size == (64, 64)
    for images, why in (([], "init_images"), (["!!notbase64!!"], "init_images[0]"),
                        ([base64.b64encode(b"not an image").decode()], "init_images[0]")):
        r = httpx.post(f"{gateway.url}/sdapi/v1/img2img", json={"prompt": "x", "init_images": images})
        assert r.status_code == 422 and r.json()["field"] == why, r.text
    r = httpx.post(f"{gateway.url}/sdapi/v1/img2img", json={"prompt": "x", "init_images": [b64png(wide)],
                                                            "mask": "@@@"})
    assert r.status_code == 422 and r.json()["field"] == "mask"


def test_webuiapi_client(gateway: GatewayProcess) -> None:
    port = int(gateway.url.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)
    result = api.txt2img(prompt="a yellow triangle", seed=42, cfg_scale=5, width=64, height=64)
    assert result.image.size == (64, 64) and result.info["seed"] == 42 and result.info["all_seeds"] == [42]
    assert "Sampler: Euler a" in result.info["infotexts"][0]
    api.util_set_model("tiny")
    assert api.util_get_current_model() == "tiny"
    assert "Euler a" in api.util_get_sampler_names()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    edited = api.img2img(images=[result.image], mask_image=mask, prompt="a blue triangle", seed=43,
                         denoising_strength=0.9, mask_blur=0, width=64, height=64)
    out = np.asarray(edited.image.convert("RGB")).astype(int)
    assert np.abs(out[:, 32:] - np.asarray(result.image.convert("RGB"))[:, 32:]).max() <= 1
    info = api.png_info(result.image)
    assert info.info.startswith("a yellow triangle\nSteps: 3") and info.json["parameters"]["Seed"] == "42"
    assert api.get_progress()["state"]["job_count"] == 0  # nothing running


def test_progress_preview_and_interrupt(gateway: GatewayProcess) -> None:
    port = int(gateway.url.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
    done: dict[str, object] = {}

    def slow() -> None:
        done["r"] = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json=SLOW, timeout=300)

    assert api.get_progress()["state"]["job_count"] == 0  # a front-end polls before it generates: previews on
    t = threading.Thread(target=slow)
    t.start()
    deadline = time.monotonic() + 60
    progress = api.get_progress()
    while time.monotonic() < deadline and not (progress["state"]["sampling_step"] >= 2 and progress["current_image"]):
        time.sleep(0.05)
        progress = api.get_progress()
    assert progress["state"]["sampling_steps"] == 150 and progress["state"]["job_count"] == 1
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    preview = png(progress["current_image"])
    assert preview.size == (64, 64)  # latent resolution of 512x512
    skipped = httpx.get(f"{gateway.url}/sdapi/v1/progress", params={"skip_current_image": "true"}).json()
    assert skipped["current_image"] is None
    api.interrupt()
    t.join(60)
    r = done["r"]
    assert r.status_code == 200, r.text  # type: ignore[attr-defined]
    info = json.loads(r.json()["info"])  # type: ignore[attr-defined]
    assert info["interrupted"] is True and r.json()["images"] == []  # type: ignore[attr-defined]
    assert api.get_progress()["state"]["job_count"] == 0


def test_options_choose_the_model(gateway: GatewayProcess) -> None:
    models = httpx.get(f"{gateway.url}/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["tiny"] and models[0]["title"] == "tiny"
    assert httpx.get(f"{gateway.url}/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny"
    r = httpx.post(f"{gateway.url}/sdapi/v1/options", json={"sd_model_checkpoint": "missing"})
    assert r.status_code == 422 and r.json()["field"] == "sd_model_checkpoint" and "tiny" in r.json()["message"]
    r = httpx.post(f"{gateway.url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny [abc123]", "CLIP_stop": 2})
    assert r.status_code == 200
    assert httpx.get(f"{gateway.url}/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}


def test_png_info_refuses_what_is_not_an_image(gateway: GatewayProcess) -> None:
    r = httpx.post(f"{gateway.url}/sdapi/v1/png-info", json={"image": base64.b64encode(b"GIF89a junk").decode()})
    assert r.status_code == 422 and r.json()["field"] == "image"
    r = httpx.post(f"{gateway.url}/sdapi/v1/png-info", json={"image": b64png(Image.new("RGB", (8, 8)))})
    assert r.status_code == 200 and r.json() == {"info": "", "items": {}, "parameters": {}}


@pytest.mark.parametrize("origin,allowed", [("http://app.example", True), ("http://evil.example", False)])
def test_cors(gateway: GatewayProcess, origin: str, allowed: bool) -> None:
    r = httpx.options(f"{gateway.url}/sdapi/v1/txt2img", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert (r.headers.get("access-control-allow-origin") == origin) is allowed
    r = httpx.get(f"{gateway.url}/sdapi/v1/sd-models", headers={"Origin": origin})
    assert ("access-control-allow-origin" in r.headers) is allowed


def test_openapi_docs(gateway: GatewayProcess) -> None:
    assert httpx.get(f"{gateway.url}/docs").status_code == 200
    paths = httpx.get(f"{gateway.url}/openapi.json").json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/v1/generate"} <= set(paths)


def test_requests_shaped_as_stablestudio_sends_them(gateway: GatewayProcess) -> None:
    """StableStudio's webui plugin: empty sampler names, its own camelCase `cfgScale`, `batch_size` = its image
    count, `save_images`; img2img with its inverted mask mode; png-info read back line by line as it parses it."""
    base = {"seed": -1, "cfgScale": 7, "width": 64, "height": 64, "sampler_name": "", "sampler_index": "",
            "prompt": "a purple square", "negative_prompt": "", "steps": 2, "batch_size": 4, "save_images": True}
    r = httpx.post(f"{gateway.url}/sdapi/v1/txt2img", json=base, headers={"Content-Type": "application/json"},
                   timeout=120)
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert len(images) == 4 and len(set(images)) == 4
    info = httpx.post(f"{gateway.url}/sdapi/v1/png-info", json={"image": images[0]}).json()["info"].split("\n")
    details = dict(d.strip().split(":", 1) for d in info[1].split(","))
    assert info[0] == "a purple square" and details["Steps"].strip() == "2" and details["Model"].strip() == "tiny"
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (0, 0, 64, 32))  # inverted mode: black = redraw (the top half)
    r = httpx.post(f"{gateway.url}/sdapi/v1/img2img", json={
        **base, "batch_size": 1, "seed": 21, "init_images": [images[0]], "denoising_strength": 0.5, "mask": b64png(mask),
        "inpainting_mask_invert": 1, "inpainting_fill": 1, "inpaint_full_res": False}, timeout=120)
    assert r.status_code == 200, r.text
    out = np.asarray(png(r.json()["images"][0]).convert("RGB")).astype(int)
    init = np.asarray(png(images[0]).convert("RGB")).astype(int)
    # mask_blur is AUTOMATIC1111's default 4 (a Gaussian sigma): 16 pixels from the edge the init image is kept
    assert np.abs(out[48:] - init[48:]).max() <= 1 and np.abs(out[:24] - init[:24]).mean() > 1


def test_img2img_reads_exif_rotated_images_upright(gateway: GatewayProcess, server) -> None:
    """A phone JPEG stored 64x128 with EXIF orientation 6 is 128x64 upright, as the server reads it: asked for
    128x64 the gateway leaves it to the server (no stretch), and the image equals the direct gRPC call's."""
    stored = Image.new("RGB", (64, 128), (20, 60, 200))
    stored.paste((250, 200, 0), (0, 0, 64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif.tobytes())
    body = {"prompt": "x", "seed": 2, "steps": 2, "width": 128, "height": 64, "sampler_name": "Euler",
            "init_images": [base64.b64encode(buf.getvalue()).decode()], "denoising_strength": 0.5}
    r = httpx.post(f"{gateway.url}/sdapi/v1/img2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    want = direct(server.target, prompt="x", seed=2, steps=2, width=128, height=64, sampler="euler",
                  init_image=buf.getvalue(), strength=0.5)
    assert base64.b64decode(r.json()["images"][0]) == want[0]
