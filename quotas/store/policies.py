"""Quota policies: a tenant's policy and users' overrides, read and replaced (audited), and the
tenants' fair-sharing weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
from sqlalchemy import ColumnElement, select
from sqlalchemy.ext.asyncio import AsyncSession

from agencyllm.quotas.models import (
    QuotaPolicy,
    Tenant,
)
from agencyllm.quotas.store.changes import Actor, record_change, transaction, utcnow
from agencyllm.quotas.store.errors import Invalid
from agencyllm.quotas.store.quota_rules import QUOTA_FIELDS, validate_quota
from agencyllm.quotas.store.tenants import get_tenant

# --- quota policies -----------------------------------------------------------------------------


def quota_snapshot(policy: QuotaPolicy | None) -> dict[str, Any]:
    if policy is None:
        return {field: None for field in QUOTA_FIELDS} | {"max_tokens_mode": "cap"}
    values = {field: getattr(policy, field) for field in QUOTA_FIELDS}
    if values["allowed_models"] is not None:
        values["allowed_models"] = list(values["allowed_models"])
    return values


def _subject_clause(subject: str | None) -> ColumnElement[bool]:
    return QuotaPolicy.subject.is_(None) if subject is None else QuotaPolicy.subject == subject


async def _policy(session: AsyncSession, tenant: Tenant, subject: str | None) -> QuotaPolicy | None:
    return await session.scalar(select(QuotaPolicy).where(QuotaPolicy.tenant_id == tenant.id, _subject_clause(subject)))


async def get_quota(session: AsyncSession, tenant_name: str, subject: str | None = None) -> dict[str, Any]:
    """The policy's fields (all null, mode 'cap', when none is set)."""
    tenant = await get_tenant(session, tenant_name)
    return quota_snapshot(await _policy(session, tenant, subject))


async def set_quota(
    session: AsyncSession,
    actor: Actor,
    tenant_name: str,
    fields: Mapping[str, Any],
    subject: str | None = None,
) -> dict[str, Any]:
    """Replace the tenant-wide policy (or the user's override when `subject` is given)."""
    values = validate_quota(fields)
    if subject is not None and (not isinstance(subject, str) or not subject.strip()):
        raise Invalid("User subject must be a non-empty string.", param="sub")
    if subject is not None and values["share"] is not None:
        raise Invalid("'share' belongs to the tenant-wide quota, not to one user's.", param="share")
    async with transaction(session):
        tenant = await get_tenant(session, tenant_name)
        policy = await _policy(session, tenant, subject)
        before = quota_snapshot(policy) if policy is not None else None
        if policy is None:
            policy = QuotaPolicy(tenant_id=tenant.id, subject=subject)
            session.add(policy)
        for field, value in values.items():
            setattr(policy, field, value)
        policy.updated_at = utcnow()
        await session.flush()
        target = tenant_name if subject is None else f"{tenant_name}/{subject}"
        record_change(session, actor, "quota.set", "quota", target, before, quota_snapshot(policy))
    return quota_snapshot(policy)


_SHARES_SQL = """
SELECT t.name, p.share FROM tenants t
JOIN quota_policies p ON p.tenant_id = t.id AND p.subject IS NULL
WHERE p.share IS NOT NULL
"""


async def tenant_shares(pool: asyncpg.Pool) -> dict[str, float]:
    """Every tenant's fair-sharing weight that differs from the default of 1."""
    return {row["name"]: row["share"] for row in await pool.fetch(_SHARES_SQL)}
