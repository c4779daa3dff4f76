"""Tenants: create, rename, map to a Keycloak group, suspend, delete; and the tenant a token's
group hints point to."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from sqlalchemy import ColumnElement, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from agencyllm.quotas.models import (
    TENANT_NAME_PATTERN,
    TENANT_STATUSES,
    ApiKey,
    QuotaPolicy,
    Tenant,
    UsageRecord,
)
from agencyllm.quotas.store.changes import Actor, record_change, transaction, utcnow
from agencyllm.quotas.store.errors import Conflict, Invalid, NotFound

# Holds the platform's own service keys (the bootstrap admin key); see serving/gateway/identity.py.
SYSTEM_TENANT = "system"
_TENANT_NAME = re.compile(TENANT_NAME_PATTERN)

# --- tenants ----------------------------------------------------------------------------------


def tenant_snapshot(tenant: Tenant) -> dict[str, Any]:
    return {
        "name": tenant.name,
        "display_name": tenant.display_name,
        "keycloak_group": tenant.keycloak_group,
        "status": tenant.status,
    }


def _check_tenant_name(name: Any) -> str:
    if not isinstance(name, str) or not _TENANT_NAME.match(name):
        raise Invalid(
            "Tenant name must be 2-63 characters of lowercase letters, digits and '-', "
            "starting with a letter or digit.",
            param="name",
        )
    return name


def check_optional_text(value: Any, param: str, max_length: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid(f"'{param}' must be a string or null.", param=param)
    value = value.strip()
    if len(value) > max_length:
        raise Invalid(f"'{param}' must be at most {max_length} characters.", param=param)
    return value or None


async def _tenant_by_group(session: AsyncSession, group: str) -> Tenant | None:
    return await session.scalar(select(Tenant).where(Tenant.keycloak_group == group))


async def get_tenant(session: AsyncSession, name: str) -> Tenant:
    tenant = await session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound(f"No tenant named '{name}'.", param="name")
    return tenant


async def list_tenants(session: AsyncSession) -> list[Tenant]:
    return list(await session.scalars(select(Tenant).order_by(Tenant.name)))


async def create_tenant(
    session: AsyncSession,
    actor: Actor,
    *,
    name: str,
    display_name: str | None = None,
    keycloak_group: str | None = None,
) -> Tenant:
    name = _check_tenant_name(name)
    display_name = check_optional_text(display_name, "display_name", 200) or name
    keycloak_group = check_optional_text(keycloak_group, "keycloak_group", 255)
    async with transaction(session):
        if await session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
            raise Conflict(f"A tenant named '{name}' already exists.", param="name")
        if keycloak_group and await _tenant_by_group(session, keycloak_group) is not None:
            raise Conflict(
                f"Keycloak group '{keycloak_group}' is already mapped to another tenant.",
                param="keycloak_group",
            )
        now = utcnow()
        tenant = Tenant(
            id=uuid.uuid4(),
            name=name,
            display_name=display_name,
            keycloak_group=keycloak_group,
            status="active",
            created_at=now,
            updated_at=now,
        )
        session.add(tenant)
        await session.flush()
        record_change(session, actor, "tenant.create", "tenant", name, None, tenant_snapshot(tenant))
    return tenant


async def update_tenant(session: AsyncSession, actor: Actor, name: str, changes: Mapping[str, Any]) -> Tenant:
    unknown = set(changes) - {"display_name", "keycloak_group"}
    if unknown:
        field = sorted(unknown)[0]
        raise Invalid(f"Unknown or read-only tenant field '{field}'.", param=field)
    async with transaction(session):
        tenant = await get_tenant(session, name)
        before = tenant_snapshot(tenant)
        if "display_name" in changes:
            tenant.display_name = check_optional_text(changes["display_name"], "display_name", 200) or tenant.name
        if "keycloak_group" in changes:
            group = check_optional_text(changes["keycloak_group"], "keycloak_group", 255)
            holder = await _tenant_by_group(session, group) if group else None
            if holder is not None and holder.id != tenant.id:
                raise Conflict(
                    f"Keycloak group '{group}' is already mapped to tenant '{holder.name}'.",
                    param="keycloak_group",
                )
            tenant.keycloak_group = group
        after = tenant_snapshot(tenant)
        if after != before:
            tenant.updated_at = utcnow()
            await session.flush()
            record_change(session, actor, "tenant.update", "tenant", name, before, after)
    return tenant


async def set_tenant_status(
    session: AsyncSession, actor: Actor, name: str, status: Literal["active", "suspended"]
) -> Tenant:
    if status not in TENANT_STATUSES:
        raise Invalid(f"Tenant status must be one of {', '.join(TENANT_STATUSES)}.", param="status")
    async with transaction(session):
        tenant = await get_tenant(session, name)
        if tenant.status != status:
            before = tenant_snapshot(tenant)
            tenant.status = status
            tenant.updated_at = utcnow()
            await session.flush()
            action = "tenant.suspend" if status == "suspended" else "tenant.resume"
            record_change(session, actor, action, "tenant", name, before, tenant_snapshot(tenant))
    return tenant


async def delete_tenant(session: AsyncSession, actor: Actor, name: str) -> None:
    """Delete a tenant with its policies and keys; refused while usage history refers to it."""
    async with transaction(session):
        tenant = await get_tenant(session, name)
        if name == SYSTEM_TENANT:
            raise Conflict("The system tenant holds the platform's own keys and cannot be deleted.")
        used = await session.scalar(select(UsageRecord.request_id).where(UsageRecord.tenant_id == tenant.id).limit(1))
        if used is not None:
            raise Conflict(
                f"Tenant '{name}' has usage history, which must be kept; suspend it instead.",
                param="name",
            )
        before = tenant_snapshot(tenant)
        await session.execute(delete(QuotaPolicy).where(QuotaPolicy.tenant_id == tenant.id))
        await session.execute(delete(ApiKey).where(ApiKey.tenant_id == tenant.id))
        await session.delete(tenant)
        await session.flush()
        record_change(session, actor, "tenant.delete", "tenant", name, before, None)


async def ensure_tenant(session: AsyncSession, actor: Actor, name: str, display_name: str) -> Tenant:
    try:
        return await get_tenant(session, name)
    except NotFound:
        return await create_tenant(session, actor, name=name, display_name=display_name)


# --- tenant lookup for identities ---------------------------------------------------------------


async def tenant_for_hints(session: AsyncSession, hints: Sequence[str], *, match_names: bool = False) -> Tenant | None:
    """The tenant a token's hints point to: the first hint (token order) that matches wins.

    Hints are Keycloak group names or full paths (`/agency/office`), compared with
    `tenants.keycloak_group` ignoring a leading '/'; with `match_names` (the tenant claim holds
    tenant names) they are also compared with `tenants.name`.
    """
    normalized = [h.strip().lstrip("/") for h in hints if h and h.strip().strip("/")]
    if not normalized:
        return None
    group = func.ltrim(Tenant.keycloak_group, "/")
    condition: ColumnElement[bool] = group.in_(normalized)
    if match_names:
        condition = condition | Tenant.name.in_(normalized)
    candidates = list(await session.scalars(select(Tenant).where(condition)))

    def rank(tenant: Tenant) -> int:
        keys = {(tenant.keycloak_group or "").lstrip("/")} | ({tenant.name} if match_names else set())
        return min(i for i, hint in enumerate(normalized) if hint in keys)

    return min(candidates, key=rank, default=None)
