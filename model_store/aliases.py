"""Model references (`NAME`, `NAME@VERSION`, an alias) and the store's aliases file.

An alias names one version of one model: `kiln models alias tiny@20261205-1200 stable` lets requests say `stable`
(or `tiny@stable`). An alias spelled like its model's own name pins what the plain name serves: `kiln models alias
tiny@OLDER tiny` is a rollback, undone by `kiln models alias --remove tiny`. Aliases live in `STORE/aliases.json`,
written atomically, so a running server picks a change up as it does a new bundle.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

ALIASES_FILE = "aliases.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Model names, versions and aliases: letters, digits, `.`, `_`, `-`; at most 128 characters."""


class AliasError(ValueError):
    """A malformed reference or alias, or one that names nothing in the store."""


@dataclass(frozen=True)
class ModelRef:
    """What a request names: a model (or an alias) and, optionally, a version (or an alias of one)."""

    name: str
    version: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, at, version = text.partition("@")
        for what, value in (("name", name), ("version", version)):
            if (value or what == "name" or at) and not NAME_RE.match(value):
                raise AliasError(f"model {text!r}: the {what} {value!r} must be 1 to 128 letters, digits, '.', '_' "
                                 "or '-', starting with a letter or digit (NAME or NAME@VERSION)")
        return cls(name, version)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


def read_aliases(root: Path) -> dict[str, ModelRef]:
    """alias -> the NAME@VERSION it names; {} without an aliases file. Raises AliasError for a malformed file."""
    path = Path(root) / ALIASES_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise AliasError(f"{path}: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("aliases", {}), dict):
        raise AliasError(f"{path}: expected {{\"aliases\": {{ALIAS: \"NAME@VERSION\"}}}}")
    out = {}
    for alias, target in raw.get("aliases", {}).items():
        ref = ModelRef.parse(str(target))
        if not NAME_RE.match(alias) or not ref.version:
            raise AliasError(f"{path}: alias {alias!r} -> {target!r} is not ALIAS -> NAME@VERSION")
        out[alias] = ref
    return out


def write_aliases(root: Path, aliases: dict[str, ModelRef]) -> None:
    """Replace the aliases file atomically (write a temporary file beside it, fsync, rename)."""
    root = Path(root)
    body = json.dumps({"aliases": {a: str(r) for a, r in sorted(aliases.items())}}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".aliases-", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / ALIASES_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_alias(root: Path, target: ModelRef, alias: str, versions: list[str], names: list[str]) -> None:
    """Point `alias` at `target` (NAME@VERSION, which must be one of `versions` of NAME). An alias may not take
    another model's name (it would hide that model); its own model's name is allowed: that pins the plain name."""
    if not target.version:
        raise AliasError(f"{target}: give the version the alias names (NAME@VERSION); versions: {', '.join(versions)}")
    if target.version not in versions:
        raise AliasError(f"{target.name} has no version {target.version!r}; versions: {', '.join(versions) or 'none'}")
    if not NAME_RE.match(alias):
        raise AliasError(f"alias {alias!r} must be 1 to 128 letters, digits, '.', '_' or '-'")
    if alias in names and alias != target.name:
        raise AliasError(f"alias {alias!r} is another model's name; pick a name no model has")
    aliases = read_aliases(root)
    aliases[alias] = target
    write_aliases(root, aliases)


def remove_alias(root: Path, alias: str) -> ModelRef:
    aliases = read_aliases(root)
    if alias not in aliases:
        raise AliasError(f"no alias {alias!r}; aliases: {', '.join(sorted(aliases)) or 'none'}")
    target = aliases.pop(alias)
    write_aliases(root, aliases)
    return target
