"""Schema management: the migration matches the models, and the startup check."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from agencyllm.quotas.db import (
    Database,
    EmbeddedPostgres,
    SchemaOutOfDate,
    assert_schema_current,
    async_url,
    asyncpg_connect_args,
    upgrade_schema,
)
from agencyllm.quotas.models import Base


async def test_migration_matches_models(pg_db):
    def compare(sync_conn):
        context = MigrationContext.configure(sync_conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(context, Base.metadata)

    async with pg_db.engine.connect() as conn:
        assert await conn.run_sync(compare) == []


async def test_unique_policy_per_subject_treats_null_as_one_value(pg_db, make_tenant):
    import asyncpg

    tenant = await make_tenant(tokens_per_day=1)
    pool = await pg_db.pool()
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute(
            "INSERT INTO quota_policies (tenant_id, subject) SELECT id, NULL FROM tenants WHERE name = $1", tenant
        )


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


def test_database_urls_are_normalised_to_asyncpg():
    for url in (
        "postgresql://u:p@db:5432/agencyllm",
        "postgres://u:p@db:5432/agencyllm",
        "postgresql+psycopg://u:p@db:5432/agencyllm",
    ):
        assert async_url(url).render_as_string(hide_password=False) == ("postgresql+asyncpg://u:p@db:5432/agencyllm")
    socket_url = "postgresql://postgres:@/agencyllm?host=/tmp/pg"
    assert async_url(socket_url).drivername == "postgresql+asyncpg"
    assert asyncpg_connect_args(socket_url) == {"host": "/tmp/pg", "user": "postgres", "database": "agencyllm"}
    with pytest.raises(ValueError):
        async_url("mysql://u:p@db/x")


async def test_embedded_postgres_start_stop_idempotent():
    # Not tmp_path: concurrent pytest sessions in this checkout prune each other's basetemps.
    tmp_path = Path(tempfile.mkdtemp(prefix="agencyllm-test-"))
    server = EmbeddedPostgres(tmp_path / "data")
    url = server.start()
    assert server.start() == url
    assert (tmp_path / "data" / "postgres" / "PG_VERSION").exists()
    db = Database(url, pool_size=1)
    await db.ping()
    await db.dispose()
    server.stop()
    server.stop()
    again = EmbeddedPostgres(tmp_path / "data")  # restart on the existing data directory
    db = Database(again.start(), pool_size=1)
    await db.ping()
    await db.dispose()
    again.stop()
    shutil.rmtree(tmp_path, ignore_errors=True)


# sha256 of each released migration's plpgsql functions as a database receives them. A released
# migration must do the same to every database: these never change (a new migration replaces a
# function instead). The functions share fragments (`agencyllm.migrations.plpgsql`).
RELEASED_FUNCTIONS = {
    "0001_initial": "d5dfa33902f3c5ca1a02b8bbca5973c379d29e77e60fe3f07f18a11fb935072c",
    "0002_audit_chain_governance": "3df3b7c1aa28049855b1c9bb489e119dd95c1bb5161c5f274843074b973221df",
}


@pytest.mark.parametrize("revision", RELEASED_FUNCTIONS)
def test_released_migrations_render_the_same_functions(revision):
    import hashlib
    from importlib import import_module

    functions = import_module(f"agencyllm.migrations.versions.{revision}").FUNCTIONS
    assert hashlib.sha256("\n".join(functions).encode()).hexdigest() == RELEASED_FUNCTIONS[revision]


def test_counter_updates_written_once():
    """Each migration's quota functions take the counter updates from the shared fragments."""
    for revision in RELEASED_FUNCTIONS:
        source = (Path(__file__).parents[1] / "migrations" / "versions" / f"{revision}.py").read_text()
        assert "UPDATE quota_counters SET" not in source, revision
