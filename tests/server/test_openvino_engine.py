"""`kiln serve --engine openvino` on a real server process: a `--no-fusions` bundle serves through OpenVINO and
gives the image ONNX Runtime gives, within a few levels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import kiln, start_server

pytest.importorskip("openvino")


def test_openvino_engine_serves_a_plain_bundle(tiny_source: Path, tiny_store: Path, tmp_path: Path) -> None:
    from compiler.compile import compile_model
    from compiler.config import CompileConfig

    store = tmp_path / "store"
    compile_model(tiny_source, store, CompileConfig(name="plain", fusions=False), progress=False)
    ov = start_server(store, tmp_path / "ov.log", "--engine", "openvino", "--openvino-precision", "f32")
    ort = start_server(store, tmp_path / "ort.log")
    static = start_server(store, tmp_path / "static.log", "--engine", "openvino", "--openvino-precision", "f32",
                          "--openvino-static-shapes")
    try:
        images = []
        for server in (ov, static, ort):
            out = tmp_path / f"{server.target.replace(':', '_')}.png"
            r = kiln("generate", "--target", server.target, "--model", "plain", "--prompt", "a red circle",
                     "--seed", "3", "--steps", "3", "--out", str(out), "--quiet")
            assert r.returncode == 0, r.stderr
            images.append(np.asarray(Image.open(io.BytesIO(out.read_bytes())), dtype=np.int16))
        assert np.abs(images[0] - images[2]).max() <= 8 and np.abs(images[1] - images[2]).max() <= 8
        assert "loaded plain version" in ov.log()
    finally:
        ov.stop()
        ort.stop()
        static.stop()


def test_auto_engine_picks_per_bundle_and_says_so(tiny_source: Path, tiny_store: Path, tmp_path: Path) -> None:
    """`--engine auto`: OpenVINO for a bundle it reads where this CPU has AMX, ONNX Runtime for an nf4 bundle (which
    OpenVINO cannot read) and everywhere on CPUs without AMX; ListModels and the load log name the choice."""
    import shutil

    from compiler.compile import compile_model
    from compiler.config import CompileConfig
    from quantize.config import QuantizeConfig
    from runtime.client import list_models
    from runtime.cpu import cpu_flag_set

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)  # its fp32 graphs are reused by the nf4 compile
    compile_model(tiny_source, store, CompileConfig(name="tiny-nf4", precision="unet=nf4", quantize=QuantizeConfig(
        calibration_prompts=1, fidelity_prompts=1, min_psnr=15.0)), progress=False)
    amx = bool(cpu_flag_set() & {"amx_bf16", "amx_int8"})
    want = {"tiny": "openvino" if amx else "onnxruntime", "tiny-nf4": "onnxruntime"}
    server = start_server(store, tmp_path / "auto.log", "--engine", "auto")
    try:
        engines = {m.name: m.engine for m in list_models(server.target).models}
        assert engines == want, (engines, sorted(cpu_flag_set() & {"avx2", "avx512f", "amx_bf16", "amx_int8"}))
        for name in want:
            out = tmp_path / f"{name}.png"
            r = kiln("generate", "--target", server.target, "--model", name, "--prompt", "a red circle", "--seed", "3",
                     "--steps", "2", "--out", str(out), "--quiet")
            assert r.returncode == 0, r.stderr
            assert np.asarray(Image.open(out)).std() > 0
        log = server.log()
        assert f"engine auto -> {want['tiny']} (this CPU has" in log
        assert "engine auto -> onnxruntime (its nf4 components are not ones OpenVINO reads)" in log
    finally:
        server.stop()
