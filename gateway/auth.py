"""Who is calling: the API key an HTTP request carries (passed through to the gRPC server, which owns accounts,
credits, rates and tiers), and a stable, secret-free id for the gateway's per-client state (chosen model,
progress, interrupt)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

from gateway.errors import ApiError


def api_key(headers: Mapping[str, str], api_auth: Mapping[str, str]) -> str:
    """`Authorization: Bearer KEY`, `X-API-Key: KEY`, or basic auth (AUTOMATIC1111's `--api-auth`): a listed
    `user:password` maps to its key; without a list the password is the key. "" when the request has none."""
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    scheme, token = scheme.lower(), token.strip()
    if scheme == "bearer" and token:
        return token
    if scheme == "basic" and token:
        try:
            cred = base64.b64decode(token, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _unauthenticated("the Authorization header's basic credentials are not base64 of USER:PASSWORD") \
                from None
        user, sep, password = cred.partition(":")
        if not sep:
            raise _unauthenticated("the Authorization header's basic credentials are not USER:PASSWORD")
        if api_auth:
            for known, key in api_auth.items():
                if hmac.compare_digest(known.encode(), cred.encode()):
                    return key
            raise _unauthenticated(f"unknown user {user[:40]!r} or wrong password")
        return password
    if value and scheme not in ("bearer", "basic"):
        raise _unauthenticated("the Authorization header must be `Bearer API_KEY` or basic credentials")
    return headers.get("x-api-key", "").strip()


def client_id(key: str) -> str:
    """Per-client state is kept under a hash of the key (never the key); callers without one share a slot."""
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:16] if key else "anonymous"


def _unauthenticated(message: str) -> ApiError:
    return ApiError(401, "UNAUTHENTICATED", message, reason="BAD_CREDENTIALS",
                    headers={"WWW-Authenticate": 'Bearer realm="kiln", Basic realm="kiln"'})
