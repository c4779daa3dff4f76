"""Who is calling: roles and tenant hints read from verified claims, and the per-request Principal."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal


@dataclass(frozen=True)
class RoleNames:
    """Keycloak realm role names that grant the platform's roles (configurable per agency)."""

    user: str = "llm-user"
    tenant_admin: str = "llm-tenant-admin"
    platform_admin: str = "llm-platform-admin"


class Role(StrEnum):
    USER = "user"
    TENANT_ADMIN = "tenant_admin"
    PLATFORM_ADMIN = "platform_admin"


@dataclass(frozen=True)
class TokenIdentity:
    """What a verified token says, before the tenant is looked up in the database."""

    subject: str
    username: str | None
    client_id: str | None
    roles: frozenset[Role]
    # Group names/paths, or the tenant claim's value(s), in token order.
    tenant_hints: tuple[str, ...]


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    # Keycloak's attribute mappers turn a dotted claim name ("org.tenant") into nested objects.
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str)]
    return []


def identity_from_claims(
    claims: Mapping[str, Any],
    *,
    tenant_claim: str = "groups",
    role_names: RoleNames = RoleNames(),
) -> TokenIdentity:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise ValueError("claims carry no subject")

    realm_access = claims.get("realm_access")
    realm_roles = set(_strings(realm_access.get("roles"))) if isinstance(realm_access, Mapping) else set()
    mapping = {
        role_names.user: Role.USER,
        role_names.tenant_admin: Role.TENANT_ADMIN,
        role_names.platform_admin: Role.PLATFORM_ADMIN,
    }
    roles = frozenset(role for name, role in mapping.items() if name in realm_roles)

    hints: list[str] = []
    for raw in _strings(_claim(claims, tenant_claim)):
        value = raw.strip()
        if not value:
            continue
        if value.startswith("/"):
            # Group full path ("/agency/office"): match on the path or on the group's own name.
            path = value.rstrip("/")
            leaf = path.rsplit("/", 1)[-1]
            candidates = [path, leaf] if path else []
        else:
            candidates = [value]
        for candidate in candidates:
            if candidate and candidate not in hints:
                hints.append(candidate)

    username = claims.get("preferred_username")
    client_id = claims.get("azp") or claims.get("client_id")
    return TokenIdentity(
        subject=subject,
        username=username if isinstance(username, str) else None,
        client_id=client_id if isinstance(client_id, str) else None,
        roles=roles,
        tenant_hints=tuple(hints),
    )


@dataclass(frozen=True)
class Principal:
    """The caller of one request, after tenant resolution."""

    subject: str
    username: str | None
    client_id: str | None
    tenant: str | None
    roles: frozenset[Role]
    # `frontend`: a trusted front end's key, acting for the signed-in person it forwarded.
    auth_method: Literal["oidc", "api_key", "frontend"]
    key_id: str | None = None
    # Fair-sharing class the caller's requests run as (an API key's; sign-ins are interactive).
    traffic_class: Literal["interactive", "batch"] = "interactive"

    @classmethod
    def from_identity(
        cls,
        identity: TokenIdentity,
        tenant: str | None,
        *,
        auth_method: Literal["oidc", "frontend"] = "oidc",
        key_id: str | None = None,
    ) -> Principal:
        return cls(
            subject=identity.subject,
            username=identity.username,
            client_id=identity.client_id,
            tenant=tenant,
            roles=identity.roles,
            auth_method=auth_method,
            key_id=key_id,
        )

    @property
    def is_platform_admin(self) -> bool:
        return Role.PLATFORM_ADMIN in self.roles

    @property
    def may_call_models(self) -> bool:
        return bool(self.roles & {Role.USER, Role.TENANT_ADMIN, Role.PLATFORM_ADMIN})

    def may_admin_tenant(self, tenant: str) -> bool:
        if self.is_platform_admin:
            return True
        return bool(tenant) and Role.TENANT_ADMIN in self.roles and self.tenant == tenant
