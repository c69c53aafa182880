#!/usr/bin/env bash
# make demo: build the default model, compile it, serve it, generate one image over gRPC, then edit it over
# gRPC (img2img: recolour the shape; inpainting: redraw the left half); then one image over the HTTP gateway
# (AUTOMATIC1111's txt2img) and a screenshot of its web page; stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=.venv/bin/kiln
DEMO=demo
PORT=${DEMO_PORT:-50551}
HTTP_PORT=${DEMO_HTTP_PORT:-7861}
ARCH=${DEMO_ARCH:-shapes}
PROMPT=${DEMO_PROMPT:-"a large red circle on a blue background"}

rm -rf "$DEMO/store" "$DEMO/model"
mkdir -p "$DEMO"
$KILN models init "$DEMO/model" --arch "$ARCH"
$KILN compile "$DEMO/model" --name "$ARCH" --store "$DEMO/store"

$KILN serve --store "$DEMO/store" --port "$PORT" --gateway-port "$HTTP_PORT" > "$DEMO/serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
$KILN wait --target "127.0.0.1:$PORT" --timeout 120
$KILN generate --target "127.0.0.1:$PORT" --model "$ARCH" --prompt "$PROMPT" --seed 7 --out "$DEMO/out.png"
.venv/bin/python -m bench.check_image "$DEMO/out.png"
echo "demo image: $DEMO/out.png (server log: $DEMO/serve.log)"

if [ "$ARCH" = shapes ]; then
  # img2img: start from the image above, 75% redrawn toward a new prompt
  $KILN generate --target "127.0.0.1:$PORT" --model "$ARCH" --init-image "$DEMO/out.png" --strength 0.75 --steps 8 \
    --prompt "a large green circle on a blue background, on the right" --seed 7 --out "$DEMO/img2img.png"
  .venv/bin/python -m bench.check_image "$DEMO/img2img.png"
  # inpainting: white = redraw (the left half), black = keep
  .venv/bin/python -c "import numpy as np; from PIL import Image; m = np.zeros((64, 64), np.uint8); m[:, :32] = 255; \
Image.fromarray(m).save('$DEMO/mask-left.png')"
  $KILN generate --target "127.0.0.1:$PORT" --model "$ARCH" --init-image "$DEMO/out.png" --mask "$DEMO/mask-left.png" \
    --mask-blur 2 --steps 8 --prompt "a small yellow square on a blue background, on the left" --seed 7 \
    --out "$DEMO/inpaint.png"
  .venv/bin/python scripts/strip.py "$DEMO/out.png" "$DEMO/img2img.png" "$DEMO/mask-left.png" "$DEMO/inpaint.png" \
    --out "$DEMO/edits.png"
  echo "edits: $DEMO/img2img.png, $DEMO/inpaint.png (side by side: $DEMO/edits.png)"
fi

# the same server over HTTP: AUTOMATIC1111's txt2img through the gateway, then its web page in headless Chromium
.venv/bin/python - "$HTTP_PORT" "$PROMPT" "$DEMO/http.png" <<'PY'
import base64, json, sys, urllib.request
port, prompt, out = sys.argv[1:]
body = json.dumps({"prompt": prompt, "seed": 7, "sampler_name": "Euler"}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", body, {"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(request, timeout=300))
open(out, "wb").write(base64.b64decode(answer["images"][0]))
print("over HTTP (AUTOMATIC1111 API):", json.loads(answer["info"])["infotexts"][0].replace("\n", " | "))
PY
.venv/bin/python -m bench.check_image "$DEMO/http.png"
.venv/bin/python scripts/web_screenshot.py --url "http://127.0.0.1:$HTTP_PORT" --prompt "$PROMPT" --out "$DEMO/web.png"
echo "the web page and the AUTOMATIC1111/OpenAI APIs: kiln serve --store $DEMO/store --gateway-port $HTTP_PORT," \
  "then http://127.0.0.1:$HTTP_PORT/ (API docs at /docs)"
