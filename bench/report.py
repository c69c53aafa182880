"""Markdown result files: the table plus the exact command, the machine and the date."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    """CPU model and the flags that pick int8/bf16 kernels, whether int8 U8S8 kernels saturate here (issue 21:
    int8 figures from CPUs with and without VNNI differ), cores, memory, OS and Python."""
    from runtime import cpu

    try:
        verdict = cpu.int8_verdict()
        int8 = f"int8 U8S8 kernels {'saturate' if verdict.probed else 'exact'} (probed)"
    except Exception as e:  # a result file is still worth writing without the probe
        int8 = f"int8 kernels not probed ({type(e).__name__})"
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (f"{cpu.cpu_model()} ({cpu.describe_flags()}; {int8}), {os.cpu_count()} cores{mem}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def versions(*packages: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for p in packages:
        try:
            out.append(f"{p} {version(p)}")
        except PackageNotFoundError:
            continue
    return ", ".join(out)


def git_rev() -> str:
    """The short commit, with " + uncommitted changes" when tracked files other than results differ from it (a
    result measured on a tree no commit holds says so)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!bench/results"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted changes" if dirty else "")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write(name: str, title: str, body: str, argv: list[str] | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    argv = argv if argv is not None else sys.argv[1:]
    command = "python -m bench " + " ".join(shlex.quote(a) for a in argv)
    text = (
        f"# {title}\n\n"
        f"- command: `{command}`\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        f"- machine: {machine()}\n"
        f"- software: {versions('onnxruntime', 'torch', 'diffusers', 'transformers', 'numpy')}\n"
        f"- kiln commit: {git_rev()}\n\n"
        f"{body.strip()}\n"
    )
    path = Path(name) if Path(name).is_absolute() else RESULTS / f"{name}.md"
    path.write_text(text)
    return path
