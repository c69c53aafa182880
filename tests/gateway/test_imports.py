"""The gateway is a client of the gRPC contract and nothing else: importing all of it loads no runtime module,
no ONNX Runtime, no PyTorch, no compiler and no model store."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

FORBIDDEN = ("runtime", "onnxruntime", "torch", "diffusers", "transformers", "compiler", "quantize", "model_store",
             "onnx", "numpy")


def test_gateway_imports_only_the_contract() -> None:
    code = (
        "import pkgutil, importlib, sys, gateway\n"
        "mods = [m.name for m in pkgutil.walk_packages(gateway.__path__, 'gateway.')]\n"
        "[importlib.import_module(m) for m in mods]\n"
        "from gateway.app import create_app\n"
        "from gateway.config import GatewayConfig\n"
        "create_app(GatewayConfig())\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))\n"
        "print(len(mods), bad)\n"
        "assert 'proto' in sys.modules and 'fastapi' in sys.modules\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[0]) >= 10
