"""What the bench tests share: a bench workspace whose model and store are the session's tiny ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import workspace


def link_workspace(work: Path, tiny_source: Path, tiny_store: Path, store_name: str) -> Path:
    """`work` as a bench workspace: `models/tiny-seed0` and `store/STORE_NAME` link to the session's tiny model and
    bundle, and bench.workspace.WORK points at it (the caller's monkeypatch undoes that)."""
    (work / "models").mkdir(parents=True)
    (work / "models" / "tiny-seed0").symlink_to(tiny_source, target_is_directory=True)
    (work / "store").mkdir()
    (work / "store" / store_name).symlink_to(tiny_store / "tiny", target_is_directory=True)
    return work


@pytest.fixture
def tiny_workspace(tiny_source: Path, tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`bench/work` for one test: `models/tiny-seed0` and `store/tiny` link to the session's tiny model and bundle."""
    work = link_workspace(tmp_path / "work", tiny_source, tiny_store, "tiny")
    monkeypatch.setattr(workspace, "WORK", work)
    return work


@pytest.fixture
def bench_tiny_workspace(tiny_source: Path, tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The same with the store's bundle named `bench-tiny`, the name `--arch tiny` scenarios compile under, so they
    find it instead of compiling one."""
    work = link_workspace(tmp_path / "work", tiny_source, tiny_store, "bench-tiny")
    monkeypatch.setattr(workspace, "WORK", work)
    return work
