"""Which bundle versions are loaded: lazy loads, a memory budget with LRU eviction, pins, and hot publish
(`pool.py`); what a version is without loading it (`card.py`); the store's versions and aliases (`catalog.py`);
the settings (`config.py`, light: `kiln serve`'s flags come from it)."""
