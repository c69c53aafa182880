"""OpenAI's Images API on a real `kiln gateway` in front of a real `kiln serve` (the tiny model, 64x64 by
default), called through the `openai` package as chat front-ends and SDK users call it."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from gateway.a1111.infotext import parse, png_text
from tests.conftest import ServerProcess, kiln, start_server
from tests.gateway.conftest import GatewayProcess, start_gateway


def _client(url: str, key: str = "no-accounts-here") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return _client(gateway.url)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _b64(item: object) -> bytes:
    return base64.b64decode(item.b64_json)  # type: ignore[attr-defined]


def _params(data: bytes) -> dict[str, str]:
    return parse(png_text(data)["parameters"])


# 64x64 input: a smooth colour ramp (nothing the tiny model would draw by chance) and the edit area in its middle
RAMP = np.stack([*np.meshgrid(np.arange(64) * 4, np.arange(64) * 4), np.full((64, 64), 200)], axis=-1).astype(np.uint8)
EDIT = np.zeros((64, 64), dtype=bool)
EDIT[16:48, 8:40] = True


def _edit_area_changed(out: np.ndarray) -> None:
    """Outside EDIT the input comes back (Kiln pastes its result over init_image through the hard mask), inside
    it was redrawn."""
    diff = np.abs(out - RAMP.astype(np.int16)).max(axis=-1)
    assert out.shape == (64, 64, 3)
    assert diff[~EDIT].max() <= 1, f"{(diff[~EDIT] > 1).sum()} kept pixels changed"
    assert diff[EDIT].mean() > 20, "the edit area was not redrawn"


# ---- generations -----------------------------------------------------------------------------------------------

def test_generations_b64_json_two_different_images(client: openai.OpenAI) -> None:
    before = int(time.time())
    r = client.images.generate(prompt="a red circle", n=2, response_format="b64_json", quality="hd", style="vivid",
                               user="someone", extra_body={"background": "opaque", "unknown_field": [1, 2]})
    assert before - 1 <= r.created <= time.time() + 1
    assert r.size == "64x64" and r.output_format == "png"
    assert len(r.data) == 2 and all(d.url is None and d.revised_prompt == "a red circle" for d in r.data)
    first, second = (_b64(d) for d in r.data)
    a, b = _pixels(first), _pixels(second)
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a - b).mean() > 1, "n=2 gave the same image twice"
    p0, p1 = _params(first), _params(second)
    assert p0["Prompt"] == p1["Prompt"] == "a red circle"
    assert int(p1["Seed"]) == (int(p0["Seed"]) + 1) % (1 << 32)  # OpenAI has no seed; Kiln picked one: image k = seed + k
    assert p0["Size"] == "64x64"


def test_url_format_is_fetched_over_http_and_matches_b64(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    # OpenAI's default response_format is url; an OpenAI model name means the server's first model; `seed` and
    # `negative_prompt` are Kiln's extensions
    extra = {"seed": 7, "negative_prompt": "blue"}
    r = client.images.generate(prompt="a red circle", model="dall-e-2", size="64x64", extra_body=extra)
    assert r.data and r.data[0].b64_json is None
    url = r.data[0].url
    assert url and url.startswith(f"{gateway.url}/v1/images/files/") and url.endswith(".png")
    got = httpx.get(url, timeout=30)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert _params(got.content)["Seed"] == "7" and _params(got.content)["Negative prompt"] == "blue"
    # the same request as b64_json (a GPT image model name answers b64_json unless told otherwise): same pixels
    again = client.images.generate(prompt="a red circle", model="gpt-image-1", size="auto", extra_body=extra)
    assert again.data and again.data[0].url is None
    assert np.array_equal(_pixels(got.content), _pixels(_b64(again.data[0])))
    # a URL that never existed is a 404 in OpenAI's error shape
    missing = httpx.get(url.replace("/files/", "/files/x"), timeout=30)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "image_expired"


# ---- edits -----------------------------------------------------------------------------------------------------

def test_edit_with_mask_keeps_everything_outside_the_transparent_area(client: openai.OpenAI) -> None:
    mask = np.full((64, 64, 4), 255, dtype=np.uint8)  # OpenAI's convention: alpha 0 = edit here, RGB ignored
    mask[EDIT, 3] = 0
    mask[~EDIT, 3] = 1  # nearly transparent still means keep: only fully transparent pixels are edited
    r = client.images.edit(image=("in.png", _png(Image.fromarray(RAMP)), "image/png"),
                           mask=("mask.png", _png(Image.fromarray(mask, "RGBA")), "image/png"),
                           prompt="a red circle", response_format="b64_json", n=1)
    assert len(r.data) == 1 and r.size == "64x64"
    data = _b64(r.data[0])
    _edit_area_changed(_pixels(data))
    assert _params(data)["Denoising strength"] == "1"  # inpainting's default: the area is redrawn from noise


def test_edit_with_the_image_alpha_as_mask(client: openai.OpenAI) -> None:
    rgba = np.concatenate([RAMP, np.full((64, 64, 1), 255, dtype=np.uint8)], axis=-1)
    rgba[EDIT, 3] = 0
    r = client.images.edit(image=("in.png", _png(Image.fromarray(rgba, "RGBA")), "image/png"),
                           prompt="a red circle", response_format="b64_json")
    _edit_area_changed(_pixels(_b64(r.data[0])))


def test_edit_without_transparency_is_img2img(client: openai.OpenAI) -> None:
    r = client.images.edit(image=("in.png", _png(Image.fromarray(RAMP)), "image/png"), prompt="a red circle",
                           response_format="b64_json", extra_body={"strength": 0.5, "seed": 3})
    data = _b64(r.data[0])
    assert _params(data)["Denoising strength"] == "0.5"
    diff = np.abs(_pixels(data) - RAMP.astype(np.int16)).max(axis=-1)
    assert (diff > 1).mean() > 0.5, "img2img should redraw the whole image"


def test_progress_and_interrupt_see_openai_generations(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    """/sdapi/v1/progress shows the OpenAI request's steps, and /sdapi/v1/interrupt cancels it (no image made yet:
    499, OpenAI's error shape)."""
    headers = {"authorization": f"Bearer {client.api_key}"}  # the same caller
    outcome: dict[str, object] = {}

    def generate() -> None:
        try:
            # 256x256: the tiny model's 20 default steps take about a second, time to poll and interrupt
            outcome["response"] = client.images.generate(prompt="a red circle", n=1, size="256x256",
                                                         response_format="b64_json")
        except openai.APIStatusError as e:
            outcome["error"] = e

    # a client that watches polls before it generates (the gateway asks for step events only for watchers)
    httpx.get(f"{gateway.url}/sdapi/v1/progress", headers=headers, timeout=10)
    worker = threading.Thread(target=generate)
    worker.start()
    seen = None
    deadline = time.monotonic() + 60
    while worker.is_alive() and time.monotonic() < deadline:
        state = httpx.get(f"{gateway.url}/sdapi/v1/progress", headers=headers, timeout=10).json()
        if state["state"]["sampling_step"] >= 1:
            seen = state
            httpx.post(f"{gateway.url}/sdapi/v1/interrupt", headers=headers, timeout=10)
            break
        time.sleep(0.01)
    worker.join(60)
    assert seen is not None, f"no progress seen before the generation ended: {outcome}"
    assert seen["state"]["sampling_steps"] == 20 and seen["state"]["job"].startswith("kiln")
    error = outcome.get("error")
    assert isinstance(error, openai.APIStatusError), outcome
    assert error.status_code == 499 and "interrupted" in error.message


# ---- refusals: OpenAI's error shape, the gateway's statuses, `param` naming OpenAI's field ------------------------

IN_PNG = ("in.png", _png(Image.fromarray(RAMP)), "image/png")
OPAQUE_MASK = ("mask.png", _png(Image.fromarray(RAMP)), "image/png")
SMALL_MASK = ("mask.png", _png(Image.new("RGBA", (32, 32), (0, 0, 0, 0))), "image/png")


@pytest.mark.parametrize(("call", "error", "param", "text"), [
    (lambda c: c.images.generate(prompt="x", size="big"), openai.UnprocessableEntityError, "size", "WIDTHxHEIGHT"),
    (lambda c: c.images.generate(prompt="x", size="100x64"), openai.UnprocessableEntityError, "size",
     "width=100 must be a multiple of 8"),
    (lambda c: c.images.generate(prompt="x", n=0), openai.UnprocessableEntityError, "n", "n=0 must be between 1"),
    (lambda c: c.images.generate(prompt="x", n=99), openai.UnprocessableEntityError, "n", "n=99 must be between 1"),
    (lambda c: c.images.generate(prompt="x", response_format="gif"), openai.UnprocessableEntityError,
     "response_format", "response_format"),
    (lambda c: c.images.generate(prompt="x", model="no-such-model"), openai.NotFoundError, "model", "available: tiny"),
    (lambda c: c.images.edit(image=("a.png", b"not an image", "image/png"), prompt="x"),
     openai.UnprocessableEntityError, "image", "not a PNG, JPEG or WebP"),
    (lambda c: c.images.edit(image=IN_PNG, mask=OPAQUE_MASK, prompt="x"), openai.UnprocessableEntityError, "mask",
     "no alpha channel"),
    (lambda c: c.images.edit(image=IN_PNG, mask=SMALL_MASK, prompt="x"), openai.UnprocessableEntityError, "mask",
     "mask is 32x32; it must be the size of image"),
    (lambda c: c.images.edit(image=[IN_PNG, IN_PNG], prompt="x"), openai.UnprocessableEntityError, "image",
     "one image"),
    (lambda c: c.images.edit(image=IN_PNG, prompt="x", size="64x128"), openai.UnprocessableEntityError, "image",
     "leave size unset or 'auto'"),
], ids=["size-syntax", "size-range", "n-zero", "n-too-many", "response-format", "unknown-model", "not-an-image",
        "mask-without-alpha", "mask-size", "two-images", "edit-aspect"])
def test_refusals(client: openai.OpenAI, call, error: type[openai.APIStatusError], param: str, text: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as caught:
        call(client)
    e = caught.value
    assert e.param == param, e.body
    assert text in e.message, e.message
    assert e.type == "invalid_request_error"
    if error is openai.NotFoundError:
        assert e.code == "model_not_found"


def test_malformed_bodies_are_4xx_in_openai_shape(gateway: GatewayProcess) -> None:
    url = gateway.url + "/v1/images"
    cases = {
        "bad json": httpx.post(f"{url}/generations", content=b"{nope", headers={"content-type": "application/json"}),
        "no prompt": httpx.post(f"{url}/generations", json={"n": 1}),
        "n not a number": httpx.post(f"{url}/generations", json={"prompt": "x", "n": "two"}),
        "json to edits": httpx.post(f"{url}/edits", json={"prompt": "x"}),
        "broken multipart": httpx.post(f"{url}/edits", content=b"--b\r\nContent-Disposition: form-data\r\n\r\nx",
                                       headers={"content-type": "multipart/form-data; boundary=b"}),
        "image as text": httpx.post(f"{url}/edits", data={"prompt": "x", "image": "abc"},
                                    files={"other": ("o.txt", b"x")}),
        "no image": httpx.post(f"{url}/edits", data={"prompt": "x"}, files={"mask": ("m.png", b"x")}),
        "stream": httpx.post(f"{url}/generations", json={"prompt": "x", "stream": True}),
    }
    for name, r in cases.items():
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], (name, error)
    assert cases["no prompt"].json()["error"]["param"] == "prompt"
    assert cases["n not a number"].json()["error"]["param"] == "n"
    assert cases["json to edits"].status_code == 415
    assert cases["image as text"].json()["error"]["param"] == "image"
    assert cases["no image"].json()["error"]["param"] == "image"
    assert cases["stream"].json()["error"]["param"] == "stream"


def test_huge_upload_is_413(gateway: GatewayProcess) -> None:
    big = b"\x89PNG\r\n\x1a\n" + bytes(25 << 20)  # over the gateway's 24 MiB body limit

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as the body streams in
        boundary = b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        yield boundary
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]
        yield b"\r\n--b--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=b"}
    for body in (big, chunks()):
        r = httpx.post(f"{gateway.url}/v1/images/edits", content=body, headers=headers, timeout=60)
        assert r.status_code == 413, r.text
        assert "at most" in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"


# ---- accounts: the API key passes through ------------------------------------------------------------------------

TIERS = """
[tiers.t]
daily_credits = 1000
requests_per_minute = 2
max_concurrent = 4
max_steps = 50
max_pixels = 1048576
max_images = 4
models = ["*"]
"""


@pytest.fixture(scope="module")
def accounts(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, str]]:
    d = tmp_path_factory.mktemp("openai-accounts")
    (d / "tiers.toml").write_text(TIERS)
    db = f"sqlite:///{d / 'auth.db'}"
    out = kiln("keys", "create", "--auth-db", db, "--tiers", str(d / "tiers.toml"), "--tier", "t", "--label", "openai")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    server: ServerProcess = start_server(tiny_store, d / "serve.log", "--auth-db", db, "--tiers", str(d / "tiers.toml"))
    try:
        g = start_gateway(server.target, d / "gateway.log")
        yield g, key
        g.stop()
    finally:
        server.stop()


def test_api_key_passes_through(accounts: tuple[GatewayProcess, str]) -> None:
    g, key = accounts
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(g.url, "kiln_not_a_real_key").images.generate(prompt="a red circle", response_format="b64_json")
    assert caught.value.type == "authentication_error"
    missing = httpx.post(f"{g.url}/v1/images/generations", json={"prompt": "a red circle"}, timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"

    for _ in range(2):  # the tier allows 2 calls a minute; a request naming its model is one call (Generate)
        raw = _client(g.url, key).images.with_raw_response.generate(prompt="a red circle", model="tiny",
                                                                    response_format="b64_json")
        assert raw.status_code == 200 and len(raw.parse().data) == 1
    assert int(raw.headers["x-credits-remaining"]) < 1000  # charged to this key
    # the next is refused with OpenAI's rate-limit error and a Retry-After
    with pytest.raises(openai.RateLimitError) as limited:
        _client(g.url, key).images.generate(prompt="a red circle", model="tiny", response_format="b64_json")
    assert limited.value.type == "rate_limit_exceeded"
    assert int(limited.value.response.headers["retry-after"]) >= 1
