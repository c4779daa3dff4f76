"""Who is calling: a bearer credential (API key or Keycloak token) turned into a `Principal`.

API keys are checked against Postgres on every request, with no cache of their validity, so a
revocation holds from the next request on every ingress replica. Keys carry roles by kind:
personal and service keys may call models; service keys of the `system` tenant (only platform
admins can mint them, and the bootstrap key is one) are platform-admin keys.

A front-end key (kind `frontend`, minted by platform admins) is a chat front end's: it calls
models only for the signed-in person it forwards, and the request is then that person's (their
tenant, quotas, ledger rows and audit records), found in the realm's directory. The forwarded
headers mean nothing with any other credential: they are never read then.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import jwt

from agencyllm.auth.apikeys import looks_like_api_key
from agencyllm.auth.directory import DirectoryUnavailable, KeycloakDirectory
from agencyllm.auth.oidc import AuthenticationError, OIDCVerifier
from agencyllm.auth.principal import Principal, Role, RoleNames, TokenIdentity, identity_from_claims
from agencyllm.quotas import store
from agencyllm.quotas.audit import AuditLog
from agencyllm.quotas.db import Database
from agencyllm.serving.gateway.errors import OpenAIError
from agencyllm.serving.settings import Settings

log = logging.getLogger("agencyllm.identity")

PUBLIC_AUTH_MESSAGE = "Invalid or missing credentials. Send 'Authorization: Bearer <API key or access token>'."
ADMIN_KEY_FILE = "admin.key"
BOOTSTRAP_KEY_NAME = "bootstrap-admin"


def unauthorized(reason: str = "invalid_credentials") -> OpenAIError:
    return OpenAIError(
        401,
        PUBLIC_AUTH_MESSAGE,
        type="authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
        audit_reason=reason,
    )


def forbidden(message: str, reason: str = "tenant_unavailable") -> OpenAIError:
    return OpenAIError(403, message, type="permission_error", code="tenant_unavailable", audit_reason=reason)


# Open WebUI's forwarded-user headers (ENABLE_FORWARD_USER_INFO_HEADERS): the person's e-mail, or
# all of it in one HS256 JWT signed with the front-end key itself (FORWARD_USER_INFO_HEADER_JWT_SECRET).
FORWARDED_EMAIL_HEADER = "x-openwebui-user-email"
FORWARDED_JWT_HEADER = "x-openwebui-user-jwt"
FORWARDED_JWT_ISSUER = "open-webui"
_MAX_EMAIL_CHARS = 320
DIRECTORY_RETRY_AFTER_SECONDS = 5


def refused_person(message: str, reason: str) -> OpenAIError:
    return OpenAIError(403, message, type="permission_error", code=reason, audit_reason=reason)


def forwarded_email(headers: Mapping[str, str], key_secret: str) -> str:
    """The person a front end forwards: from its signed JWT when it sends one, else its e-mail header."""
    signed = headers.get(FORWARDED_JWT_HEADER)
    if signed:
        try:
            claims = jwt.decode(
                signed,
                key_secret,
                algorithms=["HS256"],
                issuer=FORWARDED_JWT_ISSUER,
                options={"require": ["exp", "iss"]},
            )
        except jwt.PyJWTError as exc:
            log.info("front-end identity refused: %s", type(exc).__name__)
            raise unauthorized("invalid_forwarded_identity") from None
        email = claims.get("email")
    else:
        email = headers.get(FORWARDED_EMAIL_HEADER)
    if not isinstance(email, str) or not email.strip():
        raise OpenAIError(
            401,
            "A front-end key calls models only for a signed-in person: send their identity "
            f"('{FORWARDED_EMAIL_HEADER}' or '{FORWARDED_JWT_HEADER}').",
            type="authentication_error",
            code="missing_forwarded_identity",
            audit_reason="missing_forwarded_identity",
        )
    email = email.strip()
    if len(email) > _MAX_EMAIL_CHARS or "@" not in email or any(ord(c) < 32 or ord(c) == 127 for c in email):
        raise OpenAIError(
            400,
            "The forwarded identity is not an e-mail address.",
            param=FORWARDED_EMAIL_HEADER,
            code="invalid_forwarded_identity",
        )
    return email


def key_roles(kind: str, tenant: str) -> frozenset[Role]:
    if kind == "service" and tenant == store.SYSTEM_TENANT:
        return frozenset({Role.PLATFORM_ADMIN})
    return frozenset({Role.USER})


def bearer_token(authorization_header: str | None) -> str | None:
    if not authorization_header:
        return None
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


class Authenticator:
    def __init__(self, settings: Settings, database: Database, verifier: OIDCVerifier | None) -> None:
        self.settings = settings
        self.database = database
        self.verifier = verifier
        self.role_names = RoleNames(
            user=settings.role_user,
            tenant_admin=settings.role_tenant_admin,
            platform_admin=settings.role_platform_admin,
        )
        # A claim other than `groups` holds tenant names directly.
        self.match_tenant_names = settings.oidc_tenant_claim != "groups"
        # Refused credentials, folded per source, reason and minute (quotas/audit.py).
        self.audit = AuditLog(database)
        self.directory: KeycloakDirectory | None = None

    @classmethod
    def from_settings(cls, settings: Settings, database: Database) -> Authenticator:
        """With an OIDC verifier when `AGENCYLLM_OIDC_ISSUER` is set, API keys only otherwise, and
        the realm's directory when its client is set too (for front-end keys)."""
        verifier = None
        if settings.oidc_issuer:
            verifier = OIDCVerifier(settings.oidc_issuer, settings.oidc_audience, leeway=settings.oidc_leeway_seconds)
        authenticator = cls(settings, database, verifier)
        if settings.oidc_issuer and settings.oidc_directory_client_id and settings.oidc_directory_client_secret:
            authenticator.directory = KeycloakDirectory(
                settings.oidc_issuer,
                settings.oidc_directory_client_id,
                settings.oidc_directory_client_secret.get_secret_value(),
                cache_seconds=settings.oidc_directory_cache_seconds,
            )
        return authenticator

    async def authenticate(
        self, authorization_header: str | None, forwarded: Mapping[str, str] | None = None
    ) -> Principal:
        """The caller. `forwarded`: the request's headers where a front end may act for a person
        (the model routes); None elsewhere, where a front-end key is refused."""
        try:
            return await self._authenticate(authorization_header, forwarded)
        except OpenAIError as exc:
            if exc.audit_reason is not None:
                self.audit.auth_failure(exc.audit_reason)
            raise

    async def _authenticate(self, authorization_header: str | None, forwarded: Mapping[str, str] | None) -> Principal:
        token = bearer_token(authorization_header)
        if token is None:
            log.info("authentication refused: missing or malformed Authorization header")
            raise unauthorized("missing_credentials")
        if looks_like_api_key(token):
            return await self._from_api_key(token, forwarded)
        return await self._from_access_token(token)

    async def _from_api_key(self, token: str, forwarded: Mapping[str, str] | None) -> Principal:
        key = await store.find_active_key(await self.database.lookup_pool(), token)
        if key is None:
            log.info("authentication refused: unknown, revoked or expired API key")
            raise unauthorized("invalid_api_key")
        if key.kind == "frontend":
            return await self._for_forwarded_person(key, token, forwarded)
        roles = key_roles(key.kind, key.tenant)
        if key.tenant_status != "active" and Role.PLATFORM_ADMIN not in roles:
            raise forbidden(f"Tenant '{key.tenant}' is suspended; ask your platform administrator.", "tenant_suspended")
        return Principal(
            subject=key.owner_subject,
            username=key.owner_username,
            client_id=None,
            tenant=key.tenant,
            roles=roles,
            auth_method="api_key",
            key_id=str(key.id),
            traffic_class="batch" if key.traffic_class == "batch" else "interactive",
        )

    async def _for_forwarded_person(
        self, key: store.ActiveKey, token: str, forwarded: Mapping[str, str] | None
    ) -> Principal:
        if forwarded is None:
            raise refused_person(
                "A front-end key may only call models, for a signed-in person.", "frontend_key_misused"
            )
        email = forwarded_email(forwarded, token)
        if self.directory is None:
            raise refused_person(
                "This platform has no realm directory, so it cannot find the person a front end forwards "
                "(set AGENCYLLM_OIDC_DIRECTORY_CLIENT_ID and its secret).",
                "no_directory",
            )
        try:
            person = await self.directory.person_by_email(email)
        except DirectoryUnavailable as exc:
            log.warning("front-end identity not checked: %s", exc)
            raise OpenAIError(
                503,
                "The identity provider cannot be reached to check the signed-in person; retry shortly.",
                type="service_unavailable",
                code="directory_unavailable",
                headers={"Retry-After": str(DIRECTORY_RETRY_AFTER_SECONDS)},
            ) from None
        if person is None:
            log.info("front-end identity refused: no enabled account in the realm")
            raise refused_person(
                "The forwarded person has no enabled account in this platform's realm.", "unknown_person"
            )
        identity = identity_from_claims(
            person.claims(), tenant_claim=self.settings.oidc_tenant_claim, role_names=self.role_names
        )
        principal = await self._principal(identity, auth_method="frontend", key_id=str(key.id))
        if principal.tenant is None or not key.serves(principal.tenant):
            raise refused_person(
                "This front-end key does not serve the forwarded person's tenant.", "tenant_not_served"
            )
        return principal

    async def _from_access_token(self, token: str) -> Principal:
        if self.verifier is None:
            log.info("authentication refused: bearer token but no OIDC issuer is configured")
            raise unauthorized("token_without_issuer")
        try:
            claims = await self.verifier.verify(token)
            identity = identity_from_claims(
                claims, tenant_claim=self.settings.oidc_tenant_claim, role_names=self.role_names
            )
        except AuthenticationError as exc:
            log.info("authentication refused: %s", exc.reason)
            raise unauthorized("invalid_token") from None
        except ValueError as exc:
            log.info("authentication refused: %s", exc)
            raise unauthorized("invalid_token_claims") from None
        return await self._principal(identity, auth_method="oidc")

    async def _principal(
        self, identity: TokenIdentity, *, auth_method: Literal["oidc", "frontend"], key_id: str | None = None
    ) -> Principal:
        """The caller a verified identity names, once its tenant is found (and active)."""
        async with self.database.sessions() as session:
            tenant = await store.tenant_for_hints(session, identity.tenant_hints, match_names=self.match_tenant_names)
        is_platform_admin = Role.PLATFORM_ADMIN in identity.roles
        if tenant is None and not is_platform_admin:
            raise forbidden(
                "Your account is not a member of any tenant on this platform "
                f"(no match for your '{self.settings.oidc_tenant_claim}' claim); "
                "ask an administrator to add you to a tenant's group.",
                "no_tenant",
            )
        if tenant is not None and tenant.status != "active" and not is_platform_admin:
            raise forbidden(
                f"Tenant '{tenant.name}' is suspended; ask your platform administrator.", "tenant_suspended"
            )
        return Principal.from_identity(
            identity, tenant.name if tenant is not None else None, auth_method=auth_method, key_id=key_id
        )

    async def aclose(self) -> None:
        await self.audit.aclose()
        if self.verifier is not None:
            await self.verifier.aclose()
        if self.directory is not None:
            await self.directory.aclose()


async def ensure_bootstrap_admin_key(database: Database, data_dir: Path) -> Path | None:
    """First start without OIDC: mint a platform-admin key into DATA_DIR/admin.key (0600).

    Returns the path when a key was written, None when the file already holds a live key.
    """
    path = Path(data_dir) / ADMIN_KEY_FILE
    if await ensure_key_file(database, path, kind="service", name=BOOTSTRAP_KEY_NAME) is None:
        return None
    log.warning("created a platform-admin API key in %s", path)
    return path


async def ensure_key_file(
    database: Database,
    path: Path,
    *,
    kind: Literal["service", "frontend"],
    name: str,
    serves_tenants: list[str] | None = None,
) -> str | None:
    """A live `system`-tenant key in `path` (0600): the one there, or a new one written there.
    Returns the new key, or None when the file already held a live one."""
    if path.exists():
        existing = path.read_text(encoding="utf-8").strip()
        if await store.find_active_key(await database.pool(), existing) is not None:
            return None
    async with database.sessions() as session:
        actor = store.SystemActor()
        await store.ensure_tenant(session, actor, store.SYSTEM_TENANT, "Platform")
        created = await store.create_key(
            session, actor, tenant_name=store.SYSTEM_TENANT, kind=kind, name=name, serves_tenants=serves_tenants
        )
    write_private(path, created.secret + "\n")
    return created.secret


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, 0o600)  # in case the file pre-existed with wider bits
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
