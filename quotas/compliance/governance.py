"""Data governance in the database: the per-tenant content-retention opt-in, the content kept
under it, and the per-install secret behind each tenant's prefix-cache salt.

Prompts and outputs are never stored unless a tenant's `content_retention_days` is set (a
records-law decision made by a platform admin, audited); quotas/compliance/retention.py deletes what
outlives the period.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from agencyllm.quotas import store

MAX_RETENTION_DAYS = 36500
# How long an ingress trusts its copy of a tenant's opt-in: a change is seen within this.
POLICY_TTL_SECONDS = 30.0

_KEEP_SQL = """
INSERT INTO request_content (request_id, tenant_id, created_at, prompt, output)
SELECT $1, id, now(), $3::jsonb, $4 FROM tenants
 WHERE name = $2 AND content_retention_days IS NOT NULL
ON CONFLICT (request_id) DO NOTHING
"""


async def set_content_retention(
    session: AsyncSession, actor: store.Actor, tenant_name: str, days: int | None
) -> int | None:
    """Opt a tenant in (days) or out (None) of keeping prompts and outputs; audited."""
    if days is not None and (
        isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_RETENTION_DAYS
    ):
        raise store.Invalid(
            f"'content_retention_days' must be an integer from 1 to {MAX_RETENTION_DAYS}, or null to keep nothing.",
            param="content_retention_days",
        )
    async with store.transaction(session):
        tenant = await store.get_tenant(session, tenant_name)
        before = tenant.content_retention_days
        if before != days:
            tenant.content_retention_days = days
            tenant.updated_at = store.utcnow()
            await session.flush()
            store.record_change(
                session,
                actor,
                "tenant.retention",
                "tenant",
                tenant_name,
                {"content_retention_days": before},
                {"content_retention_days": days},
            )
    return days


class ContentPolicy:
    """Which tenants keep content, cached briefly per process (one indexed read per tenant per
    TTL on the request path, none when nothing changed)."""

    def __init__(self, pool_source: Any, *, ttl: float = POLICY_TTL_SECONDS) -> None:
        self._pool_source = pool_source  # a quotas.db.Database
        self._ttl = ttl
        self._cache: dict[str, tuple[float, int | None]] = {}

    async def retention_days(self, tenant: str) -> int | None:
        hit = self._cache.get(tenant)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        pool = await self._pool_source.pool()
        days: int | None = await pool.fetchval("SELECT content_retention_days FROM tenants WHERE name = $1", tenant)
        self._cache[tenant] = (now, days)
        return days

    async def keep(self, request_id: str, tenant: str, prompt: Any, output: str | None) -> None:
        """Store one request's content; the insert itself re-checks the opt-in."""
        pool = await self._pool_source.pool()
        await pool.execute(_KEEP_SQL, request_id, tenant, json.dumps(prompt), output)


async def cache_salt_secret(pool: asyncpg.Pool) -> bytes:
    value: str | None = await pool.fetchval("SELECT value FROM platform_secrets WHERE name = 'cache_salt'")
    if not value:
        raise RuntimeError("platform secret 'cache_salt' is missing: run `agencyllm db upgrade`")
    return value.encode()


def tenant_cache_salt(secret: bytes, tenant: str) -> str:
    """vLLM `cache_salt` for `tenant`: requests share prefix-cache blocks only with requests of the
    same salt, so one tenant cannot time another's cached prompts. Stable per tenant, different
    across tenants, unguessable without the secret."""
    return hmac.new(secret, b"agencyllm-cache-salt\x00" + tenant.encode(), hashlib.sha256).hexdigest()
