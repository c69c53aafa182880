"""Virtual environments for the peer pipelines, made once under bench/work/venvs/<name> and reused.

Optimum and optimum-intel pin their own transformers / huggingface_hub / optimum, which clash with each other and with
Kiln's .venv, so each peer gets its own environment. Every requirement is pinned to a version checked to install and
run here; torch always comes from constraints-cpu.txt (the CPU wheel), as in the Makefile. A stamp file keyed on the
pins, the constraints and the Python version lets reruns skip pip entirely.

`python -m bench.peers.venvs [NAME ...]` makes them ahead of a benchmark (a few minutes and ~1.5 GB each).
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import workspace

CONSTRAINTS = workspace.ROOT / "constraints-cpu.txt"
"""Pins torch to the on-disk CPU wheel (any other torch spec pulls GBs of CUDA libraries)."""


@dataclass(frozen=True)
class PeerEnv:
    """One peer's virtual environment."""

    name: str
    """Folder name under bench/work/venvs/ and the `--pipeline` it serves."""
    requirements: tuple[str, ...]
    """Exact pip requirement specs: the top-level packages and the transitive ones that decide behaviour."""
    remove: tuple[str, ...] = ()
    """Packages a dependency drags in that cannot work here, uninstalled right after the install."""

    @property
    def path(self) -> Path:
        return workspace.WORK / "venvs" / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def key(self) -> str:
        """Hash of everything that decides the environment's contents; a change rebuilds it."""
        h = hashlib.sha256()
        h.update(sys.version.encode())
        h.update("\n".join(self.requirements + ("--remove", *self.remove)).encode())
        h.update(CONSTRAINTS.read_bytes())
        return h.hexdigest()


ENVS = {
    "optimum": PeerEnv("optimum", (
        "optimum-onnx[onnxruntime]==0.1.0",
        "optimum==2.1.0",
        # the same ONNX Runtime as Kiln's .venv, so the ORT comparison is runtime-for-runtime
        "onnxruntime==1.31.1",
        "onnx==1.23.2",
        "transformers==4.57.6",  # optimum-onnx 0.1.0 needs transformers<4.58
        "huggingface_hub==0.36.2",
        "diffusers==0.39.0",  # the newest diffusers that resolves with transformers 4.57's hub pin
        "torch==2.13.0",
        "numpy==2.4.6",
        "pillow==13.0.0",
    )),
    "openvino": PeerEnv("openvino", (
        "optimum-intel[openvino]==2.2.0",
        "optimum==2.3.0",
        "openvino==2026.4.1",
        "openvino-tokenizers==2026.4.1.0",
        "nncf==3.4.0",
        "transformers==5.5.4",  # optimum-intel 2.2.0 needs transformers<5.6
        "huggingface_hub==1.21.0",
        "diffusers==0.39.0",
        "torch==2.13.0",
        "numpy==2.4.6",
        "pillow==13.0.0",
    ),
        # optimum-intel requires torchvision, but PyPI's torchvision 0.28 (the build for torch 2.13) is linked
        # against CUDA torch: with the CPU torch, `import torchvision` fails ("operator torchvision::nms does not
        # exist") and takes transformers' image utilities down with it. Without it transformers uses its PIL
        # fallbacks, as in Kiln's .venv; nothing in the SD pipeline needs it.
        remove=("torchvision",)),
}
"""The peers that need their own environment. `diffusers` runs in Kiln's own .venv (sys.executable)."""

PIPELINES = ("diffusers", *ENVS)
"""Every peer `--pipeline`."""


def _say(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def ensure(pipeline: str, log: Callable[[str], None] = _say) -> Path:
    """The Python interpreter that runs `pipeline`, making its environment first if it is missing or stale."""
    if pipeline == "diffusers":
        return Path(sys.executable)
    if pipeline not in ENVS:
        raise ValueError(f"pipeline={pipeline!r} is not one of {', '.join(PIPELINES)}")
    env = ENVS[pipeline]
    stamp = env.path / ".kiln-stamp"
    key = env.key()
    env.path.parent.mkdir(parents=True, exist_ok=True)
    # two benchmark processes asking at once: the second waits and then finds the stamp
    with open(env.path.parent / f".{env.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if env.python.exists() and stamp.exists() and stamp.read_text() == key:
            return env.python
        if env.path.exists():
            log(f"{env.path} is stale or incomplete: rebuilding it")
            shutil.rmtree(env.path)
        t0 = time.perf_counter()
        log(f"creating virtual environment {env.path}")
        subprocess.run([sys.executable, "-m", "venv", str(env.path)], check=True)
        log(f"installing {len(env.requirements)} pinned packages and their dependencies into {env.name} "
            "(a few minutes, ~1.5 GB): " + " ".join(env.requirements))
        subprocess.run([str(env.python), "-m", "pip", "install", "--progress-bar", "off", "-qq",
                        "--disable-pip-version-check", "-c", str(CONSTRAINTS), *env.requirements], check=True)
        if env.remove:
            subprocess.run([str(env.python), "-m", "pip", "uninstall", "--yes", "--quiet", *env.remove], check=True)
        stamp.write_text(key)
        log(f"{env.name} environment ready in {time.perf_counter() - t0:.0f} s")
    return env.python


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or list(ENVS)
    for name in names:
        print(ensure(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
