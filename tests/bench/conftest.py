"""What the bench tests share: a bench workspace whose model and store are the session's tiny ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import workspace


@pytest.fixture
def tiny_workspace(tiny_source: Path, tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`bench/work` for one test: `models/tiny-seed0` and `store/tiny` link to the session's tiny model and bundle."""
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "tiny-seed0").symlink_to(tiny_source, target_is_directory=True)
    (work / "store").mkdir()
    (work / "store" / "tiny").symlink_to(tiny_store / "tiny", target_is_directory=True)
    monkeypatch.setattr(workspace, "WORK", work)
    return work
