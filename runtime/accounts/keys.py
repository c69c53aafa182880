"""API keys: `kiln_<id>_<secret>`. The id is public (it names the key in listings and logs); only a SHA-256
of the secret is stored, and a presented secret is compared with it in constant time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "kiln"
KEY_RE = re.compile(r"^kiln_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class NewKey:
    key_id: str
    """Public id: shown by `kiln keys list`, used by `kiln keys revoke`."""
    secret_hash: str
    """Hex SHA-256 of the secret part: what the ledger stores."""
    token: str
    """The whole key, shown once to its owner and never stored."""


def new_key() -> NewKey:
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return NewKey(key_id, hash_secret(secret), f"{PREFIX}_{key_id}_{secret}")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    m = KEY_RE.match(token)
    return (m.group(1), m.group(2)) if m else None


def matches(secret: str, stored_hash: str) -> bool:
    """Whether `secret` hashes to `stored_hash`, compared in constant time."""
    return hmac.compare_digest(hash_secret(secret).encode(), stored_hash.encode())
