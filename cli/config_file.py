"""`kiln serve --config kiln.toml` (and `kiln gateway --config`): a TOML file whose keys are the command's long
flags (`port = 50051`, `auth-db = "sqlite:///auth.db"`, `no-batching = true`); flags given on the command line
override it. Unknown keys, and values of the wrong type, are errors naming the key."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


def config_path(argv: list[str]) -> str | None:
    """The value of `--config PATH` or `--config=PATH` in argv, if any."""
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def _actions(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long flag name (without dashes) -> its action, for every flag but --help and --config."""
    out = {}
    for action in sub._actions:
        for option in action.option_strings:
            if option.startswith("--") and option not in ("--help", "--config"):
                out[option[2:]] = action
    return out


def _value(key: str, action: argparse.Action, value: Any) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._AppendAction):
        values = value if isinstance(value, list) else [value]
        return [_value(key, argparse.Action([], key, type=action.type), v) for v in values]
    if isinstance(value, list):  # comma-separated flags (`cors-allow-origins = ["a", "b"]`)
        value = ",".join(str(v) for v in value)
    if isinstance(value, (dict, bool)) or value is None:
        raise ConfigError(f"{key} = {value!r}: expected a {'number' if action.type in (int, float) else 'string'}")
    convert = action.type
    if convert in (int, float) and not isinstance(value, (int, float)) or convert is int and isinstance(value, float):
        raise ConfigError(f"{key} = {value!r}: expected {'an integer' if convert is int else 'a number'}")
    try:
        value = convert(value if convert in (int, float) else str(value)) if convert else str(value)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{key} = {value!r}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(map(str, action.choices))}")
    return value


def apply(sub: argparse.ArgumentParser, path: str) -> None:
    """Sets `sub`'s defaults from the file (so command-line flags still win)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not TOML: {e}") from None
    actions = _actions(sub)
    defaults = {}
    for key, value in data.items():
        action = actions.get(key.replace("_", "-"))
        if action is None:
            raise ConfigError(f"--config {path}: unknown key {key!r}; the keys are the long flags of "
                              f"`kiln {sub.prog.split()[-1]}`: {', '.join(sorted(actions))}")
        defaults[action.dest] = _value(key, action, value)
        action.required = False
    sub.set_defaults(**defaults)
