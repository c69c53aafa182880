"""A folder of bundles: atomic publish, listing, latest-version lookup and integrity checks."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from model_store.manifest import MANIFEST_NAME, FileEntry, Manifest, ManifestError

TMP_PREFIX = ".tmp-"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class BundleRef:
    """A published bundle: its folder and its manifest."""

    path: Path
    manifest: Manifest

    def check_files(self, hashes: bool = False) -> None:
        """Raise ManifestError if a listed file is missing or has the wrong size (or sha256)."""
        for f in self.manifest.files:
            p = self.path / f.path
            if not p.is_file():
                raise ManifestError(f"bundle {self.path}: {f.path} is missing")
            if p.stat().st_size != f.size:
                raise ManifestError(f"bundle {self.path}: {f.path} has {p.stat().st_size} bytes, manifest says {f.size}")
            if hashes and sha256_file(p) != f.sha256:
                raise ManifestError(f"bundle {self.path}: {f.path} sha256 differs from the manifest")


class Store:
    """`root/NAME/VERSION/` bundles. Versions sort by name; the last is the latest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def staging_dir(self, name: str) -> Path:
        """A fresh hidden folder inside the store to build a bundle in (same filesystem as its target)."""
        d = self.root / name / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"
        d.mkdir(parents=True)
        return d

    def publish(self, staging: Path, manifest: Manifest) -> BundleRef:
        """Write the manifest (listing every file with sha256 and size), then rename into place."""
        files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
        manifest.files = [
            FileEntry(str(p.relative_to(staging)), sha256_file(p), p.stat().st_size) for p in files
        ]
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        for p in [*files, staging / MANIFEST_NAME]:
            os.chmod(p, 0o644)  # readable by a serving user other than the compiling one
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        final = self.root / manifest.name / manifest.version
        if final.exists():
            shutil.rmtree(staging)
            raise FileExistsError(f"bundle {final} already exists")
        os.chmod(staging, 0o755)
        os.rename(staging, final)
        return BundleRef(final, manifest)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[str]:
        d = self.root / name
        if not d.is_dir():
            return []
        return sorted(
            p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_NAME).exists()
        )

    def latest(self, name: str) -> BundleRef:
        versions = self.versions(name)
        if not versions:
            raise ManifestError(f"no bundle named {name!r} in {self.root}")
        path = self.root / name / versions[-1]
        return BundleRef(path, Manifest.read(path))

    def clean_staging(self) -> None:
        """Remove staging folders left by a compile that died before publishing."""
        for name in self.names():
            for p in (self.root / name).glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(p, ignore_errors=True)
