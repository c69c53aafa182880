"""Bundle store: atomic publish, latest version, integrity checks, manifest format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model_store import BundleRef, Manifest, ManifestError, Store


def copy_bundle(tiny_bundle: Path, store: Store, version: str) -> BundleRef:
    staging = store.staging_dir("tiny")
    shutil.rmtree(staging)
    shutil.copytree(tiny_bundle, staging)
    manifest = Manifest.read(staging)
    manifest.version = version
    return store.publish(staging, manifest)


def test_latest_is_the_highest_version_and_staging_is_ignored(tiny_bundle: Path, tmp_path: Path) -> None:
    store = Store(tmp_path)
    copy_bundle(tiny_bundle, store, "20260101-000000-aaaa")
    copy_bundle(tiny_bundle, store, "20260102-000000-bbbb")
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
    with pytest.raises(ManifestError, match="vae_decoder.onnx sha256 differs"):
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
