"""One Kiln measurement in a fresh process: cold start, warm latency and peak RSS of the runtime on one bundle.

The Kiln twin of bench/peers/run_peer.py, with the same JSON fields, so the `latency` scenario puts Kiln and the
peers in one table: `python -m bench.kiln_worker --bundle DIR [--engine openvino] --size 512 --steps 4 --guidance 7.5
--latents X.npy --repeats 3 --out R.json`. Cold start runs from the kernel's start of this process to the first image:
interpreter start, importing the runtime (which never imports torch), opening the bundle's sessions, one generation.

`--cache-dir DIR` opens the bundle as `kiln serve --cache-dir DIR` does: verified sha256s remembered in DIR, ONNX
Runtime's optimized graphs and OpenVINO's compiled models cached under it (runtime/graph_cache.py). `--prime` only
opens the bundle (filling those caches, as a server's first start does; with OpenVINO's static shapes it also runs
the request once, since those compile per shape when a request brings it) and writes how long opening took.
"""

from __future__ import annotations

import os
import time

_T_TOP = time.perf_counter()


def _process_age_s() -> float:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


_AGE_AT_TOP = _process_age_s()

import argparse  # noqa: E402 (the clock above starts before any import that takes time)
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kiln_worker")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--engine", default="onnxruntime", choices=["onnxruntime", "openvino"])
    p.add_argument("--openvino-precision", default="", help="bf16 | f32 (default: OpenVINO's own)")
    p.add_argument("--openvino-static-shapes", action="store_true", help="OpenVinoConfig.static_shapes")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--guidance-end", type=float, default=1.0, help="GenerateRequest.guidance_end")
    p.add_argument("--decoder", default="full", choices=["full", "tiny"], help="GenerateRequest.decoder")
    p.add_argument("--cache-dir", type=Path, help="hash, graph and OpenVINO caches, as `kiln serve --cache-dir`")
    p.add_argument("--prime", action="store_true", help="open the bundle (filling --cache-dir) and stop")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--latents", type=Path, required=True)
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    t_import = time.perf_counter()
    import numpy as np
    from PIL import Image

    from model_store import BundleRef, Manifest
    from model_store.integrity import HashCache
    from proto.kiln.v1 import kiln_pb2 as pb
    from runtime.graph_cache import GRAPHS_DIR, OPENVINO_DIR, GraphCache
    from runtime.model import load_bundle
    from runtime.pipeline import Pipeline
    from runtime.validate import validate

    t_load = time.perf_counter()
    manifest = Manifest.read(args.bundle)
    cache = args.cache_dir
    openvino = None
    if args.engine == "openvino":
        from runtime.sessions_openvino import OpenVinoConfig

        openvino = OpenVinoConfig(precision=args.openvino_precision or "default", threads=args.threads,
                                  static_shapes=args.openvino_static_shapes,
                                  cache_dir=str(cache / OPENVINO_DIR) if cache else "")
    hashes = HashCache(cache, persist=cache is not None)
    model = load_bundle(BundleRef(args.bundle, manifest), threads=args.threads, engine=args.engine, openvino=openvino,
                        hashes=hashes, graphs=GraphCache(cache / GRAPHS_DIR) if cache else None)
    hashes.save()
    graph_cache = {name: getattr(s, "graph_cache", "off") for name, s in model.sessions.items()}
    loaded_s = time.perf_counter() - t_load
    request = pb.GenerateRequest(model=manifest.name, prompt=args.prompt, width=args.size, height=args.size,
                                 steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance, seed=args.seed,
                                 guidance_end=args.guidance_end, decoder=args.decoder)
    params = validate(request, manifest.defaults, manifest.limits, decoders=tuple(model.decoders))
    latents = np.load(args.latents)
    pipe = Pipeline(model)
    if args.prime:
        if args.openvino_static_shapes:  # static shapes compile when a request brings them: serve one, as a server would
            pipe.run(params, latents=latents)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"load_s": round(loaded_s, 3), "graph_cache": graph_cache}, indent=2) + "\n")
        return 0
    t_first = time.perf_counter()
    first_images, first_gen = pipe.run(params, latents=latents)
    t_done = time.perf_counter()
    image = first_images[0]
    rss_cold = peak_rss_bytes()
    warm, stages = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        images, gen = pipe.run(params, latents=latents)
        warm.append(time.perf_counter() - t0)
        pipe.encode_png(gen, 0, images[0])  # timed in the stages, not in the warm latency (peers make no PNG)
        stages.append(gen.timings)
    phases = {"interpreter_s": _AGE_AT_TOP + (t_import - _T_TOP), "import_s": t_load - t_import,
              "load_s": t_first - t_load, "first_image_s": t_done - t_first}
    png = args.out.with_suffix(".png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(png)
    result = {
        "pipeline": f"kiln-{args.engine}", "bundle": str(args.bundle), "precision": manifest.precision,
        "size": args.size, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
        "cold_start_s": round(sum(phases.values()), 3), "phases": {k: round(v, 3) for k, v in phases.items()},
        "warm_s": [round(t, 3) for t in warm], "median_warm_s": round(statistics.median(warm), 3) if warm else None,
        "stages": {k: round(statistics.median(t.get(k, 0.0) for t in stages), 4)
                   for k in sorted({k for t in stages for k in t})},
        "first_image_stages": {k: round(v, 4) for k, v in first_gen.timings.items()},
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_after_first_image_bytes": rss_cold,
        "torch_imported": "torch" in sys.modules, "image": str(png), "graph_cache": graph_cache,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
