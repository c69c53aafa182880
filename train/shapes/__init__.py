"""The `shapes` model: a small SD-architecture model trained on procedural shape images."""
