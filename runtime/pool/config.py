"""`kiln serve`'s model pool settings (flags and config-file keys come from these fields: cli/flags.py)."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.pool.memory import parse_budget

ENGINES = ("onnxruntime", "openvino", "auto")
"""`auto`: chosen per bundle version at load (runtime/engine_choice.py)."""


@dataclass(frozen=True)
class PoolConfig:
    memory_budget: str = ""
    """Most memory the loaded models may hold: bytes, a size (8G, 7.5GiB, 512M) or a share of the machine's (or the
    container's) memory (60%). A model that would pass it evicts the least recently used idle models first; models in
    use are never evicted (a load waits for them to finish). Each model counts the resident memory the process grew
    by while loading it (at least its files' size). Empty: no budget, models stay loaded."""
    preload: tuple[str, ...] = ("all",)
    """Models loaded at start: all (as many as the budget holds), none (each loads on its first request), or names.
    A model not loaded yet loads on its first request, which waits for it (with `loading` progress events)."""
    pin: tuple[str, ...] = ()
    """Models loaded at start and never evicted (names)."""
    watch: bool = True
    """Notice new bundles, versions and aliases in the store while serving (hot publish): a new version of a loaded
    model is verified and loaded in the background, then new requests switch to it; in-flight ones finish on the old."""
    watch_poll_s: float = 0.0
    """Look for store changes every this many seconds instead of waiting for file-system events (for network file
    systems that send none); 0: file-system events."""
    model_engine: tuple[str, ...] = ()
    """Per-model inference engine, NAME=ENGINE (onnxruntime, openvino or auto), comma-separated; other models use
    --engine."""

    def __post_init__(self) -> None:
        parse_budget(self.memory_budget)  # raises ValueError naming the value
        if self.watch_poll_s < 0:
            raise ValueError(f"watch_poll_s={self.watch_poll_s} must be 0 (file-system events) or more")
        if ("all" in self.preload or "none" in self.preload) and len(self.preload) > 1:
            raise ValueError(f"preload={','.join(self.preload)}: give all, none, or model names")
        self.engines()

    @property
    def budget(self) -> int | None:
        return parse_budget(self.memory_budget)

    def engines(self) -> dict[str, str]:
        out = {}
        for item in self.model_engine:
            name, sep, engine = item.partition("=")
            if not sep or not name or engine not in ENGINES:
                raise ValueError(f"model_engine {item!r} must be NAME=ENGINE with ENGINE one of {', '.join(ENGINES)}")
            out[name] = engine
        return out

    def preloads(self, name: str) -> bool:
        return name in self.pin or "all" in self.preload or name in self.preload
