"""A bundle whose bytes differ from its manifest is never served: the server falls back to the newest version that
verifies, and remembers verified hashes so that a restart does not hash the store again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from model_store import HashCache, Manifest, Store
from runtime.client import list_models
from runtime.model import load_store
from tests.conftest import start_server
from tests.model_store.test_store import copy_bundle, flip_bytes


@pytest.fixture
def two_versions(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A store with an older and a newer version of `tiny`; the newer one's folder name sorts first."""
    store = Store(tmp_path / "store")
    copy_bundle(tiny_bundle, store, "b-older", "2026-06-01T00:00:00Z")
    copy_bundle(tiny_bundle, store, "a-newer", "2026-06-02T00:00:00Z")
    return store.root


def test_the_server_serves_the_newest_version_by_creation_time(two_versions: Path, tmp_path: Path) -> None:
    server = start_server(two_versions, tmp_path / "serve.log", "--cache-dir", str(tmp_path / "cache"))
    try:
        [model] = list_models(server.target).models
        assert model.version == "a-newer"
    finally:
        server.stop()


def test_a_tampered_newest_version_is_refused_and_the_previous_one_served(two_versions: Path, tmp_path: Path) -> None:
    flip_bytes(two_versions / "tiny" / "a-newer" / "unet.onnx")  # same size, same mtime
    server = start_server(two_versions, tmp_path / "serve.log", "--cache-dir", str(tmp_path / "cache"))
    try:
        [model] = list_models(server.target).models
        assert model.version == "b-older"
        log = server.log()
        assert "skipping bundle tiny version a-newer" in log and "unet.onnx sha256" in log
        assert "differs from the manifest" in log and "trying version b-older" in log
    finally:
        server.stop()


def test_a_model_with_no_intact_version_is_not_served(tiny_bundle: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "store")
    ref = copy_bundle(tiny_bundle, store, "only")
    flip_bytes(ref.path / "text_encoder.onnx")
    assert load_store(store.root) == {}
    assert "text_encoder.onnx sha256" in caplog.text and "no version verified and loaded" in caplog.text


def test_a_restart_reuses_the_verified_hashes_but_not_for_changed_files(two_versions: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = HashCache(cache)
    assert set(load_store(two_versions, hashes=first)) == {"tiny"}
    files = len(Manifest.read(two_versions / "tiny" / "a-newer").files)
    assert first.hashed == files  # only the version that is served was verified
    restart = HashCache(cache)
    load_store(two_versions, hashes=restart)
    assert restart.hashed == 0
    # a file replaced by an edited copy (new inode, then mtime set back) is hashed again and refused
    unet = two_versions / "tiny" / "a-newer" / "unet.onnx"
    shutil.copy2(unet, tmp_path / "unet.onnx")
    flip_bytes(tmp_path / "unet.onnx")
    shutil.move(tmp_path / "unet.onnx", unet)
    third = HashCache(cache)
    assert load_store(two_versions, hashes=third)["tiny"].version == "b-older"
    assert third.hashed == 1 + files  # the replaced file, then every file of the older version
