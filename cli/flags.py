"""Config dataclasses -> argparse flags, in one place: each field becomes `--field-name` with the field's default
and the docstring under it as help, so a default and its description live only in the dataclass."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Callable
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_flags(parser: argparse.ArgumentParser | Any, cls: type, parse: dict[str, Callable[[str], Any]] | None = None,
              skip: tuple[str, ...] = ()) -> None:
    """One flag per field. bool fields are switches (`--name`, or `--no-name` when the default is True); tuple
    fields take a comma-separated list; `parse` gives a converter for other types."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = hints[f.name]
        doc = docs.get(f.name, "").replace("%", "%%")
        if kind is bool:
            if default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=doc)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=doc)
            continue
        convert = (parse or {}).get(f.name)
        if convert is None:
            if typing.get_origin(kind) is tuple:
                def convert(text: str) -> tuple[str, ...]:
                    return tuple(t.strip() for t in text.split(",") if t.strip())
            elif kind in (int, float, str):
                convert = kind
            else:
                raise TypeError(f"{cls.__name__}.{f.name}: no flag converter for {kind}")
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(flag, dest=f.name, type=_named(convert, flag), default=default,
                            help=f"{doc} (default: {shown!s})" if shown not in ("", (), {}) else doc)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The dataclass built from the parsed flags (fields without a flag keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def _named(convert: Callable[[str], Any], flag: str) -> Callable[[str], Any]:
    def run(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{flag}: {e}") from None

    run.__name__ = getattr(convert, "__name__", flag)
    return run
