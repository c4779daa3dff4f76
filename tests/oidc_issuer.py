"""A local OIDC issuer shaped like Keycloak 26, over real HTTP on 127.0.0.1. One file over 400
lines: it is one fake server (keys, tokens, endpoints, login pages) that tests import whole.

No Keycloak server runs in CI, so tests (unit and end-to-end) use this instead:

    issuer = LocalOIDCIssuer().start()
    token = issuer.mint(realm_roles=["llm-user"], groups=["office-a"])
    issuer.rotate()      # new active kid; old kid stays published (passive)
    issuer.stop()        # "Keycloak down": connections refused
    issuer.restart()     # same URL again
    issuer.jwks_fetches  # how often the JWKS was downloaded

Paths follow Keycloak: `<base>/realms/agency/.well-known/openid-configuration`,
`…/protocol/openid-connect/{certs,token,auth/device,auth,logout}`. The device endpoint approves
immediately (after `device_pending_polls` polls answered `authorization_pending`).

The admin REST API's directory reads, for a confidential client registered with
`add_directory_client` (Keycloak: a service account holding realm-management `view-users`):
`<base>/admin/realms/agency/users?email=…&exact=true`, `…/users/{id}/groups` and
`…/users/{id}/role-mappings/realm/composite`, answered from the users added with `add_user`.

Browser sign-in, as Keycloak's authorization-code flow with PKCE (S256 only, as the realm's web
client requires): `…/auth` shows a login form for the users added with `add_user`, redirects back
with a one-time code, and `…/token` exchanges it once, checking client, redirect URI and verifier:

    issuer.add_user("ada", "pw", realm_roles=["llm-user", "llm-platform-admin"], groups=[])
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlencode, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

REALM = "agency"
AUDIENCE = "agencyllm"


def _b64uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass
class SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey
    use: str = "sig"  # "enc" for Keycloak's RSA-OAEP key

    def jwk(self) -> dict[str, Any]:
        numbers = self.private_key.public_key().public_numbers()
        return {
            "kid": self.kid,
            "kty": "RSA",
            "alg": "RS256" if self.use == "sig" else "RSA-OAEP",
            "use": self.use,
            "n": _b64uint(numbers.n),
            "e": _b64uint(numbers.e),
        }


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class User:
    username: str
    password: str
    realm_roles: tuple[str, ...]
    groups: tuple[str, ...]
    email: str | None = None
    enabled: bool = True
    subject: str = ""


class LocalOIDCIssuer:
    def __init__(self, *, realm: str = REALM, audience: str = AUDIENCE) -> None:
        self.realm = realm
        self.audience = audience
        self.keys: list[SigningKey] = [SigningKey(secrets.token_urlsafe(16), new_rsa_key())]
        self.active_kid = self.keys[0].kid
        # Keycloak publishes an encryption key in the same JWKS; verifiers must skip it.
        self.enc_key = SigningKey(secrets.token_urlsafe(16), new_rsa_key(), use="enc")
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.token_requests = 0
        self.device_pending_polls = 0
        # Tests may set this to publish a discovery document that names another issuer.
        self.discovery_issuer_override: str | None = None
        self._devices: dict[str, int] = {}
        # Browser sign-in: users, one-time codes, and the counts tests look at.
        self.users: dict[str, User] = {}
        self._codes: dict[str, dict[str, Any]] = {}
        self.code_exchanges = 0
        self.logouts = 0
        self.access_token_lifetime = 300
        # Directory reads: confidential clients allowed to read users (client id -> secret).
        self.directory_clients: dict[str, str] = {}
        self.directory_requests = 0
        self._refresh_tokens: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> LocalOIDCIssuer:
        issuer = self

        class Handler(_Handler):
            owner = issuer

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def restart(self) -> LocalOIDCIssuer:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/realms/{self.realm}"

    def __enter__(self) -> LocalOIDCIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- keys ---------------------------------------------------------------------------------

    def rotate(self) -> str:
        """Add a new active key; earlier keys stay in the JWKS as passive. Returns the new kid."""
        key = SigningKey(secrets.token_urlsafe(16), new_rsa_key())
        with self._lock:
            self.keys.append(key)
            self.active_kid = key.kid
        return key.kid

    def retire(self, kid: str) -> None:
        """Remove a key from the JWKS (tokens it signed must stop validating)."""
        with self._lock:
            self.keys = [k for k in self.keys if k.kid != kid]

    def count(self, counter: str) -> None:
        """Add one to a request counter (`logouts`, `discovery_fetches`, `jwks_fetches`)."""
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def key(self, kid: str | None = None) -> SigningKey:
        kid = kid or self.active_kid
        return next(k for k in [*self.keys, self.enc_key] if k.kid == kid)

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": [k.jwk() for k in self.keys] + [self.enc_key.jwk()]}

    def public_key_pem(self, kid: str | None = None) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return (
            self.key(kid)
            .private_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    # -- tokens -------------------------------------------------------------------------------

    def claims(
        self,
        *,
        username: str = "jdoe",
        realm_roles: Iterable[str] = ("llm-user",),
        groups: Iterable[str] = ("office-a",),
        client_id: str = "agencyllm-cli",
        lifetime: int = 300,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Claims laid out like a Keycloak 26 access token."""
        issued = int(now if now is not None else time.time())
        return {
            "exp": issued + lifetime,
            "iat": issued,
            "auth_time": issued,
            "jti": f"onrtac:{uuid.uuid4()}",
            "iss": self.issuer,
            "aud": [self.audience, "account"],
            "sub": self.subject_of(username),
            "typ": "Bearer",
            "azp": client_id,
            "sid": str(uuid.uuid4()),
            "acr": "1",
            "allowed-origins": ["/*"],
            "realm_access": {"roles": ["default-roles-" + self.realm, "offline_access", *realm_roles]},
            "resource_access": {"account": {"roles": ["manage-account", "view-profile"]}},
            "scope": "openid profile email",
            "email_verified": True,
            "name": f"{username.title()} Example",
            "preferred_username": username,
            "given_name": username.title(),
            "family_name": "Example",
            "email": self._email_of(username),
            "groups": list(groups),
        }

    def _email_of(self, username: str) -> str:
        user = self.users.get(username)
        return user.email if user is not None and user.email else f"{username}@agency.example"

    # Clients with the realm's client-level "realm roles" mapper into the ID token and userinfo
    # (infra/keycloak/agencyllm-realm.json: Open WebUI reads roles from there).
    ROLES_IN_ID_TOKEN = frozenset({"open-webui"})

    def userinfo(self, authorization: str | None) -> tuple[int, dict[str, Any]]:
        """Keycloak's userinfo: the claims whose mappers set `userinfo.token.claim`."""
        scheme, _, token = (authorization or "").partition(" ")
        try:
            claims = jwt.decode(
                token, self.key().private_key.public_key(), algorithms=["RS256"], options={"verify_aud": False}
            )
        except jwt.PyJWTError:
            return 401, {"error": "invalid_token", "error_description": "Token verification failed"}
        if scheme.lower() != "bearer":
            return 401, {"error": "invalid_token"}
        names = ("sub", "email_verified", "name", "preferred_username", "given_name", "family_name", "email", "groups")
        info = {k: claims[k] for k in names if k in claims}
        if claims.get("azp") in self.ROLES_IN_ID_TOKEN:
            info["realm_access"] = claims.get("realm_access", {"roles": []})
        return 200, info

    def mint(
        self,
        *,
        drop: Iterable[str] = (),
        claims: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        kid: str | None = None,
        signing_key: rsa.RSAPrivateKey | None = None,
        alg: str = "RS256",
        username: str = "jdoe",
        realm_roles: Iterable[str] = ("llm-user",),
        groups: Iterable[str] = ("office-a",),
        client_id: str = "agencyllm-cli",
        lifetime: int = 300,
        now: float | None = None,
        **overrides: Any,
    ) -> str:
        """A signed access token. `overrides` replace claims (use `claims=` for names like
        "allowed-origins"); `drop` removes claims; `kid`/`signing_key`/`headers` shape the header."""
        payload = self.claims(
            username=username,
            realm_roles=realm_roles,
            groups=groups,
            client_id=client_id,
            lifetime=lifetime,
            now=now,
        )
        payload.update(claims or {})
        payload.update(overrides)
        for name in drop:
            payload.pop(name, None)
        key_id = kid or self.active_kid
        if signing_key is None:
            # An unpublished kid is signed with the active key: only the kid is unknown.
            published = {k.kid: k for k in self.keys}
            signing_key = (published.get(key_id) or published[self.active_kid]).private_key
        header = {"alg": alg, "typ": "JWT", "kid": key_id, **(headers or {})}
        return jwt.encode(payload, signing_key, algorithm=alg, headers=header)

    # -- HTTP endpoints -----------------------------------------------------------------------

    def discovery_document(self) -> dict[str, Any]:
        oidc = f"{self.issuer}/protocol/openid-connect"
        return {
            "issuer": self.discovery_issuer_override or self.issuer,
            "authorization_endpoint": f"{oidc}/auth",
            "token_endpoint": f"{oidc}/token",
            "introspection_endpoint": f"{oidc}/token/introspect",
            "userinfo_endpoint": f"{oidc}/userinfo",
            "end_session_endpoint": f"{oidc}/logout",
            "jwks_uri": f"{oidc}/certs",
            "device_authorization_endpoint": f"{oidc}/auth/device",
            "grant_types_supported": [
                "authorization_code",
                "refresh_token",
                "client_credentials",
                "urn:ietf:params:oauth:grant-type:device_code",
            ],
            "id_token_signing_alg_values_supported": ["RS256", "PS256", "ES256"],
            "response_types_supported": ["code"],
            "subject_types_supported": ["public", "pairwise"],
            "scopes_supported": ["openid", "basic", "roles", "profile", "email", "groups", "agencyllm"],
        }

    def subject_of(self, username: str) -> str:
        """The user id Keycloak gives `username` (stable per realm here)."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.realm}/{username}"))

    def add_user(
        self,
        username: str,
        password: str,
        *,
        realm_roles: Iterable[str] = ("llm-user",),
        groups: Iterable[str] = (),
        email: str | None = None,
        enabled: bool = True,
    ) -> User:
        """`groups`: group names or full paths, as the realm's groups claim carries them."""
        email = email if email is not None else f"{username}@agency.example"
        user = User(username, password, tuple(realm_roles), tuple(groups), email, enabled, self.subject_of(username))
        with self._lock:
            self.users[username] = user
        return user

    def add_directory_client(self, client_id: str, secret: str) -> None:
        with self._lock:
            self.directory_clients[client_id] = secret

    # -- admin REST API (directory reads) -------------------------------------------------------

    def handle_admin(self, path: str, query: dict[str, str], authorization: str | None) -> tuple[int, Any]:
        scheme, _, token = (authorization or "").partition(" ")
        try:
            claims = jwt.decode(
                token, self.key().private_key.public_key(), algorithms=["RS256"], options={"verify_aud": False}
            )
        except jwt.PyJWTError:
            return 401, {"error": "HTTP 401 Unauthorized"}
        if scheme.lower() != "bearer" or claims.get("azp") not in self.directory_clients:
            return 403, {"error": "HTTP 403 Forbidden"}
        self.count("directory_requests")
        users = {u.subject: u for u in list(self.users.values())}
        if path == "/users":
            wanted = query.get("email", "").lower()
            exact = query.get("exact") == "true"
            found = [
                u
                for u in users.values()
                if u.email and (u.email.lower() == wanted if exact else wanted in u.email.lower())
            ]
            return 200, [self._user_representation(u) for u in found]
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[0] != "users" or parts[1] not in users:
            return 404, {"error": "User not found"}
        user = users[parts[1]]
        if parts[2:] == ["groups"]:
            return 200, [self._group_representation(g) for g in user.groups]
        if parts[2:] == ["role-mappings", "realm", "composite"]:
            names = ["default-roles-" + self.realm, "offline_access", "uma_authorization", *user.realm_roles]
            return 200, [
                {
                    "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"role/{n}")),
                    "name": n,
                    "composite": n.startswith("default-"),
                    "clientRole": False,
                    "containerId": self.realm,
                }
                for n in dict.fromkeys(names)
            ]
        return 404, {"error": "Unable to find matching target resource method"}

    def _user_representation(self, user: User) -> dict[str, Any]:
        return {
            "id": user.subject,
            "username": user.username,
            "firstName": user.username.title(),
            "lastName": "Example",
            "email": user.email,
            "emailVerified": True,
            "enabled": user.enabled,
            "createdTimestamp": 1733356800000,
            "totp": False,
            "disableableCredentialTypes": [],
            "requiredActions": [],
            "notBefore": 0,
            "access": {"manage": False},
        }

    def _group_representation(self, group: str) -> dict[str, Any]:
        path = group if group.startswith("/") else f"/{group}"
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"group{path}")),
            "name": path.rsplit("/", 1)[-1],
            "path": path,
        }

    def _issue(self, client_id: str, username: str | None = None, *, nonce: str | None = None) -> dict[str, Any]:
        lifetime = self.access_token_lifetime
        user = self.users.get(username) if username is not None else None
        if username is None:  # client credentials: Keycloak's service-account token layout
            access = self.mint(username=f"service-account-{client_id}", client_id=client_id, groups=())
        elif user is not None:  # a browser user: their own roles and groups
            access = self.mint(
                username=username,
                client_id=client_id,
                realm_roles=user.realm_roles,
                groups=user.groups,
                lifetime=lifetime,
            )
        else:
            access = self.mint(username=username, client_id=client_id)
        refresh = secrets.token_urlsafe(32)
        with self._lock:
            self._refresh_tokens[refresh] = {"client_id": client_id, "username": username}
        extra: dict[str, Any] = {}
        if nonce is not None:
            extra["id_token"] = self.id_token(username, client_id, nonce, access_token=access)
        return {
            **extra,
            "access_token": access,
            "expires_in": lifetime,
            "refresh_expires_in": 1800,
            "refresh_token": refresh,
            "token_type": "Bearer",
            "not-before-policy": 0,
            "session_state": str(uuid.uuid4()),
            "scope": "openid profile email",
        }

    def id_token(self, username: str, client_id: str, nonce: str, *, access_token: str | None = None) -> str:
        """An ID token as Keycloak returns it from the token endpoint (`typ: ID`, aud = client)."""
        user = self.users.get(username)
        claims = self.claims(
            username=username,
            client_id=client_id,
            realm_roles=user.realm_roles if user else ("llm-user",),
            groups=user.groups if user else (),
        )
        names = ("exp", "iat", "auth_time", "iss", "sub", "sid", "preferred_username", "email", "email_verified")
        payload = {k: claims[k] for k in (*names, "name", "given_name", "family_name")}
        if client_id in self.ROLES_IN_ID_TOKEN:
            payload["realm_access"] = claims["realm_access"]
        if access_token is not None:  # OIDC core 3.1.3.6: the left half of the access token's SHA-256
            digest = hashlib.sha256(access_token.encode()).digest()
            payload["at_hash"] = base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()
        payload.update(
            {
                "aud": client_id,
                "azp": client_id,
                "typ": "ID",
                "nonce": nonce,
                "jti": str(uuid.uuid4()),
            }
        )
        key = next(k for k in self.keys if k.kid == self.active_kid)
        return jwt.encode(payload, key.private_key, algorithm="RS256", headers={"kid": key.kid, "typ": "JWT"})

    # Authorization endpoint: Keycloak's login page, reduced to a form.
    def authorize_problem(self, query: dict[str, str]) -> str | None:
        if query.get("response_type") != "code":
            return "unsupported_response_type"
        if not query.get("client_id") or not query.get("redirect_uri", "").startswith(("http://", "https://")):
            return "invalid_request: client_id and redirect_uri are required"
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return "invalid_request: Missing parameter: code_challenge_method"  # Keycloak's words
        if "openid" not in query.get("scope", "").split():
            return "invalid_scope"
        return None

    def login_form(self, query: dict[str, str], error: str | None = None) -> str:
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">' for k, v in query.items()
        )
        problem = f'<p role="alert" id="input-error">{html.escape(error)}</p>' if error else ""
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in to agency</title></head>'
            f'<body><main><h1>Sign in to your account</h1>{problem}<form id="kc-form-login" method="post">{hidden}'
            '<label for="username">Username or email</label><input id="username" name="username" autofocus>'
            '<label for="password">Password</label><input id="password" name="password" type="password">'
            '<button id="kc-login" type="submit" name="login">Sign In</button></form></main></body></html>'
        )

    def handle_login(self, form: dict[str, str]) -> tuple[int, str | None, str]:
        """(status, redirect location or None, HTML) for a submitted login form."""
        params = {k: v for k, v in form.items() if k not in ("username", "password", "login")}
        problem = self.authorize_problem(params)
        if problem:
            return 400, None, f"<p>{html.escape(problem)}</p>"
        user = self.users.get(form.get("username", ""))
        if user is None or not secrets.compare_digest(user.password, form.get("password", "")):
            return 200, None, self.login_form(params, "Invalid username or password.")
        code = secrets.token_urlsafe(32)
        with self._lock:
            self._codes[code] = {**params, "username": user.username, "at": time.time()}
        query = {"state": params.get("state", ""), "session_state": str(uuid.uuid4()), "iss": self.issuer, "code": code}
        return 302, f"{params['redirect_uri']}?{urlencode(query)}", ""

    def _exchange_code(self, form: dict[str, str], basic_client: str | None) -> tuple[int, dict[str, Any]]:
        client_id = basic_client or form.get("client_id", "")
        with self._lock:
            self.code_exchanges += 1
            grant = self._codes.pop(form.get("code", ""), None)  # one use only
        if grant is None or time.time() - grant["at"] > 60:
            return 400, {"error": "invalid_grant", "error_description": "Code not valid"}
        if grant["client_id"] != client_id:
            return 400, {"error": "invalid_grant", "error_description": "Code not issued to this client"}
        if grant["redirect_uri"] != form.get("redirect_uri"):
            return 400, {"error": "invalid_grant", "error_description": "Incorrect redirect_uri"}
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not verifier or digest != grant["code_challenge"]:
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        return 200, self._issue(client_id, grant["username"], nonce=grant.get("nonce", ""))

    def handle_device(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if not form.get("client_id"):
            return 400, {"error": "invalid_client"}
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._devices[code] = 0
        user_code = "ABCD-EFGH"
        verify_uri = f"{self.issuer}/device"
        return 200, {
            "device_code": code,
            "user_code": user_code,
            "verification_uri": verify_uri,
            "verification_uri_complete": f"{verify_uri}?user_code={user_code}",
            "expires_in": 600,
            "interval": 5,
        }

    def handle_token(
        self, form: dict[str, str], basic_client: str | None = None, basic_secret: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.token_requests += 1
        grant = form.get("grant_type")
        client_id = basic_client or form.get("client_id", "")
        if grant == "authorization_code":
            return self._exchange_code(form, basic_client)
        if grant == "urn:ietf:params:oauth:grant-type:device_code":
            code = form.get("device_code", "")
            with self._lock:
                if code not in self._devices:
                    return 400, {"error": "invalid_grant"}
                polls = self._devices[code]
                self._devices[code] = polls + 1
                if polls < self.device_pending_polls:
                    return 400, {"error": "authorization_pending"}
                del self._devices[code]
            return 200, self._issue(client_id, "jdoe")
        if grant == "refresh_token":
            with self._lock:
                session = self._refresh_tokens.pop(form.get("refresh_token", ""), None)
            if session is None or session["client_id"] != client_id:
                return 400, {"error": "invalid_grant", "error_description": "Invalid refresh token"}
            return 200, self._issue(client_id, session["username"])
        if grant == "client_credentials":
            secret = self.directory_clients.get(client_id)
            if secret is not None and form.get("client_secret", basic_secret) != secret:
                return 401, {
                    "error": "unauthorized_client",
                    "error_description": "Invalid client or Invalid client credentials",
                }
            return 200, self._issue(client_id)
        return 400, {"error": "unsupported_grant_type"}


class _Handler(BaseHTTPRequestHandler):
    owner: LocalOIDCIssuer

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_html(self, status: int, body: str, location: str | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _basic_client(self) -> str | None:
        return self._basic_credentials()[0]

    def _basic_credentials(self) -> tuple[str | None, str | None]:
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            return None, None
        try:
            client, _, secret = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return None, None
        return unquote_plus(client) or None, unquote_plus(secret)

    def do_GET(self) -> None:
        owner = self.owner
        url = urlsplit(self.path)
        path = url.path
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        prefix = f"/realms/{owner.realm}"
        if path == f"{prefix}/protocol/openid-connect/auth":
            problem = owner.authorize_problem(query)
            if problem:
                self._send_html(400, f"<p>{html.escape(problem)}</p>")
            else:
                self._send_html(200, owner.login_form(query))
        elif path == f"{prefix}/protocol/openid-connect/logout":
            owner.count("logouts")
            target = query.get("post_logout_redirect_uri")
            if target:
                self._send_html(302, "", location=target)
            else:
                self._send_html(200, "<p>You are logged out.</p>")
        elif path == f"{prefix}/.well-known/openid-configuration":
            owner.count("discovery_fetches")
            self._send(200, owner.discovery_document())
        elif path == f"{prefix}/protocol/openid-connect/certs":
            owner.count("jwks_fetches")
            self._send(200, owner.jwks())
        elif path == f"{prefix}/protocol/openid-connect/userinfo":
            self._send(*owner.userinfo(self.headers.get("Authorization")))
        elif path.startswith(f"/admin{prefix}/"):
            status, body = owner.handle_admin(path[len(f"/admin{prefix}") :], query, self.headers.get("Authorization"))
            self._send(status, body)
        else:
            self._send(404, {"error": "not_found"})

    def do_POST(self) -> None:
        owner = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = parse_qs(self.rfile.read(length).decode(), keep_blank_values=True)
        form = {k: v[0] for k, v in raw.items()}
        path = urlsplit(self.path).path
        prefix = f"/realms/{owner.realm}/protocol/openid-connect"
        if path == f"{prefix}/auth/device":
            self._send(*owner.handle_device(form))
        elif path == f"{prefix}/auth":
            status, location, body = owner.handle_login(form)
            self._send_html(status, body, location=location)
        elif path == f"{prefix}/token":
            self._send(*owner.handle_token(form, *self._basic_credentials()))
        elif path == f"{prefix}/userinfo":
            self._send(*owner.userinfo(self.headers.get("Authorization")))
        else:
            self._send(404, {"error": "not_found"})


@pytest.fixture(scope="session")
def oidc_issuer() -> Iterator[LocalOIDCIssuer]:
    """Shared issuer for the whole session: do not rotate or stop it (use `fresh_oidc_issuer`)."""
    issuer = LocalOIDCIssuer().start()
    yield issuer
    issuer.stop()


@pytest.fixture
def fresh_oidc_issuer() -> Iterator[LocalOIDCIssuer]:
    """A private issuer for tests that rotate keys or take it down."""
    issuer = LocalOIDCIssuer().start()
    yield issuer
    issuer.stop()
