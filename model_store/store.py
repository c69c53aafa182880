"""A folder of bundles: atomic publish, listing, newest-version lookup and integrity checks."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from model_store.integrity import HashCache, sha256_file
from model_store.manifest import MANIFEST_NAME, FileEntry, Manifest, ManifestError

TMP_PREFIX = ".tmp-"

log = logging.getLogger(__name__)


def created(manifest: Manifest) -> datetime:
    """The manifest's creation time (UTC ISO-8601, with or without fractions of a second); the epoch when it
    cannot be read, so such a bundle sorts oldest."""
    try:
        t = datetime.fromisoformat(manifest.created_at.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return datetime.fromtimestamp(0, UTC)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@dataclass(frozen=True)
class BundleRef:
    """A published bundle: its folder and its manifest."""

    path: Path
    manifest: Manifest

    def check_files(self, hashes: bool = False, cache: HashCache | None = None) -> None:
        """Raise ManifestError naming the first listed file that is missing, has the wrong size, or (with
        `hashes`) whose sha256 differs from the manifest's; `cache` remembers hashes across calls and restarts."""
        for f in self.manifest.files:
            p = self.path / f.path
            if not p.is_file():
                raise ManifestError(f"bundle {self.path}: {f.path} is missing")
            if p.stat().st_size != f.size:
                raise ManifestError(f"bundle {self.path}: {f.path} has {p.stat().st_size} bytes, manifest says {f.size}")
        if not hashes:
            return
        for f in self.manifest.files:  # sizes first: a truncated copy fails before anything is hashed
            p = self.path / f.path
            digest = cache.sha256(p) if cache is not None else sha256_file(p)
            if digest != f.sha256:
                raise ManifestError(f"bundle {self.path}: {f.path} sha256 {digest[:16]}... differs from the "
                                    f"manifest's {f.sha256[:16]}...: the file was changed or damaged after compile")


class Store:
    """`root/NAME/VERSION/` bundles. Versions sort by their manifests' creation time (then folder name); the last
    is the newest."""

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
        """Version folders with a readable manifest, oldest first."""
        return [ref.path.name for ref in reversed(self.refs(name))]

    def refs(self, name: str) -> list[BundleRef]:
        """Every version of `name` whose manifest reads, newest first by the manifest's `created_at` (folder names
        need not sort by time: they are only unique). Unreadable manifests are logged and left out."""
        d = self.root / name
        if not d.is_dir():
            return []
        refs = []
        for p in d.iterdir():
            if not p.is_dir() or p.name.startswith(".") or not (p / MANIFEST_NAME).exists():
                continue
            try:
                refs.append(BundleRef(p, Manifest.read(p)))
            except ManifestError as e:
                log.error("skipping bundle %s: %s", p, e)
        return sorted(refs, key=lambda r: (created(r.manifest), r.path.name), reverse=True)

    def latest(self, name: str) -> BundleRef:
        refs = self.refs(name)
        if not refs:
            raise ManifestError(f"no bundle named {name!r} in {self.root}")
        return refs[0]

    def clean_staging(self) -> None:
        """Remove staging folders left by a compile that died before publishing."""
        for name in self.names():
            for p in (self.root / name).glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(p, ignore_errors=True)
