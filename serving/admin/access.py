"""Who may do what on the admin API (store errors are answered by serving/gateway/errors.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from agencyllm.auth.principal import Principal
from agencyllm.quotas.store import SYSTEM_TENANT
from agencyllm.serving.gateway.deps import CurrentPrincipal
from agencyllm.serving.gateway.errors import OpenAIError


def forbidden(message: str) -> OpenAIError:
    return OpenAIError(403, message, type="permission_error")


def require_platform_admin(principal: Principal) -> None:
    if not principal.is_platform_admin:
        raise forbidden("This action needs the platform administrator role.")


def may_admin(principal: Principal, tenant: str) -> bool:
    """Platform admins, or the tenant admins of `tenant`. The system tenant's service keys are
    platform-admin keys, so only platform admins manage it."""
    if tenant == SYSTEM_TENANT:
        return principal.is_platform_admin
    return principal.may_admin_tenant(tenant)


def require_tenant_admin(principal: Principal, tenant: str) -> None:
    # Checked before the tenant is looked up, so nobody learns which other tenants exist.
    if not may_admin(principal, tenant):
        raise forbidden(f"You may not administer tenant '{tenant}'.")


def require_own_tenant(principal: Principal) -> str:
    if principal.tenant is None:
        raise OpenAIError(400, "Your account belongs to no tenant, so it cannot hold personal keys.")
    return principal.tenant


# As dependencies, the checks run before the body is validated: a caller without the right
# gets 403, not a lesson in the request schema.
async def platform_admin(principal: CurrentPrincipal) -> Principal:
    require_platform_admin(principal)
    return principal


async def tenant_admin(name: str, principal: CurrentPrincipal) -> Principal:
    require_tenant_admin(principal, name)
    return principal


PlatformAdmin = Annotated[Principal, Depends(platform_admin)]
# Platform admin, or tenant admin of the route's `{name}` tenant.
TenantAdmin = Annotated[Principal, Depends(tenant_admin)]
