"""Every figure's source can be reproduced: each result file records its command, date, machine (CPU and flags
or a note that they were not recorded) and a commit with no uncommitted changes, and every `python -m bench`
command the README quotes is exactly the command a result file records."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

RESULTS = sorted((ROOT / "bench" / "results").glob("*.md"))


def header(path: Path, field: str) -> str:
    m = re.search(rf"^- {field}: (.*)$", path.read_text(), re.M)
    assert m, f"{path.name} has no '- {field}:' line"
    return m.group(1).strip()


def normalized(command: str) -> str:
    return " ".join(command.split())


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_a_result_names_its_command_machine_and_a_committed_tree(path: Path) -> None:
    assert header(path, "command").startswith("`python -m bench ")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", header(path, "date"))
    machine = header(path, "machine")
    assert re.search(r"(Intel|AMD|Xeon|EPYC)", machine), machine
    assert "avx2" in machine or "not recorded" in header(path, "cpu flags"), f"{path.name} names no CPU flags"
    commit = header(path, "kiln commit")
    assert re.fullmatch(r"[0-9a-f]{7,40}", commit), f"{path.name} was measured on '{commit}', not a committed tree"


def test_every_bench_command_the_readme_quotes_is_a_recorded_one() -> None:
    recorded = {normalized(header(p, "command").strip("`")): p.name for p in RESULTS}
    quoted = {normalized(m) for m in re.findall(r"`(python -m bench [^`]*)`", (ROOT / "README.md").read_text())}
    # pointers to a scenario, not to a figure: `python -m bench ...`, the scenario list, `--help`
    citations = {c for c in quoted if "..." not in c and "\\|" not in c and not c.endswith("--help")}
    assert citations, "the README quotes no bench command"
    missing = sorted(citations - recorded.keys())
    assert not missing, f"README quotes commands no result file records: {missing}"
