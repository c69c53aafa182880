"""One `precision` measurement in a fresh process: load a bundle with the runtime, time a UNet step and a
whole generation per size, save the image, report peak RSS. Run by bench/precision.py."""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("--sizes", default="512")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", required=True)
    p.add_argument("--images", required=True, help="folder for the generated images (.npy per size)")
    args = p.parse_args()

    from model_store import BundleRef, Manifest
    from proto.kiln.v1 import kiln_pb2 as pb
    from runtime.model import load_bundle
    from runtime.pipeline import Generation, Pipeline
    from runtime.validate import validate

    bundle = Path(args.bundle)
    t0 = time.perf_counter()
    model = load_bundle(BundleRef(bundle, Manifest.read(bundle)))
    result: dict = {"load_s": time.perf_counter() - t0}
    pipe = Pipeline(model)
    Path(args.images).mkdir(parents=True, exist_ok=True)
    for size in (int(s) for s in args.sizes.split(",")):
        request = pb.GenerateRequest(prompt="a photograph of an astronaut riding a horse", width=size, height=size,
                                     steps=args.steps, sampler="dpmpp_2m_karras", guidance_scale=7.5, seed=1)
        params = validate(request, model.manifest.defaults, model.manifest.limits)
        gen = Generation(params, model)
        pipe.tokenize(gen)
        pipe.encode_text(gen)
        pipe.prepare(gen)
        feed = pipe.unet_inputs(gen)
        unet = model.sessions["unet"]
        unet.run(feed)  # warm-up: first-call allocations
        times = []
        for _ in range(3):
            t = time.perf_counter()
            unet.run(feed)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        images, _ = pipe.run(params)
        e2e = time.perf_counter() - t
        np.save(Path(args.images) / f"{size}.npy", images[0])
        result[str(size)] = {"unet_step_s": float(np.median(times)), "e2e_s": e2e}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
