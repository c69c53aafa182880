"""The gateway's web page (gateway/web/) in Debian's headless Chromium, driven by Playwright, against real
`kiln gateway` and `kiln serve` processes: model list, generation with progress and previews, the gallery,
img2img from a gallery image, inpainting with a mask drawn with the mouse, Stop, errors next to their fields,
and the credits box with an accounts-enabled server."""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import kiln, start_server
from tests.gateway.conftest import GatewayProcess, start_gateway

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MISSING = (f"{CHROMIUM} (Debian's chromium) is not installed: the web page's browser tests (generate, img2img, "
           "inpainting, Stop, field errors, credits) did not run; `make test` installs it")


# Records every value the page shows while a generation runs (over in well under a second on the tiny model, with
# several events often handled in one task): from the mutation records, not from the element when the observer runs.
WATCH = """() => {
  const seen = window.__seen = {status: [], progress: [], preview: []};
  const el = (id) => document.getElementById(id);
  new MutationObserver((records) => {
    for (const r of records) for (const n of r.addedNodes) seen.status.push(n.textContent);
  }).observe(el("status"), {childList: true});
  // attribute records carry the value before each change: the values set are the next record's old value, then now
  const values = (key, element, attribute) => new MutationObserver((records) => {
    const olds = records.map((r) => r.oldValue);
    seen[key].push(...olds.slice(1), element.getAttribute(attribute));
  }).observe(element, {attributes: true, attributeFilter: [attribute], attributeOldValue: true});
  values("progress", el("progress"), "value");
  values("preview", el("preview"), "src");
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module (each test opens its own context); a skip saying what it hides where
    Chromium is missing, a failure when KILN_REQUIRE_CHROMIUM is set (`make test` once installed, and CI)."""
    if not CHROMIUM.exists():
        if os.environ.get("KILN_REQUIRE_CHROMIUM"):
            pytest.fail(f"{CHROMIUM} is missing and KILN_REQUIRE_CHROMIUM is set; Debian: apt-get install chromium")
        pytest.skip(MISSING)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, gateway: GatewayProcess) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(30_000)
    page.goto(gateway.url + "/")
    expect(page.get_by_label("Model")).to_have_value("tiny")
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def png(data_url: str) -> Image.Image:
    head, _, b64 = data_url.partition(",")
    assert head == "data:image/png;base64", head[:40]
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def gallery_items(page: Page):  # type: ignore[no-untyped-def]
    return page.get_by_role("list", name="Gallery").get_by_role("listitem")


def generate(page: Page) -> dict[str, Any]:
    """Click Generate; the JSON body the page POSTed to /v1/generate."""
    with page.expect_request("**/v1/generate") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert isinstance(body, dict)
    return body


def test_models_and_generate(page: Page, gateway: GatewayProcess) -> None:
    listing = httpx.get(gateway.url + "/v1/models").json()["models"][0]
    expect(page.get_by_label("Sampler").locator("option")).to_have_text(listing["samplers"])
    expect(page.get_by_label("Sampler")).to_have_value(listing["default_sampler"])
    expect(page.get_by_label("Width")).to_have_value(str(listing["default_width"]))
    expect(page.get_by_label("Steps")).to_have_value(str(listing["default_steps"]))
    expect(page.get_by_label("Width")).to_have_attribute("max", str(listing["limits"]["max_size"]))
    expect(page.get_by_label("Decoder")).to_be_hidden()  # the tiny bundle has one decoder
    expect(page.get_by_role("region", name="Credits")).to_be_hidden()  # this server has no accounts (409)

    page.evaluate(WATCH)
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Negative prompt").fill("blue")
    page.get_by_label("Steps").fill("4")
    page.get_by_label("Images").fill("2")
    page.get_by_label("Random seed").uncheck()
    page.get_by_label("Seed", exact=True).fill("7")
    body = generate(page)
    assert body == {"model": "tiny", "prompt": "a red circle", "negative_prompt": "blue", "preview_every": 1,
                    "sampler": listing["default_sampler"], "width": 64, "height": 64, "steps": 4,
                    "guidance_scale": listing["default_guidance_scale"], "num_images": 2, "seed": 7}
    expect(gallery_items(page)).to_have_count(2)
    expect(page.get_by_role("status")).to_contain_text("Done in")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()

    seen = page.evaluate("window.__seen")
    assert [s for s in seen["status"] if "Denoising" in s] == [f"Denoising: step {k} of 4" for k in range(1, 5)]
    assert [float(v) for v in seen["progress"] if float(v) > 0][:4] == [0.25, 0.5, 0.75, 1.0]
    assert len(seen["preview"]) == 4 and png(seen["preview"][-1]).size == (8, 8)  # latent resolution: 64 / 8
    expect(page.get_by_role("img", name="Preview")).to_be_visible()

    for item, seed in zip(gallery_items(page).all(), (8, 7), strict=True):  # newest first; image k has seed + k
        image = item.get_by_role("img", name=f"Seed {seed}: a red circle")
        picture = png(image.get_attribute("src") or "")
        assert picture.size == (64, 64)
        parameters = picture.info["parameters"]
        assert parameters.startswith("a red circle\nNegative prompt: blue\n") and f"Seed: {seed}," in parameters
        text = item.inner_text()
        for fact in ("Mode\ntext to image", "Steps\n4", f"Seed\n{seed}", "Size\n64x64",
                     f"Sampler\n{listing['default_sampler']}"):
            assert fact in text, (fact, text)
        item.get_by_text("Parameters").click()
        expect(item.locator("pre")).to_have_text(parameters)



def test_img2img_from_gallery_image(page: Page) -> None:
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Steps").fill("4")
    generate(page)
    expect(gallery_items(page)).to_have_count(1)
    source = gallery_items(page).first.get_by_role("img").get_attribute("src")

    gallery_items(page).first.get_by_role("button", name="Use as init image").click()
    expect(page.get_by_role("img", name="Init image")).to_have_attribute("src", source or "")
    expect(page.get_by_label("Width")).to_have_value("")  # the server keeps the init image's size
    page.get_by_label("Strength").fill("0.5")
    body = generate(page)
    assert body["init_image"] == source and body["strength"] == 0.5 and "mask_image" not in body
    assert "width" not in body and "height" not in body
    expect(gallery_items(page)).to_have_count(2)
    text = gallery_items(page).first.inner_text()
    assert "Mode\nimg2img" in text and "Steps\n2 of 4" in text and "Strength\n0.50" in text, text


def drop_file(page: Page, selector: str, name: str, data: bytes, mime: str) -> None:
    """What a browser does when a file is dragged from the desktop and dropped on `selector`."""
    transfer = page.evaluate_handle("""([b64, name, mime]) => {
        const t = new DataTransfer();
        t.items.add(new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type: mime}));
        return t;
    }""", [base64.b64encode(data).decode(), name, mime])
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def draw(page: Page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A mouse stroke on the mask canvas, from and to fractions of its width and height."""
    box = page.get_by_label("Mask", exact=True).bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"], steps=8)
    page.mouse.up()


def capsule(size: tuple[int, int], start: tuple[float, float], end: tuple[float, float], radius: float) -> np.ndarray:
    """Distance of each pixel centre to the stroke's segment, in pixels (start, end as fractions)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] + 0.5
    ax, ay, bx, by = start[0] * w, start[1] * h, end[0] * w, end[1] * h
    t = np.clip(((x - ax) * (bx - ax) + (y - ay) * (by - ay)) / max(1e-9, (bx - ax) ** 2 + (by - ay) ** 2), 0, 1)
    return np.hypot(x - (ax + t * (bx - ax)), y - (ay + t * (by - ay))) - radius


def test_inpaint_with_drawn_mask(page: Page) -> None:
    w, h = 96, 64
    ramp = np.linspace(0, 255, w, dtype=np.uint8)
    start_image = np.stack([np.tile(ramp, (h, 1)), np.full((h, w), 40, np.uint8), np.tile(ramp[::-1], (h, 1))], -1)
    buf = io.BytesIO()
    Image.fromarray(start_image).save(buf, "PNG")
    drop_file(page, "#init-box", "start.png", buf.getvalue(), "image/png")
    expect(page.get_by_role("img", name="Init image")).to_be_visible()
    expect(page.get_by_label("Width")).to_have_attribute("placeholder", "96")

    page.get_by_label("Brush size").fill("40")
    draw(page, (0.1, 0.8), (0.9, 0.8))  # painted, then cleared: must not reach the request
    page.get_by_role("button", name="Clear mask").click()
    stroke = ((0.25, 0.5), (0.75, 0.5))
    draw(page, *stroke)
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Steps").fill("4")
    page.get_by_label("Strength").fill("1")
    body = generate(page)

    assert base64.b64decode(body["init_image"].partition(",")[2]) == buf.getvalue()
    mask = png(body["mask_image"])
    assert mask.size == (w, h)  # the init image's size, not the canvas's size on screen
    white = np.asarray(mask.convert("L")) >= 128  # as the server binarises it
    shown = page.get_by_label("Mask", exact=True).bounding_box()
    assert shown is not None
    radius = 40 / 2 * w / shown["width"]  # the brush size is in screen pixels
    distance = capsule((w, h), *stroke, radius)
    assert white[distance < -1].all() and not white[distance > 1].any()
    assert abs(int(white.sum()) - int((distance <= 0).sum())) <= 0.1 * (distance <= 0).sum()

    expect(gallery_items(page)).to_have_count(1)
    item = gallery_items(page).first
    text = item.inner_text()
    assert "Mode\ninpaint" in text and "Size\n96x64" in text and "Steps\n4 of 4" in text, text
    assert png(item.get_by_role("img").get_attribute("src") or "").size == (96, 64)


def test_stop(page: Page) -> None:
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Width").fill("256")
    page.get_by_label("Height").fill("256")
    page.get_by_label("Steps").fill("150")
    generate(page)
    expect(page.get_by_role("status")).to_contain_text(re.compile(r"Denoising: step \d+ of 150"))
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("status")).to_have_text("Stopped", timeout=15_000)
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(gallery_items(page)).to_have_count(0)


def test_refusal_shown_next_to_its_field(page: Page) -> None:
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Width").fill("60")
    generate(page)
    width = page.get_by_label("Width")
    message = "width=60 must be a multiple of 8 between 64 and 1024"
    expect(width).to_have_attribute("aria-invalid", "true")
    expect(width).to_have_accessible_description(message)
    expect(page.locator("#err-width")).to_be_visible()
    expect(page.get_by_role("alert")).to_be_hidden()
    expect(page.get_by_label("Height")).not_to_have_attribute("aria-invalid", "true")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(gallery_items(page)).to_have_count(0)

    page.get_by_label("Width").fill("64")  # the next request clears it; Ctrl+Enter in the prompt sends it
    with page.expect_request("**/v1/generate") as sent:
        page.get_by_label("Prompt", exact=True).press("Control+Enter")
    assert sent.value.post_data_json["width"] == 64
    expect(gallery_items(page)).to_have_count(1)
    expect(page.locator("#err-width")).to_be_hidden()


TIERS = """
[tiers.t]
daily_credits = 1000
requests_per_minute = 10000
max_concurrent = 4
max_steps = 50
max_pixels = 1048576
max_images = 4
models = ["*"]
"""


def test_credits(browser: Browser, tiny_store: Path, tmp_path: Path) -> None:
    tiers = tmp_path / "tiers.toml"
    tiers.write_text(TIERS)
    db = f"sqlite:///{tmp_path / 'auth.db'}"
    out = kiln("keys", "create", "--auth-db", db, "--tiers", str(tiers), "--tier", "t", "--label", "web")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    server = start_server(tiny_store, tmp_path / "serve.log", "--auth-db", db, "--tiers", str(tiers))
    gw = start_gateway(server.target, tmp_path / "gateway.log")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(gw.url + "/")
        key_field = page.get_by_label("API key")
        expect(key_field).to_have_accessible_description("API key needed (no API key: send `authorization: Bearer "
                                                          "KEY` or `x-api-key: KEY` metadata)")
        credits = page.get_by_role("region", name="Credits")
        expect(credits).to_be_hidden()
        expect(page.get_by_label("Model").locator("option")).to_have_count(0)

        key_field.fill(key)
        key_field.blur()
        expect(page.get_by_label("Model")).to_have_value("tiny")
        expect(credits).to_contain_text("1000 of 1000 credits left today")
        expect(key_field).not_to_have_attribute("aria-invalid", "true")

        page.reload()  # the key is remembered (localStorage)
        expect(key_field).to_have_value(key)
        expect(credits).to_contain_text("1000 of 1000 credits left today (tier t")
        page.get_by_label("Prompt", exact=True).fill("a red circle")
        page.get_by_label("Steps").fill("4")
        with page.expect_request("**/v1/generate") as sent:
            page.get_by_role("button", name="Generate").click()
        assert sent.value.headers["authorization"] == f"Bearer {key}"
        expect(gallery_items(page)).to_have_count(1)
        balance = httpx.get(gw.url + "/v1/balance", headers={"Authorization": f"Bearer {key}"}).json()
        assert 0 < balance["remaining"] < 1000  # the generation was charged
        expect(credits).to_contain_text(f"{balance['remaining']} of 1000 credits left today")
    finally:
        context.close()
        gw.stop()
        server.stop()


def test_readable_on_a_phone(browser: Browser, gateway: GatewayProcess) -> None:
    """At a phone's 390x844 CSS pixels: one column, nothing wider than the screen, and a generation works."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=3, is_mobile=True,
                                  has_touch=True)
    page = context.new_page()
    try:
        page.set_default_timeout(30_000)
        page.goto(gateway.url + "/")
        expect(page.get_by_label("Model")).to_have_value("tiny")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        form = page.get_by_role("form", name="Generate").bounding_box()
        assert form is not None and form["x"] >= 0 and form["x"] + form["width"] <= 390
        page.get_by_label("Prompt", exact=True).fill("a red circle")
        page.get_by_label("Steps").fill("2")
        page.get_by_role("button", name="Generate").tap()
        expect(gallery_items(page)).to_have_count(1)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        context.close()
