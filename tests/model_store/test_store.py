"""Bundle store: atomic publish, latest version, integrity checks, manifest format."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from model_store import BundleRef, HashCache, Manifest, ManifestError, Store


def copy_bundle(tiny_bundle: Path, store: Store, version: str, created_at: str = "") -> BundleRef:
    staging = store.staging_dir("tiny")
    shutil.rmtree(staging)
    shutil.copytree(tiny_bundle, staging)
    manifest = Manifest.read(staging)
    manifest.version = version
    manifest.created_at = created_at or manifest.created_at
    return store.publish(staging, manifest)


def flip_bytes(path: Path, n: int = 64) -> None:
    """Invert `n` bytes in the middle of the file in place: same size, and mtime set back to what it was."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        block = f.read(n)
        f.seek(st.st_size // 2)
        f.write(bytes(b ^ 0xFF for b in block))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_latest_is_the_newest_version_and_staging_is_ignored(tiny_bundle: Path, tmp_path: Path) -> None:
    store = Store(tmp_path)
    copy_bundle(tiny_bundle, store, "20260101-000000-aaaa", "2026-01-01T00:00:00Z")
    copy_bundle(tiny_bundle, store, "20260102-000000-bbbb", "2026-01-02T00:00:00Z")
    leftover = store.staging_dir("tiny")  # a compile that died
    (leftover / "unet.onnx").write_bytes(b"partial")
    assert store.names() == ["tiny"]
    assert store.versions("tiny") == ["20260101-000000-aaaa", "20260102-000000-bbbb"]
    assert store.latest("tiny").manifest.version == "20260102-000000-bbbb"
    store.clean_staging()
    assert not leftover.exists()
    with pytest.raises(FileExistsError):
        copy_bundle(tiny_bundle, store, "20260102-000000-bbbb")
    assert [p.name for p in (tmp_path / "tiny").iterdir() if p.name.startswith(".")] == []


def test_check_files_catches_missing_resized_and_altered_files(tiny_bundle: Path, tmp_path: Path) -> None:
    ref = copy_bundle(tiny_bundle, Store(tmp_path), "v1")
    ref.check_files(hashes=True)
    data = bytearray((ref.path / "vae_decoder.onnx").read_bytes())
    data[-1] ^= 0xFF
    (ref.path / "vae_decoder.onnx").write_bytes(bytes(data))
    ref.check_files()  # same size: only the hash check sees it
    with pytest.raises(ManifestError, match="vae_decoder.onnx sha256 .* differs"):
        ref.check_files(hashes=True)
    (ref.path / "vae_decoder.onnx").write_bytes(b"short")
    with pytest.raises(ManifestError, match="vae_decoder.onnx has 5 bytes"):
        ref.check_files()
    (ref.path / "vae_decoder.onnx").unlink()
    with pytest.raises(ManifestError, match="vae_decoder.onnx is missing"):
        ref.check_files()


def test_manifest_round_trip_and_unknown_format(tiny_bundle: Path, tmp_path: Path) -> None:
    m = Manifest.read(tiny_bundle)
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    d = json.loads(m.to_json())
    d["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="format_version=99; this Kiln reads 1"):
        Manifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="malformed"):
        Manifest.read(tmp_path)
    with pytest.raises(ManifestError, match="no bundle named 'nope'"):
        Store(tmp_path).latest("nope")


def test_newest_is_decided_by_creation_time_not_folder_names(tiny_bundle: Path, tmp_path: Path) -> None:
    store = Store(tmp_path)
    copy_bundle(tiny_bundle, store, "zz-older", "2026-03-01T10:00:00Z")
    copy_bundle(tiny_bundle, store, "aa-newer", "2026-03-01T10:00:00.250000Z")  # a quarter second later
    copy_bundle(tiny_bundle, store, "mm-oldest", "2025-12-31T23:59:59Z")
    assert store.versions("tiny") == ["mm-oldest", "zz-older", "aa-newer"]
    assert store.latest("tiny").path.name == "aa-newer"
    (tmp_path / "tiny" / "broken").mkdir()
    (tmp_path / "tiny" / "broken" / "manifest.json").write_text("{not json")
    assert [r.path.name for r in store.refs("tiny")] == ["aa-newer", "zz-older", "mm-oldest"]


def test_a_tampered_file_of_unchanged_size_and_mtime_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    ref = copy_bundle(tiny_bundle, Store(tmp_path / "store"), "v1")
    cache = HashCache(tmp_path / "cache")
    ref.check_files(hashes=True, cache=cache)
    assert cache.hashed == len(ref.manifest.files)
    cache.save()
    again = HashCache(tmp_path / "cache")  # a restart: nothing is hashed again
    ref.check_files(hashes=True, cache=again)
    assert again.hashed == 0
    flip_bytes(ref.path / "unet.onnx")
    ref.check_files()  # same size: only the hash sees it
    restarted = HashCache(tmp_path / "cache")
    with pytest.raises(ManifestError, match=r"unet.onnx sha256 [0-9a-f]{16}\.\.\. differs from the manifest"):
        ref.check_files(hashes=True, cache=restarted)
    assert restarted.hashed == 1  # the cached hash of the old bytes did not vouch for the new ones


def test_an_unwritable_cache_folder_only_costs_rehashing(tiny_bundle: Path, tmp_path: Path) -> None:
    ref = copy_bundle(tiny_bundle, Store(tmp_path / "store"), "v1")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = HashCache(blocker / "kiln")
    ref.check_files(hashes=True, cache=cache)
    cache.save()  # logged, not raised
    assert cache.path is None
