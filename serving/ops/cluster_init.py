"""What a cluster install runs before the application: the schema gate and the first admin key.

`agencyllm db wait` (an init container of every Ray pod) returns once the schema is at this
release's head, so the application starts only on a current schema.

On Kubernetes nobody can read a file the platform writes, and the chart never generates secrets
(Helm's `lookup` sees nothing offline). So the agency generates the key (`agencyllm db
bootstrap-admin --new-key`), keeps it in a Secret, and the migrations Job registers it:
`agencyllm db bootstrap-admin --key-file /etc/agencyllm/bootstrap/key`. Registering is idempotent;
only the key's hash is stored.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from typing import TextIO

from sqlalchemy import select

from agencyllm.auth.apikeys import hash_key, mint_key, parse_key, verify_key_hash
from agencyllm.quotas import store
from agencyllm.quotas.db import Database, SchemaOutOfDate, assert_schema_current
from agencyllm.quotas.models import ApiKey

KEY_NAME = "bootstrap-admin"


class BootstrapKeyError(ValueError):
    """The supplied key cannot be registered; the message says why and what to do."""


def new_key() -> str:
    return mint_key().key


async def register_admin_key(database: Database, key: str) -> bool:
    """Register `key` as a platform-admin (system tenant, service) key. True when added, False
    when it was already registered."""
    parsed = parse_key(key)
    if parsed is None:
        raise BootstrapKeyError(
            "the bootstrap key is not an agencyllm API key (sk-agency-<12 characters>_<secret>); "
            "generate one with `agencyllm db bootstrap-admin --new-key`"
        )
    prefix, _ = parsed
    actor = store.SystemActor()
    async with database.sessions() as session:
        tenant = await store.ensure_tenant(session, actor, store.SYSTEM_TENANT, "Platform")
        existing = (await session.execute(select(ApiKey).where(ApiKey.prefix == prefix))).scalar_one_or_none()
        if existing is not None:
            if not verify_key_hash(key, existing.key_hash):
                raise BootstrapKeyError("another key with the same prefix is registered: generate a new bootstrap key")
            if existing.revoked_at is not None:
                raise BootstrapKeyError("the bootstrap key was revoked: put a newly generated key into the Secret")
            return False
        key_id = uuid.uuid4()
        row = ApiKey(
            id=key_id,
            prefix=prefix,
            key_hash=hash_key(key),
            name=KEY_NAME,
            kind="service",
            tenant_id=tenant.id,
            owner_subject=f"service:{key_id}",
            owner_username=KEY_NAME,
            created_by=actor.subject,
            created_at=store.utcnow(),
        )
        session.add(row)
        await session.flush()
        # The same audit record an admin-minted key leaves (AC-2(4): account changes audited).
        snapshot = store.key_snapshot(row, tenant.name)
        store.record_change(session, actor, "key.create", "api_key", str(key_id), None, snapshot)
        await session.commit()
    return True


def _reason(exc: BaseException) -> str:
    """Why the check failed, without the URL (it may carry a password)."""
    if isinstance(exc, SchemaOutOfDate):
        return str(exc)
    cause = exc.__cause__ or exc
    message = str(cause).splitlines()[0][:200] if str(cause) else ""
    if isinstance(cause, OSError) or type(cause).__module__.startswith("asyncpg"):
        return f"database not reachable: {type(cause).__name__}{': ' + message if message else ''}"
    return f"database not reachable: {type(cause).__name__}"


async def wait_for_current_schema(
    url: str, timeout: float, interval: float = 2.0, *, out: TextIO | None = None
) -> bool:
    """Check until the schema is current (True) or `timeout` seconds pass (False), printing each
    new reason for waiting."""
    out = out or sys.stdout
    deadline = time.monotonic() + timeout
    last = None
    while True:
        database = Database(url, pool_size=1)
        try:
            await asyncio.wait_for(assert_schema_current(database), timeout=max(1.0, min(30.0, timeout)))
            print("Database schema is current.", file=out, flush=True)
            return True
        except Exception as exc:  # unreachable, auth failure, old schema: all mean "not yet"
            reason = _reason(exc) if not isinstance(exc, TimeoutError) else "database not reachable: timed out"
        finally:
            await database.dispose()
        if reason != last:
            print(f"Waiting for the database schema: {reason}", file=out, flush=True)
            last = reason
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            print(f"Gave up after {timeout:g}s: {reason}", file=out, flush=True)
            return False
        await asyncio.sleep(min(interval, remaining))


async def register_admin_key_at(url: str, key: str) -> bool:
    """`register_admin_key` on the database at `url` (`agencyllm db bootstrap-admin --key-file`)."""
    database = Database(url)
    try:
        return await register_admin_key(database, key)
    finally:
        await database.dispose()
