"""A serving box needs no PyTorch: importing every runtime module leaves torch and the compiler out."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, free_port

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


def _imported(stderr: str) -> set[str]:
    """Top-level module names from `python -X importtime` output ("import time: self | cumulative | name")."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name.split(".")[0])
    return names


def _kiln_script() -> str:
    """The installed `kiln` console script: the entry point a user runs."""
    script = Path(sys.executable).parent / "kiln"
    assert script.is_file(), f"{script} is missing: the package is not installed in this environment"
    return str(script)


def test_serve_and_generate_entry_points_import_no_compiler(tiny_store: Path, tmp_path: Path) -> None:
    """The real `kiln serve`, then `kiln generate`, `kiln models list` and `kiln wait` against it: none of them
    imports compiler/, quantize/, torch or onnx (the parser is built for every command, so this also covers it)."""
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", _kiln_script(), "serve", "--store",
                                 str(tiny_store), "--port", str(port)], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    try:
        clients = {}
        for args in (["wait", "--target", target, "--timeout", "60"],
                     ["models", "list", "--target", target],
                     ["generate", "--target", target, "--model", "tiny", "--prompt", "a red circle", "--seed", "1",
                      "--steps", "2", "--quiet", "--out", str(tmp_path / "out.png")]):
            r = subprocess.run([sys.executable, "-X", "importtime", _kiln_script(), *args], cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr[-3000:]
            clients[args[0]] = _imported(r.stderr)
        assert (tmp_path / "out.png").stat().st_size > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    served = _imported(log.read_text())
    assert "runtime" in served and "grpc" in served  # the log holds the import trace
    assert "runtime" in clients["generate"]
    for command, names in {"serve": served, **clients}.items():
        bad = sorted(names & set(FORBIDDEN))
        assert not bad, f"`kiln {command}` imported {bad}"
    # the HTTP gateway is loaded only when asked for (`--gateway-port`): a plain gRPC server reads its config
    # dataclass for the flags, and starts without its web stack
    web = {"fastapi", "uvicorn", "starlette", "pydantic"}
    assert not served & web, sorted(served & web)
