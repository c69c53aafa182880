"""bench/report.py: every result file says which CPU made its figures (model, int8/bf16 flags, int8 verdict)."""

from __future__ import annotations

from pathlib import Path

from bench import report
from runtime import cpu


def test_result_files_name_the_cpu_and_its_flags(tmp_path: Path) -> None:
    path = report.write(str(tmp_path / "r.md"), "Title", "| a |\n|---|\n| 1 |", argv=["x"])
    line = next(x for x in path.read_text().splitlines() if x.startswith("- machine: "))
    assert line.startswith(f"- machine: {cpu.cpu_model()} (")
    assert all(flag in line for flag in cpu.FLAGS)
    flags = cpu.cpu_flags()
    have = [f for f in cpu.FLAGS if flags[f]]
    if have:
        assert ", ".join(have) + " yes" in line
    verdict = "saturate" if cpu.int8_verdict().probed else "exact"
    assert f"int8 U8S8 kernels {verdict} (probed)" in line
