"""Keycloak sign-in for the console: the authorization-code flow with PKCE (RFC 7636, S256).

The endpoints come from the issuer's discovery document, which the gateway's token verifier
already fetched and checked against `AGENCYLLM_OIDC_ISSUER`. Tokens are fetched by the server
over a direct connection to Keycloak; the browser only ever carries the one-time code.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt

from agencyllm.auth.oidc import OIDCVerifier
from agencyllm.serving.settings import Settings

log = logging.getLogger("agencyllm.console")

SCOPE = "openid"


class SignInFailed(Exception):
    """The identity provider refused or answered nonsense; `reason` is for the log only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Flow:
    """What the browser's round trip to Keycloak must bring back (kept in an encrypted cookie)."""

    state: str
    nonce: str
    verifier: str
    next: str

    @classmethod
    def new(cls, next_path: str) -> Flow:
        return cls(secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48), next_path)

    @property
    def challenge(self) -> str:
        digest = hashlib.sha256(self.verifier.encode("ascii")).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True)
class Tokens:
    access_token: str
    refresh_token: str | None
    expires_at: float


class SignInClient:
    def __init__(self, settings: Settings, verifier: OIDCVerifier, *, timeout: float = 10.0) -> None:
        self.client_id = settings.console_client_id
        secret = settings.console_client_secret
        self._secret = secret.get_secret_value() if secret is not None else None
        self._verifier = verifier
        self._timeout = timeout

    async def _endpoint(self, name: str) -> str:
        try:
            doc = await self._verifier.discovery()
        except Exception as exc:  # AuthenticationError with its reason
            raise SignInFailed(f"discovery: {getattr(exc, 'reason', type(exc).__name__)}") from None
        url = doc.get(name)
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise SignInFailed(f"discovery document has no {name}")
        return url

    async def authorization_url(self, flow: Flow, redirect_uri: str) -> str:
        query = {
            "client_id": self.client_id,
            "response_type": "code",
            "scope": SCOPE,
            "redirect_uri": redirect_uri,
            "state": flow.state,
            "nonce": flow.nonce,
            "code_challenge": flow.challenge,
            "code_challenge_method": "S256",
        }
        return f"{await self._endpoint('authorization_endpoint')}?{urlencode(query)}"

    async def logout_url(self, post_logout_redirect_uri: str) -> str | None:
        try:
            endpoint = await self._endpoint("end_session_endpoint")
        except SignInFailed:
            return None
        query = {"client_id": self.client_id, "post_logout_redirect_uri": post_logout_redirect_uri}
        return f"{endpoint}?{urlencode(query)}"

    async def _token_request(self, form: dict[str, str]) -> dict[str, Any]:
        url = await self._endpoint("token_endpoint")
        auth = (self.client_id, self._secret) if self._secret else None
        if auth is None:
            form = {**form, "client_id": self.client_id}
        try:
            async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=False) as client:
                response = await client.post(url, data=form, auth=auth, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise SignInFailed(f"token endpoint unreachable: {type(exc).__name__}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            raise SignInFailed(f"token endpoint answered {response.status_code} ({error or 'no error code'})")
        if not isinstance(body.get("access_token"), str):
            raise SignInFailed("token response carries no access_token")
        return body

    @staticmethod
    def _tokens(body: dict[str, Any]) -> Tokens:
        lifetime = body.get("expires_in")
        lifetime = lifetime if isinstance(lifetime, int) and lifetime > 0 else 60
        refresh = body.get("refresh_token")
        return Tokens(body["access_token"], refresh if isinstance(refresh, str) else None, time.time() + lifetime)

    async def exchange(self, code: str, flow: Flow, redirect_uri: str) -> Tokens:
        body = await self._token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": flow.verifier,
            }
        )
        self._check_id_token(body.get("id_token"), flow.nonce)
        return self._tokens(body)

    def _check_id_token(self, id_token: Any, nonce: str) -> None:
        # Received straight from the token endpoint over the server's own connection, so OIDC
        # Core 3.1.3.7 lets TLS stand in for the signature; the access token itself is verified
        # in full by the gateway's verifier before it is trusted.
        if not isinstance(id_token, str):
            raise SignInFailed("token response carries no id_token")
        try:
            claims = jwt.decode(id_token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise SignInFailed("id_token is not a JWT") from None
        if claims.get("nonce") != nonce:
            raise SignInFailed("id_token nonce does not match")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self.client_id not in audiences:
            raise SignInFailed("id_token is not for this client")
        if claims.get("iss") != self._verifier.issuer:
            raise SignInFailed("id_token issuer does not match")

    async def refresh(self, refresh_token: str) -> Tokens:
        body = await self._token_request({"grant_type": "refresh_token", "refresh_token": refresh_token})
        return self._tokens(body)
