"""The model pool: which bundle versions are loaded, loading on demand, evicting under a memory budget, and
switching a model to a newly published version while requests run.

Requests take a lease (`acquire`) on one loaded version and give it back (`release`) when they finish; a leased
version is never evicted, so a request never fails because another one needed room. A load that does not fit the
budget evicts the least recently used idle versions; when only busy ones are left it waits for one to finish (and
marks it draining, so new requests for it wait too instead of keeping it busy for ever). Loads run one at a time,
off the event loop, so the resident memory the process grows by during a load is that model's.

All state is touched on the event loop only; `Condition` wakes whoever waits for a load, a release or an eviction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from model_store import BundleRef
from model_store.aliases import AliasError, ModelRef
from runtime.engine_choice import AUTO, choose_engine
from runtime.errors import FailedPrecondition, NotFound
from runtime.model import LoadedModel
from runtime.pool.card import BundleCard
from runtime.pool.catalog import Catalog, Key
from runtime.pool.config import PoolConfig
from runtime.pool.memory import release_freed, rss

log = logging.getLogger("kiln.pool")

Opener = Callable[[BundleRef, str], LoadedModel]
"""Verifies and opens a bundle version with an engine (blocking; runs in a worker thread)."""
Sizer = Callable[[BundleCard, int], int]
"""A loaded version's accounted bytes from the resident memory the process grew by while loading it."""


def measured_size(card: BundleCard, grown: int) -> int:
    """What the process grew by, but never less than the files (an allocator reusing freed pages can hide a load)."""
    return max(grown, card.file_bytes)


@dataclass
class Slot:
    """One bundle version in the pool, loaded or not (a slot exists while it is loaded or someone waits for it)."""

    card: BundleCard
    engine: str
    model: LoadedModel | None = None
    bytes: int = 0
    """Accounted resident memory while loaded."""
    users: int = 0
    """Leases held (requests running on it)."""
    waiting: int = 0
    """Requests waiting for it to load (or to stop draining)."""
    last_used: float = 0.0
    """time.time() of the last lease's end (or of the load)."""
    load_s: float = 0.0
    granted: int = 0
    """Leases a finished load handed to its waiters, not yet picked up by them (already counted in `users`)."""
    draining: bool = False
    """A load waits for it to go idle to evict it: new leases wait."""
    loading: asyncio.Task | None = field(default=None, repr=False)

    @property
    def key(self) -> Key:
        return self.card.key


class ModelLoadFailed(FailedPrecondition):
    def __init__(self, card: BundleCard, error: BaseException):
        super().__init__(f"model {card.name} version {card.version} failed to verify or load: {error}",
                         "MODEL_LOAD_FAILED")
        self.card = card


@dataclass
class PoolHooks:
    """Callbacks for metrics and health (all optional)."""

    loaded: Callable[[str, float, bool], None] | None = None
    """(model, seconds, ok) after each load."""
    evicted: Callable[[str, str], None] | None = None
    """(model, reason: budget | unload | replaced) after each eviction."""
    changed: Callable[[], None] | None = None
    """After the served models change (a load, an eviction, a switch, a refresh)."""


class ModelPool:
    def __init__(self, root: Path, config: PoolConfig, opener: Opener, default_engine: str = "onnxruntime",
                 sizer: Sizer = measured_size, hooks: PoolHooks | None = None, gpu: bool = False):
        """`default_engine` (and PoolConfig's per-model engines) may be `auto`: each version's engine is then
        chosen when it is loaded (runtime/engine_choice.py); `gpu`: ONNX Runtime runs on a GPU."""
        self.catalog = Catalog(root)
        self.config = config
        self.budget = config.budget
        self.opener = opener
        self.default_engine = default_engine
        self.engines = config.engines()
        self.gpu = gpu
        self.sizer = sizer
        self.hooks = hooks or PoolHooks()
        self.slots: dict[Key, Slot] = {}
        self.current: dict[str, str] = {}
        """name -> the version a plain name serves now."""
        self._sizes: dict[Key, int] = {}
        """Accounted bytes of versions loaded before: the next load's estimate."""
        self._cond = asyncio.Condition()
        self._load_lock = asyncio.Lock()
        self._switching: dict[str, asyncio.Task] = {}
        self._replaced: dict[str, set[str]] = {}
        """name -> versions a newer one replaced, unloaded as soon as they are idle."""
        self._auto_logged: set[Key] = set()

    # --- what is served ----------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self.current)

    def engine_for(self, name: str) -> str:
        """The engine configured for `name`: onnxruntime, openvino, or auto (see `engine_of`)."""
        return self.engines.get(name, self.default_engine)

    def engine_of(self, card: BundleCard) -> str:
        """The engine that runs `card`'s version: the configured one, or for `auto` the one chosen for its
        precisions on this machine (logged with the reason the first time)."""
        engine = self.engine_for(card.name)
        if engine != AUTO:
            return engine
        engine, why = choose_engine(card.manifest.precision.values(), self.gpu)
        if card.key not in self._auto_logged:
            self._auto_logged.add(card.key)
            log.info("model %s version %s: engine auto -> %s (%s)", card.name, card.version, engine, why)
        return engine

    def resolve(self, text: str) -> BundleCard:
        """The version a request's `model` names: NAME (the version it serves now), NAME@VERSION, NAME@ALIAS, or an
        ALIAS. Raises NotFound for one that names nothing served (malformed ones included)."""
        try:
            ref = ModelRef.parse(text)
        except AliasError:  # no model has such a name
            raise NotFound("model", text, self.names) from None
        cat = self.catalog
        if not ref.version:
            if ref.name in self.current:
                card = cat.find(ref.name, self.current[ref.name])
                if card is not None:
                    return card
            alias = cat.aliases.get(ref.name)
            if alias is not None and (card := cat.find(alias.name, alias.version)) is not None:
                return card
            raise NotFound("model", text, self.names + sorted(a for a in cat.aliases if a not in self.current))
        if ref.name not in cat.refs:
            raise NotFound("model", ref.name, self.names)
        version = ref.version
        alias = cat.aliases.get(version)
        if cat.find(ref.name, version) is None and alias is not None and alias.name == ref.name:
            version = alias.version
        card = cat.find(ref.name, version)
        if card is None:
            raise NotFound("version", f"{ref.name}@{ref.version}", cat.versions(ref.name))
        return card

    def card_or_none(self, text: str) -> BundleCard | None:
        try:
            return self.resolve(text)
        except NotFound:
            return None

    def resident(self, card: BundleCard) -> LoadedModel | None:
        slot = self.slots.get(card.key)
        return slot.model if slot is not None and not slot.draining else None

    def pinned(self, slot: Slot) -> bool:
        name, version = slot.key
        return name in self.config.pin and self.current.get(name) == version

    @property
    def loaded(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.model is not None]

    @property
    def used_bytes(self) -> int:
        return sum(s.bytes for s in self.loaded)

    # --- leases ------------------------------------------------------------------------------------------------
    async def acquire(self, card: BundleCard) -> Slot:
        """A lease on `card`'s version, loading it first if needed (raises ModelLoadFailed when it cannot be). Give
        it back with `release`; cancelling while waiting takes nothing."""
        slot = self.slots.get(card.key)
        if slot is None:
            slot = self.slots[card.key] = Slot(card, self.engine_of(card))
        if slot.model is not None and not slot.draining:
            slot.users += 1
            return slot
        slot.waiting += 1
        granted = False
        try:
            while not granted:
                if slot.granted:  # the load that finished leased it to its waiters at once: nothing can evict it
                    slot.granted -= 1
                    granted = True
                elif slot.model is not None and not slot.draining:
                    slot.users += 1
                    granted = True
                elif slot.model is None:
                    if slot.loading is None:
                        slot.loading = asyncio.ensure_future(self._load(slot))
                        slot.loading.add_done_callback(_retrieve)
                    await asyncio.shield(slot.loading)
                else:
                    async with self._cond:
                        await self._cond.wait_for(lambda: slot.model is None or not slot.draining or slot.granted > 0)
        finally:
            slot.waiting -= 1
            if not granted and slot.granted > slot.waiting:  # cancelled holding a grant: give it back
                slot.granted -= 1
                self.release(slot)
            self._forget_if_unused(slot)
        return slot

    def release(self, slot: Slot) -> None:
        slot.users -= 1
        slot.last_used = time.time()
        if slot.users == 0 and self._retired(slot):
            self._evict(slot, "replaced")
        self._notify()

    @contextlib.asynccontextmanager
    async def lease(self, card: BundleCard):  # type: ignore[no-untyped-def]
        slot = await self.acquire(card)
        try:
            yield slot
        finally:
            self.release(slot)

    def _retired(self, slot: Slot) -> bool:
        """A version a newer one replaced (or whose model left the store): unloaded once idle. Explicitly requested
        older versions (NAME@VERSION) are not retired: the budget's LRU decides for them."""
        name, version = slot.key
        return name in self._replaced and version in self._replaced[name]

    def _forget_if_unused(self, slot: Slot) -> None:
        if slot.model is None and slot.users == 0 and slot.waiting == 0 and slot.loading is None \
                and self.slots.get(slot.key) is slot:
            del self.slots[slot.key]

    def _notify(self) -> None:
        async def wake() -> None:
            async with self._cond:
                self._cond.notify_all()

        asyncio.get_running_loop().create_task(wake())

    # --- loading and eviction ----------------------------------------------------------------------------------
    async def _load(self, slot: Slot) -> None:
        card = slot.card
        try:
            async with self._load_lock:
                if slot.model is not None:
                    return
                await self._make_room(slot)
                t0, before = time.perf_counter(), rss()
                try:
                    model = await asyncio.to_thread(self.opener, card.ref, slot.engine)
                except Exception as e:
                    seconds = time.perf_counter() - t0
                    self.catalog.mark_failed(card)
                    log.error("skipping bundle %s version %s: it failed to verify or load in %.2fs: %s%s", card.name,
                              card.version, seconds, e, self._fall_back(card))
                    if self.hooks.loaded:
                        self.hooks.loaded(card.name, seconds, False)
                    raise ModelLoadFailed(card, e) from e
                slot.load_s = time.perf_counter() - t0
                slot.bytes = self._sizes[card.key] = self.sizer(card, rss() - before)
                slot.model, slot.last_used = model, time.time()
                slot.granted, slot.users = slot.waiting, slot.users + slot.waiting
                self._trim(keep=slot)
                log.info("loaded %s version %s (%s) in %.2fs, %.0f MB resident; pool %.0f MB%s", card.name,
                         card.version, slot.engine, slot.load_s, slot.bytes / 1e6, self.used_bytes / 1e6,
                         f" of {self.budget / 1e6:.0f} MB" if self.budget is not None else "")
                if self.hooks.loaded:
                    self.hooks.loaded(card.name, slot.load_s, True)
        finally:
            slot.loading = None
            self._forget_if_unused(slot)
            self._changed()
            self._notify()

    def estimate(self, card: BundleCard) -> int:
        """What loading `card` will take: its last measure, else its files times the resident/files ratio the
        versions measured so far had (ONNX Runtime's arenas and copies make it more than the files)."""
        if card.key in self._sizes:
            return self._sizes[card.key]
        ratios = [self._sizes[s.key] / s.card.file_bytes for s in self.loaded if s.card.file_bytes and s.key in
                  self._sizes]
        return int(card.file_bytes * max(1.0, sum(ratios) / len(ratios) if ratios else 1.0))

    def _trim(self, keep: Slot) -> None:
        """After a load that measured more than its estimate: evict idle versions until the budget holds again."""
        while self.budget is not None and self.used_bytes > self.budget:
            idle = [s for s in self.loaded if s is not keep and s.users == 0 and not self.pinned(s)]
            if not idle:
                return
            self._evict(min(idle, key=lambda s: s.last_used), "budget")

    async def _make_room(self, slot: Slot) -> None:
        if self.budget is None:
            return
        need = self.estimate(slot.card)
        while self.used_bytes + need > self.budget:
            others = [s for s in self.loaded if s is not slot and not self.pinned(s)]
            idle = [s for s in others if s.users == 0]
            if idle:
                self._evict(min(idle, key=lambda s: s.last_used), "budget")
                continue
            if not others:
                log.warning("model %s version %s (about %.0f MB) does not fit the memory budget of %.0f MB%s: "
                            "loading it over budget", slot.card.name, slot.card.version, need / 1e6,
                            self.budget / 1e6, f" beside {self.used_bytes / 1e6:.0f} MB of pinned models"
                            if self.used_bytes else " even alone")
                return
            victim = min(others, key=lambda s: s.last_used)
            victim.draining = True  # new requests for it wait; it is evicted when its running ones end
            log.info("model %s version %s waits for %s to finish %d request(s) to make room", slot.card.name,
                     slot.card.version, victim.card.name, victim.users)
            async with self._cond:
                await self._cond.wait_for(lambda v=victim: v.users == 0 or v.model is None)  # type: ignore[misc]

    def _evict(self, slot: Slot, reason: str) -> None:
        assert slot.users == 0, "a leased model is never evicted"
        slot.model, slot.bytes, slot.draining = None, 0, False
        name, version = slot.key
        if name in self._replaced:
            self._replaced[name].discard(version)
        self._forget_if_unused(slot)
        release_freed()
        log.info("unloaded %s version %s (%s); pool %.0f MB, process %.0f MB resident", name, version, reason,
                 self.used_bytes / 1e6, rss() / 1e6)
        if self.hooks.evicted:
            self.hooks.evicted(name, reason)
        self._changed()

    def _changed(self) -> None:
        if self.hooks.changed:
            self.hooks.changed()

    def _fall_back(self, card: BundleCard) -> str:
        """After `card` failed: a plain name that served it moves to the next version that has not failed. Says
        what happened, for the log line."""
        if self.current.get(card.name) != card.version:
            return ""
        nxt = self.catalog.wanted(card.name)
        if nxt is None:
            del self.current[card.name]
            return f"; no other version of {card.name} works: it is not served"
        self.current[card.name] = nxt.version
        return f"; trying version {nxt.version}"

    # --- admin -------------------------------------------------------------------------------------------------
    async def load(self, card: BundleCard) -> Slot:
        """Load (if needed) and return the slot, without holding a lease."""
        slot = await self.acquire(card)
        self.release(slot)
        return slot

    async def unload(self, card: BundleCard) -> None:
        """Evict a version once its running requests end. Refuses a pinned model (FAILED_PRECONDITION)."""
        slot = self.slots.get(card.key)
        if slot is not None and self.pinned(slot):
            raise FailedPrecondition(f"model {card.name} is pinned (--pin); it stays loaded", "MODEL_PINNED")
        while (slot := self.slots.get(card.key)) is not None and (slot.model is not None or slot.loading):
            if slot.loading is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(slot.loading)
                continue
            if slot.users == 0:
                self._evict(slot, "unload")
                return
            slot.draining = True
            async with self._cond:
                await self._cond.wait_for(lambda s=slot: s.users == 0 or s.model is None)  # type: ignore[misc]

    # --- start and hot publish ---------------------------------------------------------------------------------
    def adopt(self, models: list[LoadedModel]) -> None:
        """Serve versions already loaded (before `start`): each is its name's current version, loaded, and counted
        at its files' size; they are evicted like any other."""
        for model in models:
            ref = BundleRef(model.path, model.manifest)
            self.catalog.extra[model.name] = ref
            card = self.catalog.card(ref)
            slot = self.slots[(model.name, model.version)] = Slot(card, self.engine_of(card))
            slot.model, slot.last_used = model, time.time()
            slot.bytes = self._sizes[slot.key] = slot.card.file_bytes

    async def start(self) -> None:
        """Read the store and load what --preload and --pin ask for (as many as the budget holds for `all`)."""
        await asyncio.to_thread(self.catalog.scan)
        for name in self.catalog.names:
            if (card := self.catalog.wanted(name)) is not None:
                self.current[name] = card.version
        for name in self.catalog.names:
            if self.config.preloads(name):
                await self._preload(name)
        unknown = [n for n in (*self.config.pin, *self.config.preload) if n not in ("all", "none") and
                   n not in self.catalog.refs]
        if unknown:
            log.warning("--pin/--preload name models the store does not have: %s", ", ".join(unknown))
        self._changed()

    async def _preload(self, name: str) -> None:
        while name in self.current:
            card = self.resolve(name)
            fits = self.budget is None or self.used_bytes + self.estimate(card) <= self.budget
            if not fits and name not in self.config.pin:
                log.info("not preloading %s: the memory budget is full; it loads on its first request", name)
                return
            try:
                await self.load(card)
                return
            except ModelLoadFailed:
                continue  # _fall_back moved it to an older version, or dropped it

    async def refresh(self) -> None:
        """Read the store again and follow it: new models are served (and preloaded under `--preload all`), a model
        whose newest version (or pinning alias) changed switches to it — at once when nothing of it is loaded,
        otherwise after the new version loaded in the background — and models gone from the store stop being
        served (their running requests finish)."""
        await asyncio.to_thread(self.catalog.scan)
        for name in self.catalog.names:
            wanted = self.catalog.wanted(name)
            now = self.current.get(name)
            if wanted is None or wanted.version == now or name in self._switching:
                continue
            old = self.slots.get((name, now)) if now else None
            if now is not None and self.catalog.find(name, now) is None:  # its folder was removed: move on at once
                log.info("model %s version %s left the store; now serving version %s", name, now, wanted.version)
                self.current[name] = wanted.version
                self._retire(name, keep=wanted.version)
            elif now is None:
                log.info("new model %s version %s", name, wanted.version)
                self.current[name] = wanted.version
                if "all" in self.config.preload or name in self.config.pin:
                    self._background(name, self._preload(name))
            elif old is not None and old.model is not None:
                self._background(name, self._switch(name, wanted))
            else:
                log.info("model %s now serves version %s (was %s)", name, wanted.version, now)
                self.current[name] = wanted.version
        for name in [n for n in self.current if n not in self.catalog.refs]:
            log.info("model %s left the store: no longer served", name)
            del self.current[name]
            self._retire(name)
        self._changed()

    def _background(self, name: str, work) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.ensure_future(work)
        self._switching[name] = task
        def done(t: asyncio.Task) -> None:
            self._switching.pop(name, None)
            _retrieve(t)

        task.add_done_callback(done)

    async def _switch(self, name: str, card: BundleCard) -> None:
        log.info("model %s: loading version %s in the background", name, card.version)
        try:
            slot = await self.acquire(card)
        except ModelLoadFailed:
            log.error("model %s: version %s skipped; still serving %s", name, card.version, self.current.get(name))
            return
        old = self.current.get(name)
        self.current[name] = card.version
        log.info("model %s now serves version %s (was %s); requests running on %s finish there", name, card.version,
                 old, old)
        self._retire(name, keep=card.version)
        self.release(slot)
        wanted = self.catalog.wanted(name)
        if wanted is not None and wanted.version != card.version:  # published again while this one loaded
            asyncio.get_running_loop().call_soon(lambda: self._background(f"{name} (again)", self.refresh()))

    def _retire(self, name: str, keep: str = "") -> None:
        for (n, version), slot in list(self.slots.items()):
            if n == name and version != keep and slot.model is not None:
                self._replaced.setdefault(name, set()).add(version)
                if slot.users == 0:
                    self._evict(slot, "replaced")

    async def watch(self, stop: asyncio.Event) -> None:
        """Refresh on every change under the store (watchfiles; polling with --watch-poll-s) until `stop` is set."""
        from watchfiles import awatch

        poll = self.config.watch_poll_s
        root = self.catalog.store.root
        while not stop.is_set():
            try:
                async for _ in awatch(root, stop_event=stop, force_polling=poll > 0 or None,
                                      poll_delay_ms=int(poll * 1000) or 1000, debounce=200, recursive=True):
                    try:
                        await self.refresh()
                    except Exception:
                        log.exception("refreshing the store failed; serving on")
            except (OSError, RuntimeError) as e:  # no store folder yet, or out of inotify watches
                if poll <= 0:
                    log.warning("watching %s for new bundles failed (%s): polling it every second instead", root, e)
                    poll = 1.0
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        for task in list(self._switching.values()):
            task.cancel()


def _retrieve(task: asyncio.Task) -> None:
    """Mark a background task's exception as seen (it was logged, or handed to the waiters)."""
    if not task.cancelled():
        task.exception()
