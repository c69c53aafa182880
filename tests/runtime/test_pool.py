"""The model pool on real tiny bundles: loads on demand, least-recently-used eviction under a budget, pins, leases
that are never evicted (a load waits for them), many concurrent requests for more models than fit, a broken version
falling back to the one before, and what each loaded version is accounted (measured resident memory).

The policy tests give every version the same accounted size (100 MB), so that which model goes is decided by the
policy alone; `test_measured_accounting` checks the real measure."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from model_store import BundleRef, HashCache
from runtime.model import LoadedModel, load_bundle
from runtime.pool.card import BundleCard
from runtime.pool.config import PoolConfig
from runtime.pool.pool import ModelLoadFailed, ModelPool, PoolHooks
from tests.conftest import publish_copy

MB = 10**6


def opener(ref: BundleRef, engine: str) -> LoadedModel:
    return load_bundle(ref, engine=engine, hashes=HashCache(persist=False))


def pool(store: Path, budget: str = "", events: list | None = None, **config: object) -> ModelPool:
    hooks = PoolHooks(evicted=lambda name, reason: events.append((name, reason))) if events is not None else None
    return ModelPool(store, PoolConfig(memory_budget=budget, preload=("none",), watch=False, **config),  # type: ignore[arg-type]
                     opener, sizer=lambda card, grown: 100 * MB, hooks=hooks)


def loaded(p: ModelPool) -> list[str]:
    return sorted(s.card.name for s in p.loaded)


async def use(p: ModelPool, name: str, hold: float = 0.0) -> str:
    async with p.lease(p.resolve(name)) as slot:
        assert slot.model is not None and slot.model.name == name
        await asyncio.sleep(hold)
    return name


def test_loads_on_first_use_and_evicts_the_least_recently_used(three_models: Path) -> None:
    async def run() -> None:
        events: list = []
        p = pool(three_models, "250M", events)
        await p.start()
        assert p.names == ["a", "b", "c"] and loaded(p) == []
        await use(p, "a")
        await use(p, "b")
        await use(p, "a")  # b is now the least recently used
        await use(p, "c")
        assert loaded(p) == ["a", "c"] and events == [("b", "budget")]
        await use(p, "b")
        assert loaded(p) == ["b", "c"] and events[-1] == ("a", "budget")
        assert p.used_bytes == 200 * MB

    asyncio.run(run())


def test_pinned_models_stay(three_models: Path) -> None:
    async def run() -> None:
        p = pool(three_models, "250M", pin=("a",))
        await p.start()
        assert loaded(p) == ["a"]  # pins load at start
        for name in "bcbc":
            await use(p, name)
        assert "a" in loaded(p) and len(p.loaded) == 2
        with pytest.raises(Exception, match="pinned"):
            await p.unload(p.resolve("a"))

    asyncio.run(run())


def test_a_model_in_use_is_never_evicted_a_load_waits_for_it(three_models: Path) -> None:
    async def run() -> None:
        p = pool(three_models, "150M")  # fits one
        await p.start()
        release_a = asyncio.Event()

        async def hold_a() -> None:
            async with p.lease(p.resolve("a")):
                await release_a.wait()

        holder = asyncio.ensure_future(hold_a())
        await asyncio.sleep(0.5)
        assert loaded(p) == ["a"]
        wants_b = asyncio.ensure_future(use(p, "b"))
        await asyncio.sleep(0.5)
        assert not wants_b.done() and loaded(p) == ["a"]  # waits: a is busy
        slot_a = p.slots[("a", "v1")]
        assert slot_a.draining and p.resident(p.resolve("a")) is None  # new requests for a wait too
        wants_a = asyncio.ensure_future(use(p, "a"))
        await asyncio.sleep(0.2)
        assert not wants_a.done()
        release_a.set()
        assert await asyncio.wait_for(wants_b, 30) == "b"
        assert await asyncio.wait_for(wants_a, 30) == "a"
        await holder

    asyncio.run(run())


def test_concurrent_requests_for_more_models_than_fit_all_succeed(three_models: Path) -> None:
    async def run() -> None:
        p = pool(three_models, "150M")  # one at a time
        await p.start()
        most = 0

        async def request(name: str) -> str:
            nonlocal most
            async with p.lease(p.resolve(name)):
                most = max(most, len(p.loaded))
                await asyncio.sleep(random.uniform(0, 0.05))
            return name

        rng = random.Random(0)
        names = [rng.choice("abc") for _ in range(24)]
        done = await asyncio.wait_for(asyncio.gather(*(request(n) for n in names)), 120)
        assert done == names and most == 1
        assert not any(s.users or s.waiting for s in p.slots.values())

    asyncio.run(run())


def test_cancelled_waiters_take_nothing(three_models: Path) -> None:
    async def run() -> None:
        p = pool(three_models, "150M")
        await p.start()
        waiter = asyncio.ensure_future(use(p, "a"))
        await asyncio.sleep(0)  # waiting for the load
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(1.0)  # the shared load goes on and finishes
        await use(p, "b")  # a was idle: evicted without waiting
        assert loaded(p) == ["b"] and not any(s.users or s.waiting for s in p.slots.values())

    asyncio.run(run())


def test_a_broken_version_falls_back_to_the_one_before(three_models: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    publish_copy(tiny_bundle, store, "m", "v1")
    broken = publish_copy(tiny_bundle, store, "m", "v2")
    unet = next(broken.rglob("unet*.onnx"))
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    unet.write_bytes(bytes(data))

    async def run() -> None:
        p = pool(store)
        await p.start()
        assert p.resolve("m").version == "v2"  # newest, not yet tried
        with pytest.raises(ModelLoadFailed, match="sha256"):
            await use(p, "m")
        assert p.resolve("m").version == "v1" and await use(p, "m") == "m"
        with pytest.raises(ModelLoadFailed):
            await use(p, "m@v2")  # asked by name: no fallback

    asyncio.run(run())


def test_measured_accounting(three_models: Path) -> None:
    async def run() -> None:
        p = ModelPool(three_models, PoolConfig(preload=("a",), watch=False), opener)
        await p.start()
        [slot] = p.loaded
        card: BundleCard = slot.card
        assert card.file_bytes > MB and slot.bytes >= card.file_bytes  # at least the files; what the process grew by
        assert slot.load_s > 0 and p.used_bytes == slot.bytes

    asyncio.run(run())


def test_names_versions_and_aliases_resolve(three_models: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    from model_store.aliases import ModelRef, set_alias
    from runtime.errors import NotFound

    store = tmp_path / "store"
    publish_copy(tiny_bundle, store, "m", "v1")
    publish_copy(tiny_bundle, store, "m", "v2")
    set_alias(store, ModelRef("m", "v1"), "stable", ["v1", "v2"], ["m"])

    async def run() -> None:
        p = pool(store)
        await p.start()
        assert p.resolve("m").version == "v2" and p.resolve("m@v1").version == "v1"
        assert p.resolve("stable").key == ("m", "v1") and p.resolve("m@stable").key == ("m", "v1")
        with pytest.raises(NotFound, match="v2, v1"):
            p.resolve("m@v3")
        with pytest.raises(NotFound, match="available: m, stable"):
            p.resolve("nope")
        with pytest.raises(NotFound, match="'m@' is not served"):
            p.resolve("m@")
        set_alias(store, ModelRef("m", "v1"), "m", ["v1", "v2"], ["m"])  # rollback of the plain name
        await p.refresh()
        assert p.resolve("m").version == "v1"

    asyncio.run(run())


def test_a_version_removed_from_the_store_while_loaded(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    store = tmp_path / "store"
    publish_copy(tiny_bundle, store, "m", "v1")
    v2 = publish_copy(tiny_bundle, store, "m", "v2")

    async def run() -> None:
        p = pool(store)
        await p.start()
        async with p.lease(p.resolve("m")) as running:  # a request still running on v2
            assert running.card.version == "v2"
            shutil.rmtree(v2)
            await p.refresh()
            assert p.resolve("m").version == "v1"  # new requests at once
            assert running.model is not None  # the running one keeps its version
        assert [s.card.version for s in p.loaded] == []  # v2 unloaded when it ended
        assert await use(p, "m") == "m" and [s.card.version for s in p.loaded] == ["v1"]

    asyncio.run(run())
