"""An int8 compile with `--tiny-decoder`: the quantize stage calibrates and gates the components its plan names
and leaves the tiny decoder fp32 (it is a few hundred KB of convolutions; its parity was checked at export), and
the bundle serves both decoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compiler.compile import compile_model
from compiler.config import CompileConfig
from compiler.source.options import SourceOptions
from proto.kiln.v1 import kiln_pb2 as pb
from quantize.config import QuantizeConfig
from runtime.pipeline import Pipeline
from runtime.validate import validate
from tests.conftest import VaeFiles, load_latest
from tests.quantize.test_compile_precisions import FAST


def test_int8_compile_with_a_tiny_decoder(tiny_source: Path, vae_files: VaeFiles, tmp_path: Path) -> None:
    config = CompileConfig(name="int8-tiny", precision="int8", default_steps=4, quantize=QuantizeConfig(**FAST))  # type: ignore[arg-type]
    compile_model(tiny_source, tmp_path, config, progress=False, options=SourceOptions(tiny_decoder=str(vae_files.taesd)))
    model = load_latest(tmp_path, "int8-tiny")
    m = model.manifest
    assert m.precision["unet"] == "int8" and m.precision["vae_decoder_tiny"] == "fp32"
    assert not m.components["vae_decoder_tiny"].quantization and m.fidelity["passed"]
    assert list(model.decoders) == ["full", "tiny"]
    for decoder in ("full", "tiny"):
        request = pb.GenerateRequest(model="int8-tiny", prompt="a red circle", steps=4, seed=1, decoder=decoder)
        params = validate(request, m.defaults, m.limits, decoders=tuple(model.decoders))
        image = Pipeline(model).run(params)[0][0]
        assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 1
