"""`agencyllm login`: OAuth 2.0 device authorization grant against Keycloak (python-keycloak), and
the user's token cache with refresh. No message ever holds a token."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keycloak import KeycloakOpenID

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_CLIENT_ID = "agencyllm-cli"
# Refresh a little before expiry so a token does not lapse on its way to the server.
EXPIRY_SKEW = 30.0
_KEYCLOAK_ISSUER = re.compile(r"^(?P<base>https?://.+?)/realms/(?P<realm>[^/]+)$")


class LoginError(Exception):
    """Login or refresh failed; the message never contains a token."""


def default_token_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "agencyllm" / "token.json"


class TokenCache:
    """Tokens of the signed-in user: `~/.config/agencyllm/token.json` (dir 0700, file 0600)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_token_path()

    def load(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def save(self, data: dict[str, Any]) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        # mkstemp creates the file 0600; os.replace makes the write atomic.
        fd, tmp = tempfile.mkstemp(prefix=".token-", dir=directory)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _seconds(value: Any, default: float) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return default
    return seconds if math.isfinite(seconds) and seconds >= 0 else default


def _printable(text: str) -> str:
    # The prompt shows server-supplied text: keep terminal control sequences out of it.
    return "".join(ch for ch in text if ch.isprintable())


def _record(issuer: str, client_id: str, response: dict[str, Any], now: float) -> dict[str, Any]:
    if not isinstance(response.get("access_token"), str):
        raise LoginError("token endpoint returned no access token")
    record: dict[str, Any] = {
        "issuer": issuer,
        "client_id": client_id,
        "access_token": response["access_token"],
        "token_type": response.get("token_type", "Bearer"),
        "expires_at": now + _seconds(response.get("expires_in"), 300.0),
    }
    if isinstance(response.get("refresh_token"), str):
        record["refresh_token"] = response["refresh_token"]
        # Keycloak sends refresh_expires_in; 0 means an offline token without expiry.
        refresh_in = _seconds(response.get("refresh_expires_in"), 0.0)
        record["refresh_expires_at"] = now + refresh_in if refresh_in > 0 else None
    return record


class _Keycloak:
    """The device, token and refresh calls of one Keycloak realm (python-keycloak)."""

    def __init__(self, issuer: str, client_id: str, timeout: float, verify: bool | str) -> None:
        match = _KEYCLOAK_ISSUER.match(issuer)
        if not match:
            raise LoginError("issuer is not a Keycloak realm URL (https://HOST/realms/REALM)")
        if verify is True and os.environ.get("SSL_CERT_FILE"):
            # python-keycloak (requests) does not read SSL_CERT_FILE itself; the rest of the CLI does.
            verify = os.environ["SSL_CERT_FILE"]
        from keycloak import KeycloakOpenID  # imported lazily: heavy, CLI-only

        self._client = KeycloakOpenID(
            server_url=match["base"] + "/",
            realm_name=match["realm"],
            client_id=client_id,
            verify=verify,
            timeout=int(timeout),
        )

    def device(self, scope: str) -> dict[str, Any]:
        return self._call(lambda kc: kc.device(scope=scope))

    def token(self, device_code: str) -> dict[str, Any]:
        return self._call(lambda kc: kc.token(grant_type=DEVICE_GRANT, device_code=device_code))

    def refresh(self, refresh_token: str) -> dict[str, Any]:
        return self._call(lambda kc: kc.refresh_token(refresh_token))

    def _call(self, fn: Callable[[KeycloakOpenID], dict[str, Any]]) -> dict[str, Any]:
        from keycloak.exceptions import KeycloakConnectionError, KeycloakError

        try:
            return fn(self._client)
        except KeycloakConnectionError:
            raise LoginError("cannot reach the issuer") from None
        except KeycloakError as exc:
            return _json_or_error(exc.response_code or 0, exc.response_body or b"")


class _OAuthError(LoginError):
    def __init__(self, error: str, status: int) -> None:
        super().__init__(f"issuer refused the request: {error} (HTTP {status})")
        self.error = error


def _json_or_error(status: int, body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    if status >= 400 or "error" in doc:
        error = doc.get("error")
        # Only the OAuth error code goes into the message: descriptions may echo input.
        raise _OAuthError(error if isinstance(error, str) and error.isascii() else "unknown_error", status)
    return doc


def device_login(
    issuer: str,
    client_id: str = DEFAULT_CLIENT_ID,
    *,
    print_fn: Callable[[str], None] = print,
    scope: str = "openid",
    cache: TokenCache | None = None,
    timeout: float = 10.0,
    verify: bool | str = True,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Run the device authorization grant, store the tokens, return the cached record."""
    endpoints = _Keycloak(issuer, client_id, timeout, verify)
    grant = endpoints.device(scope)
    device_code, user_code = grant.get("device_code"), grant.get("user_code")
    uri = grant.get("verification_uri")
    if not (isinstance(device_code, str) and isinstance(user_code, str) and isinstance(uri, str)):
        raise LoginError("issuer returned an incomplete device authorization response")
    message = f"To sign in, open {_printable(uri)} and enter the code {_printable(user_code)}"
    if isinstance(grant.get("verification_uri_complete"), str):
        message += f"\n(or open {_printable(grant['verification_uri_complete'])})"
    print_fn(message)

    interval = max(1.0, _seconds(grant.get("interval"), 5.0))
    deadline = clock() + _seconds(grant.get("expires_in"), 600.0)
    while True:
        try:
            response = endpoints.token(device_code)
            break
        except _OAuthError as exc:
            if exc.error == "slow_down":
                interval += 5
            elif exc.error != "authorization_pending":
                raise
        if clock() + interval > deadline:
            raise LoginError("the sign-in code expired before it was used")
        sleep(interval)

    record = _record(issuer, client_id, response, clock())
    (cache or TokenCache()).save(record)
    return record


def refresh_tokens(
    cache: TokenCache | None = None,
    *,
    timeout: float = 10.0,
    verify: bool | str = True,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Exchange the cached refresh token for new tokens and store them."""
    cache = cache or TokenCache()
    record = cache.load()
    fields = ("refresh_token", "issuer", "client_id")
    if not record or not all(isinstance(record.get(f), str) for f in fields):
        raise LoginError("not signed in: run `agencyllm login`")
    refresh_expires_at = record.get("refresh_expires_at")
    if not isinstance(refresh_expires_at, int | float):
        refresh_expires_at = None
    elif refresh_expires_at <= clock():
        raise LoginError("session expired: run `agencyllm login`")
    endpoints = _Keycloak(record["issuer"], record["client_id"], timeout, verify)
    response = endpoints.refresh(record["refresh_token"])
    new = _record(record["issuer"], record["client_id"], response, clock())
    # Keycloak may rotate refresh tokens; keep the old one only when no new one came back.
    new.setdefault("refresh_token", record["refresh_token"])
    new.setdefault("refresh_expires_at", refresh_expires_at)
    cache.save(new)
    return new


def cached_access_token(
    cache: TokenCache | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> str | None:
    """A valid access token from the cache, refreshed if needed; None when signed out."""
    cache = cache or TokenCache()
    record = cache.load()
    token = record.get("access_token") if record else None
    if record is None or not isinstance(token, str):
        return None
    expires_at = record.get("expires_at")
    if isinstance(expires_at, int | float) and expires_at - EXPIRY_SKEW > clock():
        return token
    try:
        token = refresh_tokens(cache, clock=clock)["access_token"]
        return token if isinstance(token, str) else None
    except LoginError:
        return None
