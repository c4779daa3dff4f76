"""API keys: mint, list, revoke, and the per-request lookup of a live key."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg
from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from agencyllm.auth.apikeys import mint_key, parse_key, verify_key_hash
from agencyllm.quotas.models import (
    ALL_TENANTS,
    KEY_KINDS,
    TRAFFIC_CLASSES,
    ApiKey,
    Tenant,
)
from agencyllm.quotas.store.changes import Actor, record_change, transaction, utcnow
from agencyllm.quotas.store.errors import Conflict, Invalid, NotFound
from agencyllm.quotas.store.tenants import SYSTEM_TENANT, check_optional_text, get_tenant

LAST_USED_RESOLUTION = timedelta(minutes=1)

# --- API keys -----------------------------------------------------------------------------------


def key_snapshot(key: ApiKey, tenant_name: str | None = None) -> dict[str, Any]:
    """Everything about a key except its hash."""
    return {
        "id": key.id,
        "prefix": key.prefix,
        "name": key.name,
        "kind": key.kind,
        "traffic_class": key.traffic_class,
        "tenant": tenant_name,
        "owner_subject": key.owner_subject,
        "owner_username": key.owner_username,
        "created_by": key.created_by,
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "last_used_at": key.last_used_at,
        "serves_tenants": key.serves_tenants,
    }


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    tenant: Tenant
    # The plaintext `sk-agency-…` value: returned once, never stored.
    secret: str


async def create_key(
    session: AsyncSession,
    actor: Actor,
    *,
    tenant_name: str,
    kind: Literal["personal", "service", "frontend"],
    name: str,
    owner_subject: str | None = None,
    owner_username: str | None = None,
    expires_at: datetime | None = None,
    traffic_class: str = "interactive",
    serves_tenants: list[str] | None = None,
) -> CreatedKey:
    """Mint a key; a service or front-end key's owner is the key itself (`service:<key id>`).
    Front-end keys live in the `system` tenant and act for the people of `serves_tenants`."""
    if kind not in KEY_KINDS:
        raise Invalid("Key kind must be 'personal', 'service' or 'frontend'.", param="kind")
    if kind == "frontend" and tenant_name != SYSTEM_TENANT:
        raise Invalid(f"A front-end key belongs to the '{SYSTEM_TENANT}' tenant.", param="kind")
    if (kind == "frontend") != (serves_tenants is not None):
        raise Invalid("Only a front-end key serves tenants, and it must name them.", param="serves_tenants")
    if traffic_class not in TRAFFIC_CLASSES:
        raise Invalid("'traffic_class' must be 'interactive' or 'batch'.", param="traffic_class")
    name = check_optional_text(name, "name", 100) or ""
    if not name:
        raise Invalid("A key needs a name.", param="name")
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise Invalid("'expires_at' needs a time zone.", param="expires_at")
        if expires_at <= utcnow():
            raise Invalid("'expires_at' must be in the future.", param="expires_at")
    if kind == "personal" and not owner_subject:
        raise Invalid("A personal key needs an owner.", param="owner_subject")
    async with transaction(session):
        tenant = await get_tenant(session, tenant_name)
        if tenant.status != "active":
            raise Conflict(f"Tenant '{tenant_name}' is suspended; resume it before adding keys.")
        if serves_tenants is not None:
            serves_tenants = await _served_tenants(session, serves_tenants)
        minted = mint_key()
        key_id = uuid.uuid4()
        key = ApiKey(
            id=key_id,
            prefix=minted.prefix,
            key_hash=minted.key_hash,
            name=name,
            kind=kind,
            traffic_class=traffic_class,
            tenant_id=tenant.id,
            owner_subject=owner_subject if kind == "personal" else f"service:{key_id}",
            owner_username=owner_username if kind == "personal" else name,
            created_by=actor.subject,
            created_at=utcnow(),
            expires_at=expires_at,
            serves_tenants=serves_tenants,
        )
        session.add(key)
        await session.flush()
        record_change(session, actor, "key.create", "api_key", str(key_id), None, key_snapshot(key, tenant.name))
    return CreatedKey(key=key, tenant=tenant, secret=minted.key)


async def _served_tenants(session: AsyncSession, names: list[str]) -> list[str]:
    """The tenants a front-end key acts for: existing ones, each once, or `*` alone for all."""
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise Invalid("'serves_tenants' must be a non-empty list of tenant names, or ['*'].", param="serves_tenants")
    if ALL_TENANTS in names:
        if names != [ALL_TENANTS]:
            raise Invalid("'*' serves every tenant and stands alone.", param="serves_tenants")
        return names
    unique = list(dict.fromkeys(names))
    for name in unique:
        if name == SYSTEM_TENANT:
            raise Invalid(f"The '{SYSTEM_TENANT}' tenant has no people to serve.", param="serves_tenants")
        await get_tenant(session, name)  # NotFound names the tenant
    return unique


def _key_query() -> Select[ApiKey, str]:
    return select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)


async def list_keys(
    session: AsyncSession,
    *,
    tenant_name: str | None = None,
    owner_subject: str | None = None,
    kind: str | None = None,
    include_revoked: bool = False,
) -> list[tuple[ApiKey, str]]:
    """(key, tenant name) pairs, newest first."""
    query = _key_query().order_by(ApiKey.created_at.desc())
    if tenant_name is not None:
        tenant = await get_tenant(session, tenant_name)
        query = query.where(ApiKey.tenant_id == tenant.id)
    if owner_subject is not None:
        query = query.where(ApiKey.owner_subject == owner_subject)
    if kind is not None:
        query = query.where(ApiKey.kind == kind)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return [(key, name) for key, name in (await session.execute(query)).all()]


def _key_uuid(key_id: str | uuid.UUID) -> uuid.UUID:
    try:
        return key_id if isinstance(key_id, uuid.UUID) else uuid.UUID(str(key_id))
    except ValueError:
        raise NotFound(f"No API key with id '{key_id}'.", param="id") from None


async def get_key(session: AsyncSession, key_id: str | uuid.UUID) -> tuple[ApiKey, str]:
    row = (await session.execute(_key_query().where(ApiKey.id == _key_uuid(key_id)))).first()
    if row is None:
        raise NotFound(f"No API key with id '{key_id}'.", param="id")
    return row[0], row[1]


async def revoke_key(session: AsyncSession, actor: Actor, key_id: str | uuid.UUID) -> tuple[ApiKey, str]:
    """Revoke now (idempotent): the next request with the key is refused on every replica."""
    async with transaction(session):
        key, tenant_name = await get_key(session, key_id)
        if key.revoked_at is None:
            before = key_snapshot(key, tenant_name)
            key.revoked_at = utcnow()
            await session.flush()
            record_change(session, actor, "key.revoke", "api_key", str(key.id), before, key_snapshot(key, tenant_name))
    return key, tenant_name


@dataclass(frozen=True)
class ActiveKey:
    """What the per-request path needs of a live key and its tenant."""

    id: uuid.UUID
    kind: str
    traffic_class: str
    owner_subject: str
    owner_username: str | None
    tenant: str
    tenant_status: str
    serves_tenants: tuple[str, ...] = ()

    def serves(self, tenant: str) -> bool:
        return ALL_TENANTS in self.serves_tenants or tenant in self.serves_tenants


_ACTIVE_KEY_SQL = """
SELECT k.id, k.key_hash, k.kind, k.traffic_class, k.owner_subject, k.owner_username, k.revoked_at, k.expires_at,
       k.last_used_at, k.serves_tenants, t.name AS tenant, t.status AS tenant_status
FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
WHERE k.prefix = $1
"""
# Conditional, so that replicas racing on the same key write once per minute between them.
_TOUCH_KEY_SQL = "UPDATE api_keys SET last_used_at = $2 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $3)"


async def find_active_key(pool: asyncpg.Pool, token: str) -> ActiveKey | None:
    """The live key `token` belongs to, with its tenant, or None (malformed, unknown, wrong secret,
    revoked, expired). On every request's path: one indexed read on the raw pool, no ORM.

    Always reads the database (no cache), so a revocation is seen by the next request anywhere.
    Records `last_used_at` at most once per minute per key.
    """
    parsed = parse_key(token)
    if parsed is None:
        return None
    row = await pool.fetchrow(_ACTIVE_KEY_SQL, parsed[0])
    if row is None or not verify_key_hash(token, row["key_hash"]):
        return None
    now = utcnow()
    if row["revoked_at"] is not None or (row["expires_at"] is not None and row["expires_at"] <= now):
        return None
    if row["last_used_at"] is None or now - row["last_used_at"] >= LAST_USED_RESOLUTION:
        # A hint for admins, not an account: the request need not wait for its flush to disk.
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = off")
            await conn.execute(_TOUCH_KEY_SQL, row["id"], now, now - LAST_USED_RESOLUTION)
    return ActiveKey(
        id=row["id"],
        kind=row["kind"],
        traffic_class=row["traffic_class"],
        owner_subject=row["owner_subject"],
        owner_username=row["owner_username"],
        tenant=row["tenant"],
        tenant_status=row["tenant_status"],
        serves_tenants=tuple(row["serves_tenants"] or ()),
    )
