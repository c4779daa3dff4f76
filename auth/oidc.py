"""Verification of OIDC access tokens (Keycloak) following RFC 8725, with a cached JWKS."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import httpx
import jwt

PUBLIC_MESSAGE = "Invalid or expired credentials"
# Asymmetric algorithms only: HS* with a public key as secret and `none` are never accepted.
_SUPPORTED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"})
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_ACCESS_TOKEN_HEADER_TYPES = frozenset({"jwt", "at+jwt", "application/at+jwt"})
MAX_TOKEN_CHARS = 32 * 1024
_MAX_DOCUMENT_BYTES = 1024 * 1024


class AuthenticationError(Exception):
    """A credential was refused. `public_message` is for the client, `reason` for the logs only."""

    public_message = PUBLIC_MESSAGE

    def __init__(self, reason: str) -> None:
        super().__init__(PUBLIC_MESSAGE)
        self.reason = reason

    def __repr__(self) -> str:
        return f"AuthenticationError(reason={self.reason!r})"


class _Key(NamedTuple):
    key: Any  # a `cryptography` public key
    kty: str
    alg: str | None
    crv: str | None


def _kty_for(alg: str) -> str:
    return "EC" if alg.startswith("ES") else "RSA"


class OIDCVerifier:
    """Verifies bearer tokens from one issuer for one audience.

    Discovery and the JWKS are fetched lazily and cached in memory. An unknown `kid` triggers at
    most one JWKS refetch per `refetch_cooldown` seconds (concurrent requests share it); cached keys
    keep validating while the issuer is unreachable. The JWKS is also refreshed when older than
    `jwks_max_age`, so a key the issuer withdrew stops validating without a restart.
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        leeway: int = 30,
        algorithms: Iterable[str] = ("RS256", "PS256", "ES256"),
        refetch_cooldown: float = 30.0,
        http_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        jwks_max_age: float = 3600.0,
    ) -> None:
        if not issuer or not audience:
            raise ValueError("issuer and audience are required")
        if not 0 <= leeway <= 60:
            raise ValueError("leeway must be between 0 and 60 seconds")
        algs = tuple(algorithms)
        bad = [a for a in algs if a not in _SUPPORTED_ALGORITHMS]
        if bad or not algs:
            raise ValueError(f"unsupported or symmetric algorithms: {bad or 'none given'}")
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.algorithms = algs
        self.refetch_cooldown = refetch_cooldown
        self.jwks_max_age = jwks_max_age
        self._http_timeout = http_timeout
        self._clock = clock
        self._client: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()
        self._discovery: dict[str, Any] | None = None
        self._keys: dict[str, _Key] | None = None
        self._keys_loaded_at = 0.0
        self._next_fetch_at = float("-inf")
        self._generation = 0

    # -- HTTP ---------------------------------------------------------------------------------

    async def _get_json(self, url: str) -> dict[str, Any]:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._http_timeout, follow_redirects=False)
        response = await self._client.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        if len(response.content) > _MAX_DOCUMENT_BYTES:
            raise ValueError("document too large")
        doc = response.json()
        if not isinstance(doc, dict):
            raise ValueError("document is not a JSON object")
        return doc

    async def discovery(self) -> dict[str, Any]:
        """The issuer's OpenID configuration (fetched once, then cached)."""
        if self._discovery is None:
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                doc = await self._get_json(url)
            except (httpx.HTTPError, ValueError) as exc:
                raise AuthenticationError(f"discovery failed: {type(exc).__name__}") from None
            if doc.get("issuer") != self.issuer:
                raise AuthenticationError("discovery issuer does not match the configured issuer")
            if not isinstance(doc.get("jwks_uri"), str):
                raise AuthenticationError("discovery document has no jwks_uri")
            self._discovery = doc
        return dict(self._discovery)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- keys ---------------------------------------------------------------------------------

    @staticmethod
    def _parse_jwks(doc: dict[str, Any]) -> dict[str, _Key]:
        keys: dict[str, _Key] = {}
        for data in doc.get("keys") or []:
            if not isinstance(data, dict):
                continue
            kid = data.get("kid")
            # Only signature keys: Keycloak also publishes RSA-OAEP encryption keys.
            if not isinstance(kid, str) or not kid or data.get("use", "sig") != "sig":
                continue
            if data.get("kty") not in ("RSA", "EC"):
                continue
            try:
                key = jwt.PyJWK(data).key
            except jwt.PyJWTError:
                continue
            keys[kid] = _Key(key, data["kty"], data.get("alg"), data.get("crv"))
        return keys

    async def _fetch_jwks(self) -> None:
        doc = await self.discovery()
        try:
            jwks = await self._get_json(doc["jwks_uri"])
        except (httpx.HTTPError, ValueError) as exc:
            raise AuthenticationError(f"JWKS fetch failed: {type(exc).__name__}") from None
        self._keys = self._parse_jwks(jwks)
        self._keys_loaded_at = self._clock()

    def _fresh(self, now: float) -> bool:
        return self._keys is not None and now - self._keys_loaded_at < self.jwks_max_age

    async def _key(self, kid: str) -> _Key:
        if self._fresh(self._clock()) and kid in self._keys:  # type: ignore[operator]
            return self._keys[kid]  # type: ignore[index]
        generation = self._generation
        failure: AuthenticationError | None = None
        async with self._lock:
            now = self._clock()
            # Waiters queued behind a fetch share its result instead of fetching again.
            if self._generation == generation and not (self._fresh(now) and kid in self._keys):  # type: ignore[operator]
                if now >= self._next_fetch_at:
                    # The first load does not start the cooldown, so a rotation right after
                    # start-up is still picked up; every later fetch does.
                    if self._keys is not None:
                        self._next_fetch_at = now + self.refetch_cooldown
                    try:
                        await self._fetch_jwks()
                    except AuthenticationError as exc:
                        # With no keys at all every request fails anyway: retry sooner.
                        backoff = self.refetch_cooldown if self._keys else min(self.refetch_cooldown, 5.0)
                        self._next_fetch_at = now + backoff
                        failure = exc
                    finally:
                        self._generation += 1
            # If the issuer is unreachable, the keys already cached keep validating.
            if self._keys is not None and kid in self._keys:
                return self._keys[kid]
        raise failure or AuthenticationError("unknown kid")

    # -- verification -------------------------------------------------------------------------

    def _check_time(self, claims: dict[str, Any]) -> None:
        now = self._clock()
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name)
            if name in claims and (
                isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            ):
                raise AuthenticationError(f"claim {name} is not a number")
        if claims["exp"] <= now - self.leeway:
            raise AuthenticationError("token expired")
        if claims["iat"] > now + self.leeway:
            raise AuthenticationError("token issued in the future")
        if "nbf" in claims and claims["nbf"] > now + self.leeway:
            raise AuthenticationError("token not yet valid")

    async def verify(self, token: str) -> dict[str, Any]:
        """Validated claims of `token`, or AuthenticationError."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise AuthenticationError("token missing or oversized")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"malformed token: {type(exc).__name__}") from None

        alg = header.get("alg")
        if alg not in self.algorithms:
            raise AuthenticationError(f"algorithm not allowed: {str(alg)[:16]!r}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError("token header has no kid")
        if "crit" in header:
            raise AuthenticationError("critical header extensions are not supported")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCESS_TOKEN_HEADER_TYPES):
            raise AuthenticationError("token header typ is not an access token type")

        key = await self._key(kid)
        if key.kty != _kty_for(alg):
            raise AuthenticationError("token alg does not match the key type")
        if key.alg is not None and key.alg != alg:
            raise AuthenticationError("token alg does not match the key's alg")
        if alg in _EC_CURVES and key.crv != _EC_CURVES[alg]:
            raise AuthenticationError("token alg does not match the key's curve")

        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": ["exp", "iat", "sub", "iss", "aud"],
                    # Times are checked below against the injectable clock.
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"rejected: {type(exc).__name__}") from None

        self._check_time(claims)
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise AuthenticationError("token has no subject")
        # Keycloak marks access tokens `typ: Bearer`; its ID and logout tokens must not pass as one.
        token_type = claims.get("typ")
        if token_type is not None and (not isinstance(token_type, str) or token_type.lower() != "bearer"):
            raise AuthenticationError("token is not an access token")
        return claims
