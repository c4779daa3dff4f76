"""Shared embedded-Postgres fixtures, exposed to every test module by tests/conftest.py (one
server per session: a module that imported them itself would start its own)."""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from agencyllm.quotas.db import Database, EmbeddedPostgres, upgrade_schema

_tenant_numbers = itertools.count()


@functools.cache
def _embedded_url() -> str:
    # Our own temp dir, not tmp_path_factory's: pytest prunes old numbered basetemps, and other
    # sessions running in this checkout at the same time would delete the live data directory.
    data_dir = Path(tempfile.mkdtemp(prefix="agencyllm-test-pg-"))
    server = EmbeddedPostgres(data_dir)

    def stop() -> None:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)

    atexit.register(stop)
    url = server.start()
    upgrade_schema(url)
    return url


@pytest.fixture(scope="session")
def pg_url() -> str:
    """One embedded PostgreSQL 18 per test process (shared even if several modules import this
    fixture), schema at head, stopped at exit. AGENCYLLM_TEST_DATABASE_URL: use that server."""
    external = os.environ.get("AGENCYLLM_TEST_DATABASE_URL")
    if external:
        upgrade_schema(external)
        return external
    return _embedded_url()


@pytest.fixture(scope="session")
async def pg_db(pg_url: str) -> AsyncIterator[Database]:
    db = Database(pg_url)
    yield db
    await db.dispose()


MakeTenant = Callable[..., Awaitable[str]]


@pytest.fixture
def make_tenant(pg_db: Database) -> MakeTenant:
    """`await make_tenant(tokens_per_day=1000, ...)` creates an active tenant with a unique name
    and (when any limit is given) its tenant-wide policy; returns the tenant name."""

    async def create(*, status: str = "active", **policy: object) -> str:
        name = f"t{next(_tenant_numbers)}-{uuid.uuid4().hex[:8]}"
        pool = await pg_db.pool()
        async with pool.acquire() as conn, conn.transaction():
            tenant_id = await conn.fetchval(
                "INSERT INTO tenants (name, display_name, status) VALUES ($1, $2, $3) RETURNING id",
                name,
                name.upper(),
                status,
            )
            if policy:
                await set_policy(conn, tenant_id, None, **policy)
        return name

    return create


async def set_policy(conn, tenant_id: uuid.UUID, subject: str | None, **fields: object) -> None:
    columns = ["tenant_id", "subject", *fields]
    placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in fields) or "subject = EXCLUDED.subject"
    await conn.execute(
        f"INSERT INTO quota_policies ({', '.join(columns)}) VALUES ({placeholders}) "
        f"ON CONFLICT (tenant_id, subject) DO UPDATE SET {updates}",
        tenant_id,
        subject,
        *fields.values(),
    )


async def set_user_policy(db: Database, tenant: str, subject: str | None, **fields: object) -> None:
    """Create or replace the policy of `subject` (None: the tenant-wide one) in tenant `tenant`."""
    pool = await db.pool()
    async with pool.acquire() as conn, conn.transaction():
        tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
        await set_policy(conn, tenant_id, subject, **fields)
