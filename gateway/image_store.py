"""The images `response_format=url` points at: PNGs kept in the gateway's memory under unguessable ids, bounded
by total bytes (least recently used go first) and by age (`ttl_s`), so a URL is good for a while, then 404."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable


class ImageStore:
    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes} must be at least 1")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s={ttl_s} must be more than 0")
        self.max_bytes, self.ttl_s, self.clock = max_bytes, ttl_s, clock
        self._items: OrderedDict[str, bytes] = OrderedDict()
        """id -> PNG, least recently used first."""
        self._expiry: OrderedDict[str, float] = OrderedDict()
        """id -> expiry on `clock`, soonest first (every image lives `ttl_s`, so insertion order)."""
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, data: bytes) -> str:
        """Keep `data`; returns its id. Older images are dropped to make room; one image larger than the whole
        store raises ValueError (a caller asking for several checks `fits` first)."""
        if len(data) > self.max_bytes:
            raise ValueError(f"an image of {len(data)} bytes does not fit the image store ({self.max_bytes} bytes)")
        self._expire()
        while self.bytes + len(data) > self.max_bytes:
            self._drop(next(iter(self._items)))
        image_id = secrets.token_urlsafe(18)  # 144 bits: the URL is the capability, as a signed URL is
        self._items[image_id] = data
        self._expiry[image_id] = self.clock() + self.ttl_s
        self.bytes += len(data)
        return image_id

    def get(self, image_id: str) -> bytes | None:
        """The image, or None when it never existed, expired or was pushed out; a hit counts as recent use."""
        self._expire()
        data = self._items.get(image_id)
        if data is not None:
            self._items.move_to_end(image_id)
        return data

    def fits(self, sizes: list[int]) -> bool:
        """Whether images of these sizes can all be held at once (so one response's URLs all work)."""
        return sum(sizes) <= self.max_bytes

    def _expire(self) -> None:
        now = self.clock()
        while self._expiry and next(iter(self._expiry.values())) <= now:
            self._drop(next(iter(self._expiry)))

    def _drop(self, image_id: str) -> None:
        self.bytes -= len(self._items.pop(image_id))
        del self._expiry[image_id]
