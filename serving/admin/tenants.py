"""/admin/v1/tenants: create, list, read, update, delete, suspend and resume tenants."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from agencyllm.quotas import store
from agencyllm.quotas.models import Tenant
from agencyllm.serving.admin.access import (
    PlatformAdmin,
    TenantAdmin,
    forbidden,
)
from agencyllm.serving.admin.schemas import TenantCreate, TenantOut, TenantUpdate
from agencyllm.serving.gateway.deps import CurrentPrincipal, DbSession

router = APIRouter(prefix="/tenants", tags=["tenants"])


def tenant_out(tenant: Tenant) -> TenantOut:
    return TenantOut.model_validate(tenant, from_attributes=True)


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create a tenant (platform admin)")
async def create_tenant(body: TenantCreate, principal: PlatformAdmin, session: DbSession) -> TenantOut:
    tenant = await store.create_tenant(session, principal, **body.model_dump())
    return tenant_out(tenant)


@router.get("", summary="List tenants (platform admin: all; tenant admin: their own)")
async def list_tenants(principal: CurrentPrincipal, session: DbSession) -> list[TenantOut]:
    if principal.is_platform_admin:
        return [tenant_out(t) for t in await store.list_tenants(session)]
    if principal.tenant is None or not principal.may_admin_tenant(principal.tenant):
        raise forbidden("Listing tenants needs an administrator role.")
    return [tenant_out(await store.get_tenant(session, principal.tenant))]


@router.get("/{name}", summary="Read a tenant")
async def get_tenant(name: str, principal: TenantAdmin, session: DbSession) -> TenantOut:
    return tenant_out(await store.get_tenant(session, name))


@router.patch("/{name}", summary="Change a tenant's display name or Keycloak group (platform admin)")
async def update_tenant(name: str, body: TenantUpdate, principal: PlatformAdmin, session: DbSession) -> TenantOut:
    changes = body.model_dump(include=body.model_fields_set)
    return tenant_out(await store.update_tenant(session, principal, name, changes))


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a tenant without usage history, with its quotas and keys (platform admin)",
)
async def delete_tenant(name: str, principal: PlatformAdmin, session: DbSession) -> Response:
    await store.delete_tenant(session, principal, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{name}/suspend", summary="Suspend a tenant: its users and keys are refused (platform admin)")
async def suspend_tenant(name: str, principal: PlatformAdmin, session: DbSession) -> TenantOut:
    return tenant_out(await store.set_tenant_status(session, principal, name, "suspended"))


@router.post("/{name}/resume", summary="Resume a suspended tenant (platform admin)")
async def resume_tenant(name: str, principal: PlatformAdmin, session: DbSession) -> TenantOut:
    return tenant_out(await store.set_tenant_status(session, principal, name, "active"))
