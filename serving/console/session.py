"""Console sessions: an AES-GCM encrypted, HttpOnly cookie, so every ingress replica can read it.

The cookie holds the credential the console acts with (the Keycloak access and refresh tokens, or
the pasted platform-admin key), the CSRF token of the session and its timestamps. Nothing is kept
in the browser's storage; JavaScript cannot read the cookie. The encryption key comes from
`AGENCYLLM_CONSOLE_SESSION_SECRET` or, unset, from `DATA_DIR/console.key` (created on first use).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agencyllm.serving.settings import Settings

SESSION_COOKIE = "agencyllm_console"
FLOW_COOKIE = "agencyllm_console_signin"
KEY_FILE = "console.key"
# Browsers drop cookies over 4096 bytes (name and attributes included).
MAX_COOKIE_CHARS = 3900
FLOW_SECONDS = 600


class SessionTooLarge(Exception):
    pass


@dataclass
class Session:
    kind: Literal["oidc", "key"]
    credential: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    refresh_token: str | None = None
    credential_expires: float | None = None
    signed_in: float = field(default_factory=time.time)
    seen: float = field(default_factory=time.time)
    # One-time message for the next page (a minted key is shown once this way).
    flash: dict[str, Any] | None = None


def _read_or_create_key(path: Path) -> bytes:
    try:
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (FileNotFoundError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another replica won the race (or the file was corrupt: refuse)
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secrets.token_bytes(32).hex() + "\n")
    return bytes.fromhex(path.read_text(encoding="ascii").strip())


def session_key(settings: Settings) -> bytes:
    if settings.console_session_secret is not None:
        secret = settings.console_session_secret.get_secret_value().encode()
        return hashlib.sha256(b"agencyllm-console-session\0" + secret).digest()
    return _read_or_create_key(Path(settings.data_dir) / KEY_FILE)


class CookieBox:
    """Seals and opens cookie values; the cookie's name is bound in, so values cannot be swapped."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the console session key must be 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, name: str, data: dict[str, Any]) -> str:
        nonce = secrets.token_bytes(12)
        plain = zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 9)
        sealed = base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, plain, name.encode()))
        value = sealed.decode().rstrip("=")
        if len(value) > MAX_COOKIE_CHARS:
            raise SessionTooLarge(f"{len(value)} characters")
        return value

    def open(self, name: str, value: str | None) -> dict[str, Any] | None:
        if not value or len(value) > MAX_COOKIE_CHARS:
            return None
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            plain = self._aead.decrypt(raw[:12], raw[12:], name.encode())
            data = json.loads(zlib.decompress(plain))
        except (ValueError, InvalidTag, zlib.error):
            return None
        return data if isinstance(data, dict) else None


def load_session(box: CookieBox, value: str | None, settings: Settings, now: float | None = None) -> Session | None:
    """The session in the cookie, or None if absent, forged, idle too long or too old."""
    data = box.open(SESSION_COOKIE, value)
    if data is None:
        return None
    try:
        session = Session(**data)
    except TypeError:
        return None
    now = time.time() if now is None else now
    if now - session.seen > settings.console_idle_minutes * 60:
        return None
    if now - session.signed_in > settings.console_max_hours * 3600:
        return None
    return session


def dump_session(box: CookieBox, session: Session) -> str:
    return box.seal(SESSION_COOKIE, asdict(session))
