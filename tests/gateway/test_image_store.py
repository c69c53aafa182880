"""The gateway's store behind OpenAI `url` answers: bounded by bytes (least recently used out first) and by age."""

from __future__ import annotations

import pytest

from gateway.image_store import ImageStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_least_recently_used_go_first_when_full() -> None:
    store = ImageStore(max_bytes=30, ttl_s=60, clock=Clock())
    a, b = store.put(b"a" * 10), store.put(b"b" * 10)
    store.put(b"c" * 10)
    assert store.get(a) == b"a" * 10  # a is now the most recently used; b the least
    d = store.put(b"d" * 10)
    assert store.get(b) is None
    assert store.get(a) == b"a" * 10 and store.get(d) == b"d" * 10
    assert store.bytes == 30 and len(store) == 3
    store.put(b"e" * 25)  # makes room for itself only
    assert len(store) == 1 and store.bytes == 25


def test_images_expire_after_ttl_even_when_fetched() -> None:
    clock = Clock()
    store = ImageStore(max_bytes=100, ttl_s=10, clock=clock)
    old = store.put(b"old")
    clock.now = 6
    new = store.put(b"new")
    assert store.get(old) == b"old"  # a fetch does not extend the URL's life
    clock.now = 10
    assert store.get(old) is None and store.get(new) == b"new"
    clock.now = 16
    assert store.get(new) is None and store.bytes == 0 and len(store) == 0


def test_ids_are_unguessable_and_sizes_are_checked() -> None:
    store = ImageStore(max_bytes=10, ttl_s=1)
    ids = {store.put(b"x") for _ in range(5)}
    assert len(ids) == 5 and all(len(i) >= 24 for i in ids)
    assert store.fits([5, 5]) and not store.fits([5, 6])
    with pytest.raises(ValueError, match="11 bytes does not fit the image store"):
        store.put(b"y" * 11)
    with pytest.raises(ValueError, match="ttl_s=0"):
        ImageStore(max_bytes=10, ttl_s=0)
