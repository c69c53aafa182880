#!/usr/bin/env bash
# make demo: build the default model, compile it, serve it, generate one image over gRPC, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=.venv/bin/kiln
DEMO=demo
PORT=${DEMO_PORT:-50551}
ARCH=${DEMO_ARCH:-shapes}
PROMPT=${DEMO_PROMPT:-"a large red circle on a blue background"}

rm -rf "$DEMO/store" "$DEMO/model"
mkdir -p "$DEMO"
$KILN models init "$DEMO/model" --arch "$ARCH"
$KILN compile "$DEMO/model" --name "$ARCH" --store "$DEMO/store"

$KILN serve --store "$DEMO/store" --port "$PORT" > "$DEMO/serve.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
$KILN wait --target "127.0.0.1:$PORT" --timeout 120
$KILN generate --target "127.0.0.1:$PORT" --model "$ARCH" --prompt "$PROMPT" --seed 7 --out "$DEMO/out.png"
.venv/bin/python -m bench.check_image "$DEMO/out.png"
echo "demo image: $DEMO/out.png (server log: $DEMO/serve.log)"
