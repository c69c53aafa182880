"""A serving box needs no PyTorch: importing every runtime module leaves torch and the compiler out."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

FORBIDDEN = ("torch", "diffusers", "transformers", "compiler", "quantize", "onnx")


def test_runtime_imports_without_torch() -> None:
    code = (
        "import pkgutil, importlib, sys, runtime\n"
        "mods = [m.name for m in pkgutil.walk_packages(runtime.__path__, 'runtime.')]\n"
        "[importlib.import_module(m) for m in mods]\n"
        "import cli.main\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
        "print(len(mods), bad)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[0]) >= 15  # walked the whole package, not an empty one
