"""What a parsed JSON body may hold before the gateway keeps it, echoes it or sends it on: nesting at most
`MAX_DEPTH` deep (pydantic cannot echo much deeper), and strings UTF-8 can encode (JSON's `"\\ud800"` escape
decodes to a lone surrogate, which protobuf and every JSON response refuse). Either is a 422 naming the field."""

from __future__ import annotations

from typing import Any

from gateway.errors import bad_request

MAX_DEPTH = 64


def check(body: dict[str, Any]) -> None:
    """Raises the 422 for the first field of `body` that breaks a rule."""
    for key, value in body.items():
        _check(value, shown(str(key)), shown(str(key)), 1)


def _check(value: Any, field: str, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise bad_request(field, f"{field} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        if not encodable(value):
            raise bad_request(field, f"{where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
                                     "strings must be valid Unicode")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check(item, field, f"{where}.{shown(str(key))}", depth + 1)
            if isinstance(key, str) and not encodable(key):
                raise bad_request(field, f"a key in {where} holds a lone UTF-16 surrogate; keys must be valid Unicode")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check(item, field, f"{where}[{i}]", depth + 1)


def encodable(text: str) -> bool:
    if text.isascii():  # O(1) in CPython: base64 images cost nothing here
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(text: str) -> str:
    """`text` with lone surrogates written as `\\udXXX`, so that an error naming it can be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
