"""Bundle integrity: every file's sha256 against the manifest, hashed once per file and remembered.

A restart must not re-hash gigabytes of weights, and a remembered hash must not vouch for bytes that changed
since. The cache keys each file by what changes whenever its bytes can have: device, inode, size, mtime and
ctime (in nanoseconds). A writer can set mtime back (`touch -d`), but not ctime: any write, rename or `touch`
moves ctime to now, so a rewritten file misses the cache and is hashed again. Copies and restores get new inodes
and ctimes and are hashed again too.

This guards against corruption, partial copies and files edited in place. It is not a signature: whoever can
write the store can also rewrite its manifests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "KILN_CACHE_DIR"
"""Environment variable naming the folder the hash cache lives in (default: $XDG_CACHE_HOME/kiln, else
~/.cache/kiln)."""
CACHE_FILE = "verified-sha256.json"
CACHE_FORMAT = 1
MAX_ENTRIES = 10_000
"""Oldest entries are dropped beyond this; a store holds a handful of files per bundle version."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path | None:
    """$KILN_CACHE_DIR, else $XDG_CACHE_HOME/kiln, else ~/.cache/kiln; None when no home can be found."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "kiln"
    home = Path(os.path.expanduser("~"))
    if str(home) in ("~", "/", "/nonexistent") or not home.is_dir():
        return None
    return home / ".cache" / "kiln"


def file_key(st: os.stat_result) -> str:
    """What identifies one version of a file's bytes on this host (see the module docstring)."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class HashCache:
    """sha256 of files, remembered by `file_key` in memory and, when `folder` is writable, in a JSON file there
    (written atomically, so several servers can share it; the last writer wins, which only costs a re-hash)."""

    def __init__(self, folder: Path | None = None, persist: bool = True):
        self.path = (folder / CACHE_FILE) if folder is not None and persist else None
        self._entries: dict[str, str] = {}
        self._lock = threading.Lock()
        self.hashed = 0
        """Files hashed (cache misses) by this instance."""
        self.hashed_bytes = 0
        self._load()

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") == CACHE_FORMAT and isinstance(data.get("entries"), dict):
                self._entries = {str(k): str(v) for k, v in data["entries"].items()}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable hash cache %s: %s", self.path, e)

    def sha256(self, path: Path) -> str:
        """The file's sha256, hashed now unless this very version of the file was hashed before."""
        key = file_key(os.stat(path))
        with self._lock:
            known = self._entries.get(key)
        if known is not None:
            return known
        digest = sha256_file(path)
        # a file that changed while it was being read is not cached under either version
        if file_key(os.stat(path)) == key:
            with self._lock:
                self._entries[key] = digest
                self.hashed += 1
                self.hashed_bytes += os.stat(path).st_size
        return digest

    def save(self) -> None:
        """Write the cache file (atomically); a folder that cannot be written is logged once and skipped."""
        if self.path is None:
            return
        with self._lock:
            entries = dict(list(self._entries.items())[-MAX_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "entries": entries}))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot write the hash cache %s (%s): bundles will be hashed again at the next start; set "
                        "%s to a writable folder", self.path, e, CACHE_ENV)
            self.path = None
