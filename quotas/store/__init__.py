"""Admin store: tenants, quota policies, API keys and usage reports, on one `AsyncSession`.

Every mutator is one transaction: it validates, writes, records an `AuditEvent` (who, what, when
in UTC, before/after as JSON) and commits; on any error it rolls back, so nothing is half-written.
Callers pass a session that is not inside `session.begin()`. Errors are `NotFound`, `Conflict`
and `Invalid`, which the admin API maps to 404, 409 and 400.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

import asyncpg
from sqlalchemy import Select, bindparam, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from agencyllm.auth.apikeys import mint_key, parse_key, verify_key_hash
from agencyllm.quotas.audit import request_source
from agencyllm.quotas.models import (
    KEY_KINDS,
    MAX_SHARE,
    MAX_TOKENS_MODES,
    TENANT_NAME_PATTERN,
    TENANT_STATUSES,
    TRAFFIC_CLASSES,
    ApiKey,
    AuditEvent,
    QuotaPolicy,
    Tenant,
    UsageRecord,
)

# Holds the platform's own service keys (the bootstrap admin key); see serving/gateway/identity.py.
SYSTEM_TENANT = "system"
QUOTA_LIMIT_FIELDS = (
    "tokens_per_day",
    "tokens_per_month",
    "requests_per_minute",
    "max_concurrent_requests",
    "max_tokens_per_request",
)
QUOTA_FIELDS = (*QUOTA_LIMIT_FIELDS, "max_tokens_mode", "allowed_models", "share")
GROUP_BY = ("day", "user", "model", "tenant")
# Column limits (BIGINT for token budgets, INTEGER for the rest): larger is a typo, not a budget.
_INT32, _INT64 = 2**31 - 1, 2**63 - 1
QUOTA_MAXIMUMS = {
    "tokens_per_day": _INT64,
    "tokens_per_month": _INT64,
    "requests_per_minute": _INT32,
    "max_concurrent_requests": _INT32,
    "max_tokens_per_request": _INT32,
}
LAST_USED_RESOLUTION = timedelta(minutes=1)

_TENANT_NAME = re.compile(TENANT_NAME_PATTERN)


class StoreError(Exception):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class Invalid(StoreError):
    pass


class Actor(Protocol):
    """Whoever makes a change (a `Principal` fits); recorded in the audit trail."""

    @property
    def subject(self) -> str: ...

    @property
    def username(self) -> str | None: ...


@dataclass(frozen=True)
class SystemActor:
    subject: str = "system"
    username: str | None = "system"


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- transactions and audit -------------------------------------------------------------------


@asynccontextmanager
async def _transaction(session: AsyncSession):
    try:
        yield
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict(_integrity_message(exc)) from None
    except BaseException:
        await session.rollback()
        raise


def _integrity_message(exc: IntegrityError) -> str:
    # A race past our explicit checks (two admins at once): say which rule, not the SQL.
    text = str(exc.orig)
    if "keycloak_group" in text:
        return "Another tenant already uses that Keycloak group."
    if "name" in text and "tenants" in text:
        return "A tenant with that name already exists."
    if "foreign key" in text.lower():
        return "The change conflicts with records that refer to it."
    return "The change conflicts with existing data."


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _audit(
    session: AsyncSession,
    actor: Actor,
    action: str,
    target_type: str,
    target_id: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
) -> None:
    snapshot = after if after is not None else before or {}
    tenant = {"tenant": target_id, "quota": target_id.split("/", 1)[0]}.get(target_type, snapshot.get("tenant"))
    session.add(
        AuditEvent(
            at=utcnow(),
            actor_subject=actor.subject,
            actor_username=actor.username,
            # AU-3 "who" and "where from" (a Principal carries them; SystemActor does not).
            actor_client_id=getattr(actor, "client_id", None),
            actor_key_id=getattr(actor, "key_id", None),
            source=request_source.get(),
            tenant=tenant,
            action=action,
            target_type=target_type,
            target_id=target_id,
            before={k: _jsonable(v) for k, v in before.items()} if before is not None else None,
            after={k: _jsonable(v) for k, v in after.items()} if after is not None else None,
        )
    )


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


def _check_optional_text(value: Any, param: str, max_length: int) -> str | None:
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
    display_name = _check_optional_text(display_name, "display_name", 200) or name
    keycloak_group = _check_optional_text(keycloak_group, "keycloak_group", 255)
    async with _transaction(session):
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
        _audit(session, actor, "tenant.create", "tenant", name, None, tenant_snapshot(tenant))
    return tenant


async def update_tenant(session: AsyncSession, actor: Actor, name: str, changes: Mapping[str, Any]) -> Tenant:
    unknown = set(changes) - {"display_name", "keycloak_group"}
    if unknown:
        field = sorted(unknown)[0]
        raise Invalid(f"Unknown or read-only tenant field '{field}'.", param=field)
    async with _transaction(session):
        tenant = await get_tenant(session, name)
        before = tenant_snapshot(tenant)
        if "display_name" in changes:
            tenant.display_name = _check_optional_text(changes["display_name"], "display_name", 200) or tenant.name
        if "keycloak_group" in changes:
            group = _check_optional_text(changes["keycloak_group"], "keycloak_group", 255)
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
            _audit(session, actor, "tenant.update", "tenant", name, before, after)
    return tenant


async def set_tenant_status(
    session: AsyncSession, actor: Actor, name: str, status: Literal["active", "suspended"]
) -> Tenant:
    if status not in TENANT_STATUSES:
        raise Invalid(f"Tenant status must be one of {', '.join(TENANT_STATUSES)}.", param="status")
    async with _transaction(session):
        tenant = await get_tenant(session, name)
        if tenant.status != status:
            before = tenant_snapshot(tenant)
            tenant.status = status
            tenant.updated_at = utcnow()
            await session.flush()
            action = "tenant.suspend" if status == "suspended" else "tenant.resume"
            _audit(session, actor, action, "tenant", name, before, tenant_snapshot(tenant))
    return tenant


async def delete_tenant(session: AsyncSession, actor: Actor, name: str) -> None:
    """Delete a tenant with its policies and keys; refused while usage history refers to it."""
    async with _transaction(session):
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
        _audit(session, actor, "tenant.delete", "tenant", name, before, None)


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
    condition = group.in_(normalized)
    if match_names:
        condition = condition | Tenant.name.in_(normalized)
    candidates = list(await session.scalars(select(Tenant).where(condition)))

    def rank(tenant: Tenant) -> int:
        keys = {(tenant.keycloak_group or "").lstrip("/")} | ({tenant.name} if match_names else set())
        return min(i for i, hint in enumerate(normalized) if hint in keys)

    return min(candidates, key=rank, default=None)


# --- quota policies -----------------------------------------------------------------------------


def quota_snapshot(policy: QuotaPolicy | None) -> dict[str, Any]:
    if policy is None:
        return {field: None for field in QUOTA_FIELDS} | {"max_tokens_mode": "cap"}
    values = {field: getattr(policy, field) for field in QUOTA_FIELDS}
    if values["allowed_models"] is not None:
        values["allowed_models"] = list(values["allowed_models"])
    return values


def validate_quota(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A complete policy from `fields`: omitted limits mean unlimited, mode defaults to 'cap'."""
    unknown = set(fields) - set(QUOTA_FIELDS)
    if unknown:
        field = sorted(unknown)[0]
        raise Invalid(f"Unknown quota field '{field}'; known fields: {', '.join(QUOTA_FIELDS)}.", param=field)
    policy: dict[str, Any] = {}
    for field in QUOTA_LIMIT_FIELDS:
        value = fields.get(field)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= QUOTA_MAXIMUMS[field]
        ):
            raise Invalid(
                f"'{field}' must be an integer from 0 to {QUOTA_MAXIMUMS[field]}, or null.",
                param=field,
            )
        policy[field] = value
    share = fields.get("share")
    if share is not None and (
        isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= MAX_SHARE
    ):
        raise Invalid(f"'share' must be a number above 0 and at most {MAX_SHARE}, or null (1).", param="share")
    policy["share"] = None if share is None else float(share)
    mode = fields.get("max_tokens_mode") or "cap"
    if mode not in MAX_TOKENS_MODES:
        raise Invalid("'max_tokens_mode' must be 'cap' or 'reject'.", param="max_tokens_mode")
    policy["max_tokens_mode"] = mode
    models = fields.get("allowed_models")
    if models is not None:
        if not isinstance(models, list | tuple) or not all(isinstance(m, str) and m.strip() for m in models):
            raise Invalid(
                "'allowed_models' must be a list of model names, or null for all models.",
                param="allowed_models",
            )
        models = list(dict.fromkeys(m.strip() for m in models))
    policy["allowed_models"] = models
    return policy


def _subject_clause(subject: str | None):
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
    async with _transaction(session):
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
        _audit(session, actor, "quota.set", "quota", target, before, quota_snapshot(policy))
    return quota_snapshot(policy)


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
    kind: Literal["personal", "service"],
    name: str,
    owner_subject: str | None = None,
    owner_username: str | None = None,
    expires_at: datetime | None = None,
    traffic_class: str = "interactive",
) -> CreatedKey:
    """Mint a key; a service key's owner is the key itself (`service:<key id>`)."""
    if kind not in KEY_KINDS:
        raise Invalid("Key kind must be 'personal' or 'service'.", param="kind")
    if traffic_class not in TRAFFIC_CLASSES:
        raise Invalid("'traffic_class' must be 'interactive' or 'batch'.", param="traffic_class")
    name = _check_optional_text(name, "name", 100) or ""
    if not name:
        raise Invalid("A key needs a name.", param="name")
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise Invalid("'expires_at' needs a time zone.", param="expires_at")
        if expires_at <= utcnow():
            raise Invalid("'expires_at' must be in the future.", param="expires_at")
    if kind == "personal" and not owner_subject:
        raise Invalid("A personal key needs an owner.", param="owner_subject")
    async with _transaction(session):
        tenant = await get_tenant(session, tenant_name)
        if tenant.status != "active":
            raise Conflict(f"Tenant '{tenant_name}' is suspended; resume it before adding keys.")
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
        )
        session.add(key)
        await session.flush()
        _audit(session, actor, "key.create", "api_key", str(key_id), None, key_snapshot(key, tenant.name))
    return CreatedKey(key=key, tenant=tenant, secret=minted.key)


def _key_query() -> Select:
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
    async with _transaction(session):
        key, tenant_name = await get_key(session, key_id)
        if key.revoked_at is None:
            before = key_snapshot(key, tenant_name)
            key.revoked_at = utcnow()
            await session.flush()
            _audit(session, actor, "key.revoke", "api_key", str(key.id), before, key_snapshot(key, tenant_name))
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


_ACTIVE_KEY_SQL = """
SELECT k.id, k.key_hash, k.kind, k.traffic_class, k.owner_subject, k.owner_username, k.revoked_at, k.expires_at,
       k.last_used_at, t.name AS tenant, t.status AS tenant_status
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
    )


_SHARES_SQL = """
SELECT t.name, p.share FROM tenants t
JOIN quota_policies p ON p.tenant_id = t.id AND p.subject IS NULL
WHERE p.share IS NOT NULL
"""


async def tenant_shares(pool: asyncpg.Pool) -> dict[str, float]:
    """Every tenant's fair-sharing weight that differs from the default of 1."""
    return {row["name"]: row["share"] for row in await pool.fetch(_SHARES_SQL)}


# --- usage --------------------------------------------------------------------------------------


async def usage_report(
    session: AsyncSession,
    *,
    tenant_name: str | None = None,
    user: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    group_by: str = "day",
    time_zone: str = "UTC",
) -> list[dict[str, Any]]:
    """Rows of {<group_by>, requests, prompt_tokens, completion_tokens, total_tokens}.

    `since` is inclusive and `until` exclusive (on the request's start time); days are calendar
    days in `time_zone`. `user` matches the subject or the username.
    """
    if group_by not in GROUP_BY:
        raise Invalid(f"'group_by' must be one of {', '.join(GROUP_BY)}.", param="group_by")
    if since is not None and until is not None and since >= until:
        raise Invalid("'from' must be before 'to'.", param="from")
    record = UsageRecord
    group_columns: list[Any]
    if group_by == "day":
        # Rendered inline: GROUP BY must repeat the select's expression, bind parameters and all.
        zone = bindparam("zone", time_zone, literal_execute=True)
        day = func.date(func.timezone(zone, record.started_at))
        group_columns = [day.label("day")]
    elif group_by == "user":
        group_columns = [record.subject.label("user")]
    elif group_by == "model":
        group_columns = [record.model.label("model")]
    else:
        group_columns = [Tenant.name.label("tenant")]
    totals = [
        func.count().label("requests"),
        func.coalesce(func.sum(record.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(record.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(record.total_tokens), 0).label("total_tokens"),
    ]
    extra = [func.max(record.username).label("username")] if group_by == "user" else []
    query = select(*group_columns, *extra, *totals).select_from(record)
    if group_by == "tenant":
        query = query.join(Tenant, Tenant.id == record.tenant_id)
    if tenant_name is not None:
        tenant = await get_tenant(session, tenant_name)
        query = query.where(record.tenant_id == tenant.id)
    if user is not None:
        query = query.where((record.subject == user) | (record.username == user))
    if model is not None:
        query = query.where(record.model == model)
    if since is not None:
        query = query.where(record.started_at >= since)
    if until is not None:
        query = query.where(record.started_at < until)
    query = query.group_by(*group_columns).order_by(*group_columns)
    rows = []
    for row in (await session.execute(query)).mappings():
        item = {k: _jsonable(v) for k, v in row.items()}
        for field in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
            item[field] = int(item[field])
        rows.append(item)
    return rows


def day_bounds(first: date | None, last: date | None, time_zone: str) -> tuple[datetime | None, datetime | None]:
    """[first 00:00, day after last 00:00) in `time_zone`, as aware datetimes."""
    zone = ZoneInfo(time_zone)
    since = datetime.combine(first, datetime.min.time(), zone) if first else None
    until = datetime.combine(last + timedelta(days=1), datetime.min.time(), zone) if last else None
    return since, until
