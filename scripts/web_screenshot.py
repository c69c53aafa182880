"""A screenshot of the gateway's web page after one generation, in Debian's headless Chromium (Playwright):
`python scripts/web_screenshot.py --url http://127.0.0.1:7861 --prompt "..." --out page.png`. `make demo` runs it
on the shapes model; the README's picture of the page is its output."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image
from playwright.sync_api import expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:7861")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"web_screenshot: {CHROMIUM} is missing (Debian: apt-get install chromium); no screenshot",
              file=sys.stderr)
        return 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 820})
        page.set_default_timeout(120_000)
        page.goto(args.url.rstrip("/") + "/")
        expect(page.get_by_label("Model").locator("option")).not_to_have_count(0)
        page.get_by_label("Prompt", exact=True).fill(args.prompt)
        page.get_by_label("Images").fill(str(args.images))
        page.get_by_label("Random seed").uncheck()
        page.get_by_label("Seed", exact=True).fill(str(args.seed))
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("status")).to_contain_text("Done in")
        shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB").quantize(256)
        browser.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shot.save(args.out, optimize=True)
    print(f"web page screenshot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
