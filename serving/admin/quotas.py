"""/admin/v1/tenants/{name}/quota and …/users/{sub}/quota: read (tenant admin) and replace
(platform admin) quota policies."""

from __future__ import annotations

from fastapi import APIRouter

from agencyllm.quotas import store
from agencyllm.serving.admin.access import PlatformAdmin, TenantAdmin
from agencyllm.serving.admin.schemas import Quota, QuotaOut
from agencyllm.serving.gateway.deps import DbSession

router = APIRouter(prefix="/tenants/{name}", tags=["quotas"])


def quota_out(tenant: str, user: str | None, fields: dict) -> QuotaOut:
    return QuotaOut(tenant=tenant, user=user, **fields)


@router.get("/quota", summary="Read the tenant-wide quota")
async def get_tenant_quota(name: str, principal: TenantAdmin, session: DbSession) -> QuotaOut:
    return quota_out(name, None, await store.get_quota(session, name))


@router.put("/quota", summary="Replace the tenant-wide quota (platform admin)")
async def put_tenant_quota(name: str, body: Quota, principal: PlatformAdmin, session: DbSession) -> QuotaOut:
    return quota_out(name, None, await store.set_quota(session, principal, name, body.model_dump()))


@router.get("/users/{sub}/quota", summary="Read one user's quota override")
async def get_user_quota(name: str, sub: str, principal: TenantAdmin, session: DbSession) -> QuotaOut:
    return quota_out(name, sub, await store.get_quota(session, name, sub))


@router.put("/users/{sub}/quota", summary="Replace one user's quota override (platform admin)")
async def put_user_quota(name: str, sub: str, body: Quota, principal: PlatformAdmin, session: DbSession) -> QuotaOut:
    fields = await store.set_quota(session, principal, name, body.model_dump(), subject=sub)
    return quota_out(name, sub, fields)
