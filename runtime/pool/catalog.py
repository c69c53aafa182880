"""The store as the server sees it: every model's versions (newest first), the aliases, and the versions that
failed to verify or load (skipped until their files change)."""

from __future__ import annotations

import logging
from pathlib import Path

from model_store import BundleRef, Store
from model_store.aliases import AliasError, ModelRef, read_aliases
from runtime.pool.card import BundleCard

log = logging.getLogger("kiln.pool")

Key = tuple[str, str]
"""(model name, version)."""


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes when a version's files do (a copy completing, a repaired file)."""
    try:
        return tuple(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                            for p in path.rglob("*") if p.is_file()))
    except OSError:
        return ()


class Catalog:
    def __init__(self, root: Path):
        self.store = Store(root)
        self.refs: dict[str, list[BundleRef]] = {}
        """name -> its versions whose manifests read, newest first."""
        self.aliases: dict[str, ModelRef] = {}
        self._cards: dict[Path, BundleCard] = {}
        self._failed: dict[Key, tuple[tuple[str, int, int], ...]] = {}
        self.extra: dict[str, BundleRef] = {}
        """Bundles served from outside the store (versions loaded by whoever built the server): name -> bundle."""

    def scan(self) -> None:
        """Read the store again (manifests and aliases; no hashing). Blocking: run it off the event loop."""
        refs = {}
        for name in self.store.names():
            found = []
            for ref in self.store.refs(name):
                if ref.manifest.name != name or ref.manifest.version != ref.path.name:
                    log.error("skipping bundle %s: its manifest says %s@%s (a bundle lives in STORE/NAME/VERSION)",
                              ref.path, ref.manifest.name, ref.manifest.version)
                    continue
                found.append(ref)
            if found:
                refs[name] = found
        for name, ref in self.extra.items():
            refs[name] = [ref, *(r for r in refs.get(name, []) if r.manifest.version != ref.manifest.version)]
        try:
            aliases = read_aliases(self.store.root)
        except AliasError as e:
            log.error("aliases not changed: %s", e)
            aliases = self.aliases
        for key, signature in list(self._failed.items()):
            same = next((r for r in refs.get(key[0], []) if r.manifest.version == key[1]), None)
            if same is None or _signature(same.path) != signature:
                del self._failed[key]  # removed, or its files changed: worth another try
        self.refs, self.aliases = refs, aliases
        live = {r.path for found in refs.values() for r in found}
        self._cards = {p: c for p, c in self._cards.items() if p in live}

    @property
    def names(self) -> list[str]:
        return sorted(self.refs)

    def card(self, ref: BundleRef) -> BundleCard:
        card = self._cards.get(ref.path)
        if card is None:
            card = self._cards[ref.path] = BundleCard(ref)
        return card

    def find(self, name: str, version: str) -> BundleCard | None:
        ref = next((r for r in self.refs.get(name, []) if r.manifest.version == version), None)
        return self.card(ref) if ref is not None else None

    def versions(self, name: str) -> list[str]:
        """Newest first, failed ones included."""
        return [r.manifest.version for r in self.refs.get(name, [])]

    def failed(self, key: Key) -> bool:
        return key in self._failed

    def mark_failed(self, card: BundleCard) -> None:
        self._failed[card.key] = _signature(card.ref.path)

    def wanted(self, name: str) -> BundleCard | None:
        """The version a plain `name` should serve: the one an alias spelled `name` pins, else the newest; versions
        that failed are passed over for the next older one."""
        pinned = self.aliases.get(name)
        if pinned is not None and pinned.name == name:
            card = self.find(name, pinned.version)
            if card is not None and not self.failed(card.key):
                return card
            log.error("alias %s -> %s: that version is %s; serving the newest that works", name, pinned,
                      "not in the store" if card is None else "broken")
        for ref in self.refs.get(name, []):
            if not self.failed((name, ref.manifest.version)):
                return self.card(ref)
        return None

    def aliases_of(self, name: str) -> dict[str, str]:
        return {alias: ref.version for alias, ref in self.aliases.items() if ref.name == name}
