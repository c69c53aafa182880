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
    try:
        images = []
        for server in (ov, ort):
            out = tmp_path / f"{server.target.replace(':', '_')}.png"
            r = kiln("generate", "--target", server.target, "--model", "plain", "--prompt", "a red circle",
                     "--seed", "3", "--steps", "3", "--out", str(out), "--quiet")
            assert r.returncode == 0, r.stderr
            images.append(np.asarray(Image.open(io.BytesIO(out.read_bytes())), dtype=np.int16))
        assert np.abs(images[0] - images[1]).max() <= 8
        assert "loaded plain version" in ov.log()
    finally:
        ov.stop()
        ort.stop()
