"""Staff API keys: `sk-agency-<prefix>_<secret>`.

The prefix (12 lowercase base32 characters) is public and is the lookup id; the secret is 32
random bytes, urlsafe base64. Only the key's hash is stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

KEY_PREFIX = "sk-agency-"
PREFIX_LENGTH = 12
SECRET_BYTES = 32
_MAX_KEY_CHARS = 256
_KEY_RE = re.compile(r"sk-agency-([a-z0-9]{12})_([A-Za-z0-9_-]{43,})")


@dataclass(frozen=True)
class MintedKey:
    key: str  # shown to its owner once, never stored
    prefix: str
    key_hash: str

    def __repr__(self) -> str:
        return f"MintedKey(prefix={self.prefix!r}, key=<redacted>)"


def mint_key() -> MintedKey:
    prefix = base64.b32encode(secrets.token_bytes(10)).decode().lower()[:PREFIX_LENGTH]
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"
    return MintedKey(key=key, prefix=prefix, key_hash=hash_key(key))


def parse_key(token: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None."""
    if not isinstance(token, str) or len(token) > _MAX_KEY_CHARS:
        return None
    match = _KEY_RE.fullmatch(token)
    return (match.group(1), match.group(2)) if match else None


def looks_like_api_key(token: object) -> bool:
    """True when the bearer value is meant as an API key (well-formed or not), not a JWT."""
    return isinstance(token, str) and token.startswith(KEY_PREFIX)


def hash_key(token: str) -> str:
    # A plain SHA-256 is right here: the key carries 256 random bits, so there is nothing to
    # brute-force, and a slow password hash would only add latency to every request.
    return hashlib.sha256(token.encode()).hexdigest()


def verify_key_hash(token: object, stored_hash: object) -> bool:
    """Whether `token` hashes to `stored_hash`; False for anything that is not a string (a row
    read from the database, a header value)."""
    if not isinstance(token, str) or not isinstance(stored_hash, str):
        return False
    return hmac.compare_digest(hash_key(token).encode(), stored_hash.lower().encode())
