"""ONNX Runtime sessions: every CPU session of a process allocates from one shared arena."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.sessions import OrtSession


def test_sessions_share_one_cpu_arena_and_still_agree(tiny_bundle: Path) -> None:
    import onnxruntime as ort

    a = OrtSession("vae_decoder", tiny_bundle / "vae_decoder.onnx")
    b = OrtSession("vae_decoder", tiny_bundle / "vae_decoder.onnx")
    for s in (a, b):
        assert s._session.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
    # the same graph with a private arena gives the same numbers
    options = ort.SessionOptions()
    private = ort.InferenceSession(str(tiny_bundle / "vae_decoder.onnx"), options, providers=["CPUExecutionProvider"])
    z = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    want = private.run(None, {private.get_inputs()[0].name: z})[0]
    for s in (a, b):
        got = s.run({s.input_names[0]: z})[s.output_names[0]]
        np.testing.assert_array_equal(got, want)
