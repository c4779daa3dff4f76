"""The database commands the Helm chart runs, against real Postgres: `agencyllm db wait` (the Ray
pods' init container) and `agencyllm db bootstrap-admin` (the migrations Job's second step)."""

from __future__ import annotations

import io
import threading
import uuid

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from agencyllm.auth.apikeys import mint_key
from agencyllm.quotas import store
from agencyllm.quotas.db import Database, asyncpg_connect_args, upgrade_schema
from agencyllm.serving.cli.main import main
from agencyllm.serving.ops.cluster_init import BootstrapKeyError, register_admin_key, wait_for_current_schema


@pytest.fixture
async def empty_database(pg_url: str):
    """A fresh database on the test server, with no schema yet."""
    name = f"wait_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(**asyncpg_connect_args(pg_url))
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_wait_returns_at_once_on_a_current_schema(pg_url):
    out = io.StringIO()
    assert await wait_for_current_schema(pg_url, timeout=10, interval=0.2, out=out)
    assert out.getvalue() == "Database schema is current.\n"


async def test_wait_blocks_until_migrations_ran(empty_database):
    out = io.StringIO()
    assert not await wait_for_current_schema(empty_database, timeout=1, interval=0.3, out=out)
    assert "revision none" in out.getvalue() and "agencyllm db upgrade" in out.getvalue()

    # The hook Job migrates while the init container waits: the wait ends once the schema is current.
    migrate = threading.Timer(0.5, upgrade_schema, args=(empty_database,))
    migrate.start()
    try:
        out = io.StringIO()
        assert await wait_for_current_schema(empty_database, timeout=60, interval=0.3, out=out)
    finally:
        migrate.join()
    assert out.getvalue().endswith("Database schema is current.\n")


async def test_wait_gives_up_on_an_unreachable_database_without_leaking_the_url():
    out = io.StringIO()
    url = "postgresql://agencyllm:s3cret-pass@127.0.0.1:1/agencyllm"
    assert not await wait_for_current_schema(url, timeout=1, interval=0.3, out=out)
    text = out.getvalue()
    assert "database not reachable" in text and "Gave up after 1s" in text
    assert "s3cret-pass" not in text


def test_wait_command_needs_a_database_url(monkeypatch, capsys):
    monkeypatch.delenv("AGENCYLLM_DATABASE_URL", raising=False)
    assert main(["db", "wait", "--timeout", "1"]) == 2
    assert "AGENCYLLM_DATABASE_URL" in capsys.readouterr().err


def test_wait_command_exit_codes(monkeypatch, pg_url, capsys):
    monkeypatch.setenv("AGENCYLLM_DATABASE_URL", pg_url)
    assert main(["db", "wait", "--timeout", "10"]) == 0
    monkeypatch.setenv("AGENCYLLM_DATABASE_URL", "postgresql://x:y@127.0.0.1:1/x")
    assert main(["db", "wait", "--timeout", "0.5", "--interval", "0.2"]) == 1


async def test_bootstrap_key_registers_once_as_platform_admin(pg_db: Database):
    key = mint_key().key
    assert await register_admin_key(pg_db, key) is True
    assert await register_admin_key(pg_db, key) is False  # the Job runs on every upgrade
    active = await store.find_active_key(await pg_db.pool(), key)
    assert active is not None and active.tenant == store.SYSTEM_TENANT and active.kind == "service"
    pool = await pg_db.pool()
    audited = await pool.fetchval(
        "SELECT count(*) FROM audit_events WHERE action = 'key.create' AND target_id = $1", str(active.id)
    )
    assert audited == 1


async def test_bootstrap_key_refusals(pg_db: Database):
    with pytest.raises(BootstrapKeyError, match="not an agencyllm API key"):
        await register_admin_key(pg_db, "hunter2")
    key = mint_key().key
    assert await register_admin_key(pg_db, key)
    prefix = key.split("_", 1)[0]
    with pytest.raises(BootstrapKeyError, match="same prefix"):
        await register_admin_key(pg_db, prefix + "_" + "A" * 43)


def test_bootstrap_admin_command(monkeypatch, pg_url, tmp_path, capsys):
    monkeypatch.setenv("AGENCYLLM_DATABASE_URL", pg_url)
    assert main(["db", "bootstrap-admin", "--new-key"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-agency-")
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    assert main(["db", "bootstrap-admin", "--key-file", str(key_file)]) == 0
    assert "registered" in capsys.readouterr().out
    assert main(["db", "bootstrap-admin", "--key-file", str(key_file)]) == 0
    assert "already registered" in capsys.readouterr().out
    key_file.write_text("not-a-key")
    assert main(["db", "bootstrap-admin", "--key-file", str(key_file)]) == 1
    assert "not an agencyllm API key" in capsys.readouterr().err
    assert main(["db", "bootstrap-admin", "--key-file", str(tmp_path / "absent")]) == 2
