"""`kiln serve --device/--providers`: provider selection, no silent CPU fall-back, and the IO-binding path (run on
the CPU provider here; on a GPU it binds on the device)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime.device import DeviceConfig, binding_device, provider_names
from runtime.sessions import OrtSession
from tests.conftest import kiln

CPU_BUILD = "CUDAExecutionProvider" not in ort.get_available_providers()
GPU_BUILD_ONLY = pytest.mark.skipif(CPU_BUILD, reason="needs onnxruntime-gpu with a GPU: checks that CUDA is used")
CPU_BUILD_ONLY = pytest.mark.skipif(not CPU_BUILD, reason="checks the error the CPU build of onnxruntime gives")
ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cpu_is_the_default_and_cuda_brings_the_cpu_as_fallback_for_unsupported_nodes(tmp_path: Path) -> None:
    assert DeviceConfig().resolve(ALL) == ["CPUExecutionProvider"]
    assert DeviceConfig("cuda").resolve(ALL) == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    spec = DeviceConfig("cuda:3", ("tensorrt", "cuda", "cpu"), tmp_path).resolve(ALL)
    assert provider_names(spec) == ALL
    trt = dict(spec[0][1])  # type: ignore[index]
    assert trt["device_id"] == 3 and trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"] == str(tmp_path)
    assert spec[1] == ("CUDAExecutionProvider", {"device_id": 3})
    assert binding_device(spec) == ("cuda", 3)
    assert binding_device(["CPUExecutionProvider"]) is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device": "gpu"}, r"device='gpu' must be cpu, cuda or cuda:N"),
    ({"device": "cpu:0"}, r"device='cpu:0' must be cpu, cuda or cuda:N"),
    ({"device": "cuda:x"}, r"must be cpu, cuda or cuda:N"),
    ({"device": "cpu", "providers": ("cuda",)}, r"asks for cuda but device=cpu"),
    ({"device": "cuda", "providers": ("cpu",)}, r"has no GPU provider"),
    ({"device": "cuda", "providers": ("rocm",)}, r"'rocm' is not one of cpu, cuda, tensorrt"),
    ({"device": "cuda", "providers": ("cuda", "cuda")}, r"names a provider twice"),
    ({"device": "cuda", "providers": ("tensorrt", "cuda")}, r"give --trt-cache DIR"),
])
def test_bad_device_settings_name_the_value_and_the_rule(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeviceConfig(**kwargs)


def test_a_provider_the_installed_onnxruntime_lacks_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"device=cuda:1 needs CUDAExecutionProvider, but this onnxruntime offers "
                                         r"only CPUExecutionProvider \(the CPU build of onnxruntime is installed"):
        DeviceConfig("cuda:1").resolve(["CPUExecutionProvider"])


@CPU_BUILD_ONLY
def test_kiln_serve_on_cuda_with_the_cpu_build_exits_with_the_reason(tmp_path: Path) -> None:
    r = kiln("serve", "--store", str(tmp_path), "--device", "cuda", "--port", "0")
    assert r.returncode == 2
    assert "needs CUDAExecutionProvider" in r.stderr and "install onnxruntime-gpu" in r.stderr


@CPU_BUILD_ONLY
def test_a_session_never_falls_back_to_the_cpu_silently(tiny_bundle: Path) -> None:
    """ONNX Runtime itself only logs when a requested provider cannot start and runs on the CPU instead."""
    with pytest.raises(RuntimeError, match=r"could not start CUDAExecutionProvider \(it fell back to "
                                           r"CPUExecutionProvider\)"):
        OrtSession("unet", tiny_bundle / "unet.onnx", [("CUDAExecutionProvider", {"device_id": 0}),
                                                       "CPUExecutionProvider"])


@GPU_BUILD_ONLY
def test_sessions_run_on_the_gpu_when_asked(tiny_bundle: Path) -> None:
    spec = DeviceConfig("cuda").resolve(ort.get_available_providers())
    session = OrtSession("unet", tiny_bundle / "unet.onnx", spec)
    assert session.providers[0] == "CUDAExecutionProvider"


def _unet_feed(tiny_model, batch: int = 2) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    m = tiny_model.manifest.model
    rng = np.random.default_rng(0)
    size = 64 // m["vae_scale_factor"]
    return {
        "sample": rng.standard_normal((batch, m["unet_in_channels"], size, size), dtype=np.float32),
        "timestep": np.full((batch,), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, m["text_hidden_size"]), dtype=np.float32),
    }


def test_io_binding_matches_the_plain_call_and_keeps_embeddings_resident(tiny_bundle: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    plain = OrtSession("unet", tiny_bundle / "unet.onnx")
    bound = OrtSession("unet", tiny_bundle / "unet.onnx", io_binding=True)
    feed = _unet_feed(tiny_model)
    want = plain.run(feed)["out_sample"]
    np.testing.assert_array_equal(bound.run(feed)["out_sample"], want)
    assert bound.uploads == 3
    # the next step: new latents and timestep, the same embeddings array -> only two uploads
    step = {**feed, "sample": feed["sample"] * 0.5, "timestep": np.full((2,), 400.0, np.float32)}
    np.testing.assert_array_equal(bound.run(step)["out_sample"], plain.run(step)["out_sample"])
    assert bound.uploads == 5
    # a new embeddings array (another request), even with equal values, is uploaded again
    other = {**step, "encoder_hidden_states": feed["encoder_hidden_states"].copy()}
    np.testing.assert_array_equal(bound.run(other)["out_sample"], plain.run(step)["out_sample"])
    assert bound.uploads == 8
