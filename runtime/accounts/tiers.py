"""Tiers: the limits and daily credits each API key gets, read from a TOML file."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_TIERS = Path(__file__).with_name("tiers.toml")
"""The tiers file Kiln ships: `free`, `pro` and `admin`."""


@dataclass(frozen=True)
class Tier:
    name: str
    """The tier's name, as keys refer to it (`kiln keys create --tier NAME`)."""
    daily_credits: int
    """Credits per key per UTC day."""
    requests_per_minute: int
    """Sustained requests per minute per key; bursts of up to this many are allowed."""
    max_concurrent: int
    """Requests per key in flight at once."""
    max_steps: int
    """Largest `steps` a request may ask for."""
    max_pixels: int
    """Largest width x height a request may ask for."""
    max_images: int
    """Largest `num_images` a request may ask for."""
    models: tuple[str, ...]
    """Bundle names the tier may use; `*` allows all."""
    admin: bool = False
    """Whether keys of this tier may call the admin RPCs (GrantCredits, CreateKey, RevokeKey, LoadModel,
    UnloadModel)."""

    def allows_model(self, model: str) -> bool:
        return "*" in self.models or model in self.models


_INT_FIELDS = ("daily_credits", "requests_per_minute", "max_concurrent", "max_steps", "max_pixels", "max_images")


def load_tiers(path: str | Path = DEFAULT_TIERS) -> dict[str, Tier]:
    """Every `[tiers.NAME]` table of the file; errors name the file, tier and field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"tiers file {path}: {e}") from e
    tables = data.get("tiers")
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"tiers file {path}: no [tiers.NAME] tables")
    known = {f.name for f in fields(Tier)} - {"name"}
    tiers = {}
    for name, table in tables.items():
        where = f"tiers file {path}, tier {name!r}"
        if not isinstance(table, dict):
            raise ValueError(f"{where}: expected a table")
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(known))}")
        missing = [f for f in (*_INT_FIELDS, "models") if f not in table]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        for f in _INT_FIELDS:
            value = table[f]
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if f == "daily_credits" else 1):
                low = 0 if f == "daily_credits" else 1
                raise ValueError(f"{where}: {f}={value!r} must be an integer of at least {low}")
        models = table["models"]
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"{where}: models={models!r} must be a non-empty list of bundle names or [\"*\"]")
        admin = table.get("admin", False)
        if not isinstance(admin, bool):
            raise ValueError(f"{where}: admin={admin!r} must be true or false")
        tiers[name] = Tier(name=name, models=tuple(models), admin=admin, **{f: table[f] for f in _INT_FIELDS})
    return tiers
