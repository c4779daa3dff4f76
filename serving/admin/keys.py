"""API keys: tenant service keys (tenant admin), revocation (admins, or the owner of a personal key)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, status

from agencyllm.auth.principal import Principal
from agencyllm.quotas import store
from agencyllm.quotas.models import ApiKey
from agencyllm.serving.admin.access import (
    PlatformAdmin,
    TenantAdmin,
    may_admin,
)
from agencyllm.serving.admin.schemas import FrontendKeyCreate, KeyCreate, KeyCreated, KeyOut
from agencyllm.serving.gateway.deps import CurrentPrincipal, DbSession
from agencyllm.serving.gateway.errors import OpenAIError
from agencyllm.serving.gateway.inputs import as_utc

router = APIRouter(tags=["keys"])


def key_out(key: ApiKey, tenant: str) -> KeyOut:
    return KeyOut.model_validate(store.key_snapshot(key, tenant) | {"id": str(key.id)})


def created_out(created: store.CreatedKey) -> KeyCreated:
    return KeyCreated(**key_out(created.key, created.tenant.name).model_dump(), key=created.secret)


def expiry(body: KeyCreate) -> datetime | None:
    if body.expires_at is not None and body.expires_in_days is not None:
        raise OpenAIError(400, "Give 'expires_at' or 'expires_in_days', not both.", param="expires_at")
    if body.expires_in_days is not None:
        return datetime.now(UTC) + timedelta(days=body.expires_in_days)
    if body.expires_at is None:
        return None
    expires_at = as_utc(body.expires_at, "expires_at")
    if expires_at <= datetime.now(UTC):
        raise OpenAIError(400, "'expires_at' must be in the future.", param="expires_at", code="invalid_value")
    return expires_at


@router.post(
    "/tenants/{name}/keys",
    status_code=status.HTTP_201_CREATED,
    summary="Mint a service key for a tenant; the key is in `key`, shown this once",
)
async def create_service_key(name: str, body: KeyCreate, principal: TenantAdmin, session: DbSession) -> KeyCreated:
    created = await store.create_key(
        session,
        principal,
        tenant_name=name,
        kind="service",
        name=body.name,
        expires_at=expiry(body),
        traffic_class=body.traffic_class,
    )
    return created_out(created)


@router.post(
    "/frontend-keys",
    status_code=status.HTTP_201_CREATED,
    summary="Mint a trusted front-end key (platform admins): it acts for the signed-in people it forwards",
)
async def create_frontend_key(body: FrontendKeyCreate, principal: PlatformAdmin, session: DbSession) -> KeyCreated:
    created = await store.create_key(
        session,
        principal,
        tenant_name=store.SYSTEM_TENANT,
        kind="frontend",
        name=body.name,
        expires_at=expiry(body),
        traffic_class=body.traffic_class,
        serves_tenants=body.serves_tenants,
    )
    return created_out(created)


@router.get("/tenants/{name}/keys", summary="List a tenant's keys (personal and service)")
async def list_tenant_keys(
    name: str, principal: TenantAdmin, session: DbSession, include_revoked: bool = False
) -> list[KeyOut]:
    rows = await store.list_keys(session, tenant_name=name, include_revoked=include_revoked)
    return [key_out(key, tenant) for key, tenant in rows]


def may_revoke(principal: Principal, key: ApiKey, tenant: str) -> bool:
    if may_admin(principal, tenant):
        return True
    return key.kind == "personal" and key.owner_subject == principal.subject and principal.tenant == tenant


@router.delete("/keys/{key_id}", summary="Revoke a key: refused from the next request on")
async def revoke_key(key_id: str, principal: CurrentPrincipal, session: DbSession) -> KeyOut:
    key, tenant = await store.get_key(session, key_id)
    if not may_revoke(principal, key, tenant):
        # Exactly the answer for a key that does not exist: nobody learns which ids are real.
        raise store.NotFound(f"No API key with id '{key_id}'.", param="id")
    key, tenant = await store.revoke_key(session, principal, key.id)
    return key_out(key, tenant)
