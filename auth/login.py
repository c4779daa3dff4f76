"""`agencyllm login`: OAuth 2.0 device authorization grant and the user's token cache."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_CLIENT_ID = "agencyllm-cli"
# Refresh a little before expiry so a token does not lapse on its way to the server.
EXPIRY_SKEW = 30.0
_KEYCLOAK_ISSUER = re.compile(r"^(?P<base>https?://.+?)/realms/(?P<realm>[^/]+)$")

Backend = Literal["auto", "keycloak", "http"]


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


class _Endpoints:
    """Device/token calls through python-keycloak for Keycloak issuers, plain HTTP otherwise."""

    def __init__(self, issuer: str, client_id: str, backend: Backend, timeout: float, verify: bool | str):
        self.issuer = issuer
        self.client_id = client_id
        self.timeout = timeout
        self.verify = verify
        match = _KEYCLOAK_ISSUER.match(issuer)
        if backend == "keycloak" and not match:
            raise LoginError("issuer is not a Keycloak realm URL")
        self._keycloak = None
        if verify is True and os.environ.get("SSL_CERT_FILE"):
            # httpx honours SSL_CERT_FILE itself; python-keycloak (requests) needs it passed.
            self.verify = verify = os.environ["SSL_CERT_FILE"]
        if match and backend != "http":
            from keycloak import KeycloakOpenID  # imported lazily: heavy, CLI-only

            self._keycloak = KeycloakOpenID(
                server_url=match["base"] + "/",
                realm_name=match["realm"],
                client_id=client_id,
                verify=verify,
                timeout=int(timeout),
            )
        self._discovery: dict[str, Any] | None = None

    def discovery(self) -> dict[str, Any]:
        if self._discovery is None:
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                response = httpx.get(url, timeout=self.timeout, verify=self.verify)
                response.raise_for_status()
                doc = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise LoginError(f"cannot read the issuer's discovery document: {type(exc).__name__}") from None
            if doc.get("issuer") != self.issuer:
                raise LoginError("discovery issuer does not match the configured issuer")
            self._discovery = doc
        return self._discovery

    def _post(self, endpoint_name: str, data: dict[str, str]) -> dict[str, Any]:
        url = self.discovery().get(endpoint_name)
        if not isinstance(url, str):
            raise LoginError(f"issuer does not advertise {endpoint_name}")
        try:
            response = httpx.post(
                url, data={"client_id": self.client_id, **data}, timeout=self.timeout, verify=self.verify
            )
        except httpx.HTTPError as exc:
            raise LoginError(f"cannot reach the issuer: {type(exc).__name__}") from None
        return _json_or_error(response.status_code, response.content)

    def device(self, scope: str) -> dict[str, Any]:
        if self._keycloak is not None:
            return self._call(lambda kc: kc.device(scope=scope))
        return self._post("device_authorization_endpoint", {"scope": scope})

    def token(self, device_code: str) -> dict[str, Any]:
        if self._keycloak is not None:
            return self._call(lambda kc: kc.token(grant_type=DEVICE_GRANT, device_code=device_code))
        return self._post("token_endpoint", {"grant_type": DEVICE_GRANT, "device_code": device_code})

    def refresh(self, refresh_token: str) -> dict[str, Any]:
        if self._keycloak is not None:
            return self._call(lambda kc: kc.refresh_token(refresh_token))
        return self._post("token_endpoint", {"grant_type": "refresh_token", "refresh_token": refresh_token})

    def _call(self, fn: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        from keycloak.exceptions import KeycloakConnectionError, KeycloakError

        try:
            return fn(self._keycloak)
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
    backend: Backend = "auto",
    timeout: float = 10.0,
    verify: bool | str = True,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Run the device authorization grant, store the tokens, return the cached record."""
    endpoints = _Endpoints(issuer, client_id, backend, timeout, verify)
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
    backend: Backend = "auto",
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
    endpoints = _Endpoints(record["issuer"], record["client_id"], backend, timeout, verify)
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
    backend: Backend = "auto",
    clock: Callable[[], float] = time.time,
) -> str | None:
    """A valid access token from the cache, refreshed if needed; None when signed out."""
    cache = cache or TokenCache()
    record = cache.load()
    if not record or not isinstance(record.get("access_token"), str):
        return None
    expires_at = record.get("expires_at")
    if isinstance(expires_at, int | float) and expires_at - EXPIRY_SKEW > clock():
        return record["access_token"]
    try:
        return refresh_tokens(cache, backend=backend, clock=clock)["access_token"]
    except LoginError:
        return None
