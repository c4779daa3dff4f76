"""Schema management: the migration matches the models, and the startup check."""

from __future__ import annotations

import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pg import fixtures_unless_conftest_has_them

from agencyllm.quotas.db import Database, SchemaOutOfDate, assert_schema_current, upgrade_schema
from agencyllm.quotas.models import Base

globals().update(fixtures_unless_conftest_has_them())


async def test_migration_matches_models(pg_db):
    def compare(sync_conn):
        context = MigrationContext.configure(
            sync_conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(context, Base.metadata)

    async with pg_db.engine.connect() as conn:
        assert await conn.run_sync(compare) == []


async def test_unique_policy_per_subject_treats_null_as_one_value(pg_db, make_tenant):
    import asyncpg

    tenant = await make_tenant(tokens_per_day=1)
    pool = await pg_db.pool()
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute(
            "INSERT INTO quota_policies (tenant_id, subject) SELECT id, NULL FROM tenants"
            " WHERE name = $1", tenant)


async def test_schema_current_check(pg_url, pg_db):
    await assert_schema_current(pg_db)

    name = f"fresh_{uuid.uuid4().hex[:8]}"
    pool = await pg_db.pool()
    await pool.execute(f"CREATE DATABASE {name}")
    fresh_url = pg_url.replace("/agencyllm?", f"/{name}?")
    fresh = Database(fresh_url, pool_size=1)
    try:
        with pytest.raises(SchemaOutOfDate, match="agencyllm db upgrade"):
            await assert_schema_current(fresh)
        upgrade_schema(fresh_url)  # from inside a running loop: runs in a thread
        await assert_schema_current(fresh)
        async with fresh.engine.begin() as conn:
            await conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'old'")
        with pytest.raises(SchemaOutOfDate, match="revision old"):
            await assert_schema_current(fresh)
    finally:
        await fresh.dispose()
        await pool.execute(f"DROP DATABASE {name}")
