"""The realm's people, read from Keycloak's admin REST API: who a trusted front end acts for.

A chat front end (Open WebUI) signs people in itself and forwards only who they are (their
e-mail). The gateway then asks the realm, as its directory client (client credentials, with the
realm-management role `view-users`), for that person's account: their user id (the `sub` of
their own access tokens), username, whether the account is enabled, their groups and their
effective realm roles. `claims()` lays these out as Keycloak's access token would, so the rest of
the platform resolves tenant and roles exactly as it does for a signed-in caller.

Entries are reused for `cache_seconds` (found or not), so a request does not wait on Keycloak;
a disabled account or a changed group takes effect within that time.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

_MAX_CACHED = 10_000
_TOKEN_MARGIN_SECONDS = 30.0
_MAX_BODY_BYTES = 1024 * 1024


class DirectoryUnavailable(Exception):
    """Keycloak could not be asked (down, refusing the directory client, or answering nonsense).
    The message is for the logs; callers answer 503."""


@dataclass(frozen=True)
class Person:
    subject: str  # Keycloak's user id: the `sub` of this person's access tokens
    username: str
    email: str
    realm_roles: tuple[str, ...]
    group_paths: tuple[str, ...]
    attributes: dict[str, list[str]] = field(default_factory=dict)

    def claims(self) -> dict[str, Any]:
        """The claims a Keycloak 26 access token of this person carries (with the realm's
        group-membership mapper on full paths, and user-attribute mappers for attributes)."""
        single = {name: values[0] if len(values) == 1 else values for name, values in self.attributes.items()}
        return single | {
            "sub": self.subject,
            "preferred_username": self.username,
            "email": self.email,
            "realm_access": {"roles": list(self.realm_roles)},
            "groups": list(self.group_paths),
        }


class KeycloakDirectory:
    def __init__(
        self,
        issuer: str,
        client_id: str,
        client_secret: str,
        *,
        cache_seconds: float = 60.0,
        http_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        issuer = issuer.rstrip("/")
        base, marker, realm = issuer.rpartition("/realms/")
        if not marker or not realm or "/" in realm:
            raise ValueError("the issuer is not a Keycloak realm URL (…/realms/<realm>)")
        self.token_url = f"{issuer}/protocol/openid-connect/token"
        self.admin_url = f"{base}/admin/realms/{realm}"
        self.client_id = client_id
        self._client_secret = client_secret
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._http = httpx.AsyncClient(timeout=http_timeout, follow_redirects=False)
        self._token: tuple[str, float] | None = None
        self._token_lock = asyncio.Lock()
        self._cache: OrderedDict[str, tuple[float, Person | None]] = OrderedDict()

    def __repr__(self) -> str:
        return f"KeycloakDirectory(admin_url={self.admin_url!r}, client_id={self.client_id!r})"

    async def person_by_email(self, email: str) -> Person | None:
        """The enabled account with exactly this e-mail, or None (none, disabled, or several)."""
        key = email.strip().lower()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            self._cache.move_to_end(key)
            return cached[1]
        person = await self._look_up(key)
        self._cache[key] = (self._clock() + self.cache_seconds, person)
        self._cache.move_to_end(key)
        while len(self._cache) > _MAX_CACHED:
            self._cache.popitem(last=False)
        return person

    async def _look_up(self, email: str) -> Person | None:
        users = await self._get("/users", {"email": email, "exact": "true", "briefRepresentation": "false"})
        # Keycloak's `exact` still folds case; several accounts may share an e-mail if the realm allows it.
        matches = [
            u for u in _objects(users) if str(u.get("email", "")).lower() == email and isinstance(u.get("id"), str)
        ]
        if len(matches) != 1 or matches[0].get("enabled") is not True:
            return None
        user = matches[0]
        groups = await self._get(f"/users/{user['id']}/groups", {"briefRepresentation": "true", "max": "1000"})
        roles = await self._get(f"/users/{user['id']}/role-mappings/realm/composite", {})
        attributes = user.get("attributes")
        if not isinstance(attributes, dict):
            attributes = {}
        return Person(
            subject=user["id"],
            username=str(user.get("username") or email),
            email=email,
            realm_roles=tuple(r["name"] for r in _objects(roles) if isinstance(r.get("name"), str)),
            group_paths=tuple(g["path"] for g in _objects(groups) if isinstance(g.get("path"), str)),
            attributes={
                str(name): [v for v in values if isinstance(v, str)]
                for name, values in attributes.items()
                if isinstance(values, list)
            },
        )

    async def _get(self, path: str, params: dict[str, str]) -> Any:
        for attempt in range(2):
            token = await self._access_token(renew=attempt > 0)
            try:
                response = await self._http.get(
                    f"{self.admin_url}{path}", params=params, headers={"Authorization": f"Bearer {token}"}
                )
            except httpx.HTTPError as exc:
                raise DirectoryUnavailable(f"directory request failed: {type(exc).__name__}") from None
            if response.status_code == 401 and attempt == 0:
                continue  # the token was revoked or the realm's keys rotated: one fresh token
            return _json(response, "directory lookup")
        raise AssertionError("unreachable")

    async def _access_token(self, *, renew: bool) -> str:
        async with self._token_lock:
            if self._token is not None and not renew and self._token[1] > self._clock():
                return self._token[0]
            try:
                response = await self._http.post(
                    self.token_url,
                    data={"grant_type": "client_credentials"},
                    auth=(self.client_id, self._client_secret),
                )
            except httpx.HTTPError as exc:
                raise DirectoryUnavailable(f"directory token request failed: {type(exc).__name__}") from None
            body = _json(response, "directory token request")
            token, lifetime = body.get("access_token"), body.get("expires_in", 60)
            if not isinstance(token, str) or not isinstance(lifetime, int | float):
                raise DirectoryUnavailable("directory token response has no access_token")
            self._token = (token, self._clock() + max(0.0, float(lifetime) - _TOKEN_MARGIN_SECONDS))
            return token

    async def aclose(self) -> None:
        await self._http.aclose()


def _json(response: httpx.Response, what: str) -> Any:
    if response.status_code != 200:
        raise DirectoryUnavailable(f"{what} answered {response.status_code}")
    if len(response.content) > _MAX_BODY_BYTES:
        raise DirectoryUnavailable(f"{what} answered an oversized body")
    try:
        return response.json()
    except ValueError:
        raise DirectoryUnavailable(f"{what} answered something other than JSON") from None


def _objects(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []
