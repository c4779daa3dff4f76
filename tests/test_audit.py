"""The audit trail on real Postgres: every event type with its AU-3 fields, the hash chain and
`agencyllm audit verify` against tampering in SQL, the database roles, concurrent writers,
export (file and syslog), and a flood of failed sign-ins folded into a bounded number of rows.
One file over 400 lines: the checks share one audited database and its roles, set up once."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from audit_helpers import as_role, audit_rows, fresh_database

from agencyllm.quotas import store
from agencyllm.quotas.audit import AuditLog, verify_chain
from agencyllm.quotas.compliance.retention import Retention
from agencyllm.quotas.db import Database, asyncpg_connect_args
from agencyllm.quotas.ledger import AdmissionRefused, Ledger, ReservationRequest
from agencyllm.serving.cli import main as cli
from agencyllm.serving.gateway.errors import OpenAIError
from agencyllm.serving.gateway.identity import Authenticator
from agencyllm.serving.http.app import create_app
from agencyllm.serving.settings import Settings

ACTOR = store.SystemActor(subject="admin-sub", username="admin")
AU3 = ("at", "action", "category", "outcome", "actor_subject", "seq", "prev_hash", "hash")


def request(tenant: str, *, subject: str = "staff-sub", max_tokens: int = 10) -> ReservationRequest:
    return ReservationRequest(
        request_id=uuid.uuid4().hex,
        tenant=tenant,
        subject=subject,
        username="staff",
        key_id=str(uuid.uuid4()),
        model="m1",
        endpoint="chat",
        prompt_tokens=5,
        max_tokens=max_tokens,
        context_length=100,
        client_id="agencyllm-web",
        source="10.1.2.3",
    )


async def connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(**asyncpg_connect_args(url))


async def run_cli(monkeypatch, url: str, *argv: str) -> int:
    monkeypatch.setenv("AGENCYLLM_DATABASE_URL", url)
    return await asyncio.to_thread(cli.main, list(argv))


async def some_events(url: str) -> None:
    """Admin changes, a model request and a refusal: a few records of each kind."""
    db = Database(url, pool_size=2)
    try:
        name = f"t-{uuid.uuid4().hex[:8]}"
        async with db.sessions() as session:
            await store.create_tenant(session, ACTOR, name=name)
            await store.set_quota(session, ACTOR, name, {"tokens_per_day": 100})
            await store.set_tenant_status(session, ACTOR, name, "suspended")
            await store.set_tenant_status(session, ACTOR, name, "active")
        ledger = Ledger(db)
        reservation = await ledger.reserve(request(name))
        await ledger.settle(reservation, prompt_tokens=5, completion_tokens=3, status="ok", ttft_ms=1.0, latency_ms=2.0)
    finally:
        await db.dispose()


# --- every event type, with its AU-3 fields ---------------------------------------------------------


async def test_every_event_type_lands_with_its_au3_fields(pg_url, pg_db, make_tenant):
    name = f"au3-{uuid.uuid4().hex[:8]}"
    async with pg_db.sessions() as session:
        await store.create_tenant(session, ACTOR, name=name)
        await store.set_quota(session, ACTOR, name, {"tokens_per_day": 20})
        created = await store.create_key(session, ACTOR, tenant_name=name, kind="service", name="svc")
        await store.revoke_key(session, ACTOR, created.key.id)
        await store.set_tenant_status(session, ACTOR, name, "suspended")
        await store.set_tenant_status(session, ACTOR, name, "active")

    ledger = Ledger(pg_db)
    req = request(name)
    reservation = await ledger.reserve(req)
    await ledger.settle(reservation, prompt_tokens=5, completion_tokens=4, status="ok", ttft_ms=3.0, latency_ms=9.0)
    with pytest.raises(AdmissionRefused):
        await ledger.reserve(request(name, max_tokens=50))  # 55 > 20 tokens a day
    await ledger.audit.flush(everything=True)

    settings = Settings(database_url=pg_url)
    authenticator = Authenticator(settings, pg_db, None)
    for header in (None, "Bearer sk-agency-nope_nope", "Bearer eyJ.not-a-token"):
        with pytest.raises(OpenAIError) as refused:
            await authenticator.authenticate(header)
        assert refused.value.status == 401
    await authenticator.audit.flush(everything=True)

    pool = await pg_db.pool()
    rows = await audit_rows(
        pool,
        "tenant = $1 OR target_id = $1 OR target_id = $2 "
        "OR (action = 'auth.failure' AND at > now() - interval '1 minute')",
        name,
        str(created.key.id),
    )
    by_action: dict[str, list[dict]] = {}
    for row in rows:
        by_action.setdefault(row["action"], []).append(row)
        for field in AU3:
            assert row[field] is not None, (row["action"], field)
        assert row["at"].utcoffset() == timedelta(0) or row["at"].tzinfo is not None
        assert len(row["hash"]) == 64 and len(row["prev_hash"]) == 64
    for action in (
        "tenant.create",
        "quota.set",
        "key.create",
        "key.revoke",
        "tenant.suspend",
        "tenant.resume",
        "model.request",
        "quota.refusal",
        "auth.failure",
    ):
        assert action in by_action, action

    for action in ("tenant.create", "quota.set", "key.create", "key.revoke", "tenant.suspend"):
        assert all(r["tenant"] == name and r["category"] == "admin" for r in by_action[action]), action
    suspend = by_action["tenant.suspend"][0]
    assert suspend["before"]["status"] == "active" and suspend["after"]["status"] == "suspended"
    assert suspend["actor_subject"] == "admin-sub" and suspend["actor_username"] == "admin"
    revoke = by_action["key.revoke"][0]
    assert revoke["before"]["revoked_at"] is None and revoke["after"]["revoked_at"] is not None

    model = by_action["model.request"][0]
    assert model["request_id"] == req.request_id and model["tenant"] == name
    assert (model["actor_subject"], model["actor_username"], model["actor_client_id"], model["actor_key_id"]) == (
        "staff-sub",
        "staff",
        "agencyllm-web",
        req.key_id,
    )
    assert model["source"] == "10.1.2.3" and model["outcome"] == "success"
    assert model["target_id"] == "m1"
    details = model["details"]
    assert details["prompt_tokens"] == 5 and details["completion_tokens"] == 4
    assert details["status"] == "ok" and details["total_tokens"] == 9

    refusal = by_action["quota.refusal"][0]
    assert refusal["outcome"] == "refused" and refusal["tenant"] == name
    assert refusal["actor_subject"] == "staff-sub" and refusal["source"] == "10.1.2.3"
    refusal_details = refusal["details"]
    assert refusal_details["reason"] == "tokens_per_day" and refusal_details["count"] == 1

    reasons = {r["details"]["reason"] for r in by_action["auth.failure"]}
    assert {"missing_credentials", "invalid_api_key", "token_without_issuer"} <= reasons
    assert all(r["outcome"] == "failure" for r in by_action["auth.failure"])


# --- tamper evidence ------------------------------------------------------------------------------------


async def tamper(url: str, sql: str) -> None:
    """What an attacker with the database's superuser does: bypass the append-only trigger."""
    conn = await connect(url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL agencyllm.audit_purge = 'on'")
            await conn.execute(sql)
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("sql", "bad_seq", "words"),
    [
        ("UPDATE audit_events SET actor_subject = 'someone-else' WHERE seq = 3", 3, "modified"),
        (
            "UPDATE audit_events SET details = details || '{\"completion_tokens\": 0}' WHERE action = 'model.request'",
            None,
            "modified",
        ),
        ("DELETE FROM audit_events WHERE seq = 4", 4, "deleted"),
        ("DELETE FROM audit_events WHERE seq = (SELECT max(seq) FROM audit_events)", None, "deleted"),
        ("DELETE FROM audit_events WHERE seq <= 2", 2, "deleted without a purge record"),
        # Reordered: two records swap places in the sequence.
        (
            "UPDATE audit_events SET seq = -2 WHERE seq = 2; UPDATE audit_events SET seq = 2 WHERE seq = 3;"
            " UPDATE audit_events SET seq = 3 WHERE seq = -2",
            2,
            "modified",
        ),
    ],
)
async def test_verify_names_the_first_tampered_record(pg_url, monkeypatch, capsys, sql, bad_seq, words):
    async with fresh_database(pg_url) as url:
        await some_events(url)
        assert await run_cli(monkeypatch, url, "audit", "verify") == 0
        assert "audit chain OK" in capsys.readouterr().out
        await tamper(url, sql)
        assert await run_cli(monkeypatch, url, "audit", "verify", "--format", "json") == 1
        result = json.loads(capsys.readouterr().out)
        assert not result["ok"] and words in result["problem"]
        if bad_seq is not None:
            assert result["bad_seq"] == bad_seq
        else:
            conn = await connect(url)
            try:
                if "DELETE" in sql:
                    assert result["bad_seq"] == await conn.fetchval("SELECT max(seq) + 1 FROM audit_events")
                else:
                    assert result["bad_seq"] == await conn.fetchval(
                        "SELECT seq FROM audit_events WHERE action = 'model.request'"
                    )
            finally:
                await conn.close()


async def test_reordering_content_between_records_is_caught(pg_url):
    async with fresh_database(pg_url) as url:
        await some_events(url)
        # Swap two records' whole content but keep their seq and hashes in place.
        await tamper(
            url,
            """
            WITH a AS (SELECT * FROM audit_events WHERE seq = 2), b AS (SELECT * FROM audit_events WHERE seq = 3)
            UPDATE audit_events e SET action = CASE e.seq WHEN 2 THEN b.action ELSE a.action END,
                   after = CASE e.seq WHEN 2 THEN b.after ELSE a.after END
              FROM a, b WHERE e.seq IN (2, 3)""",
        )
        conn = await connect(url)
        try:
            result = await verify_chain(conn)
        finally:
            await conn.close()
        assert not result.ok and result.bad_seq == 2


async def test_the_owner_cannot_update_or_delete_through_the_table(pg_url):
    async with fresh_database(pg_url) as url:
        await some_events(url)
        conn = await connect(url)
        try:
            for sql in ("UPDATE audit_events SET action = 'x'", "DELETE FROM audit_events"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                    await conn.execute(sql)
        finally:
            await conn.close()


# --- database roles -------------------------------------------------------------------------------------


async def test_app_role_may_only_insert_and_reader_may_only_read(pg_url):
    async with fresh_database(pg_url) as url:
        await some_events(url)
        async with as_role(url, "agencyllm_app") as (app, app_url):
            await app.execute(
                "INSERT INTO audit_events (action, category, actor_subject, target_type)"
                " VALUES ('test.insert', 'admin', 'app', 'test')"
            )
            for sql in (
                "UPDATE audit_events SET action = 'x'",
                "DELETE FROM audit_events",
                "TRUNCATE audit_events",
                "SELECT action FROM audit_events",
                "UPDATE audit_chain_head SET seq = 0",
                "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await app.execute(sql)
            # The platform itself runs as this role: admin changes (ORM), admission, settlement.
            db = Database(app_url, pool_size=2)
            try:
                async with db.sessions() as session:
                    await store.create_tenant(session, ACTOR, name="app-role-tenant")
                ledger = Ledger(db)
                reservation = await ledger.reserve(request("app-role-tenant"))
                await ledger.settle(
                    reservation, prompt_tokens=1, completion_tokens=1, status="ok", ttft_ms=None, latency_ms=1.0
                )
            finally:
                await db.dispose()
        async with as_role(url, "agencyllm_audit_reader") as (reader, _):
            assert (
                await reader.fetchval(
                    "SELECT count(*) FROM audit_events WHERE action IN ('test.insert', 'model.request')"
                )
                == 3
            )
            result = await verify_chain(reader)
            assert result.ok, result.summary()
            for sql in (
                "INSERT INTO audit_events (action, category, actor_subject, target_type)"
                " VALUES ('x', 'admin', 'r', 'x')",
                "DELETE FROM audit_events",
                "SELECT * FROM usage_ledger",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await reader.execute(sql)


# --- concurrent writers ---------------------------------------------------------------------------------


async def test_concurrent_writers_keep_one_unbroken_chain(pg_url, make_tenant):
    async with fresh_database(pg_url) as url:
        db = Database(url, pool_size=8)
        try:
            names = [f"c{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
            async with db.sessions() as session:
                for name in names:
                    await store.create_tenant(session, ACTOR, name=name)
            ledgers = [Ledger(db), Ledger(db)]  # two "replicas" sharing the database

            async def traffic(ledger: Ledger, tenant: str) -> None:
                for _ in range(15):
                    r = await ledger.reserve(request(tenant))
                    await ledger.settle(
                        r, prompt_tokens=5, completion_tokens=2, status="ok", ttft_ms=1.0, latency_ms=1.0
                    )

            async def admin(tenant: str) -> None:
                for i in range(5):
                    async with db.sessions() as session:
                        await store.set_quota(session, ACTOR, tenant, {"tokens_per_day": 10**6 + i})

            await asyncio.gather(*(traffic(ledgers[i % 2], names[i % 3]) for i in range(6)), *(admin(n) for n in names))
        finally:
            await db.dispose()
        conn = await connect(url)
        try:
            result = await verify_chain(conn)
            assert result.ok, result.summary()
            assert await conn.fetchval("SELECT count(*) FROM audit_events WHERE action = 'model.request'") == 90
            assert result.records == await conn.fetchval("SELECT count(*) FROM audit_events")
        finally:
            await conn.close()


# --- purge keeps the chain verifiable ------------------------------------------------------------------


async def test_audit_purge_keeps_a_verifiable_chain_and_is_audited(pg_url, monkeypatch, capsys):
    async with fresh_database(pg_url) as url:
        conn = await connect(url)
        try:
            old = datetime.now(UTC) - timedelta(days=200)
            for i in range(5):
                await conn.execute(
                    "INSERT INTO audit_events (at, action, category, actor_subject, target_type)"
                    " VALUES ($1, 'old.event', 'admin', 'a', 'x')",
                    old + timedelta(minutes=i),
                )
            await some_events(url)  # recent records
            with pytest.raises(asyncpg.InvalidParameterValueError, match="at least 90 days"):
                await conn.fetchrow("SELECT * FROM audit_purge(now(), 30)")
            with pytest.raises(ValueError, match="at least 90"):
                Retention(Database(url), audit_days=30)
        finally:
            await conn.close()

        assert await run_cli(monkeypatch, url, "retention", "run", "--audit-days", "100") == 0
        assert "5 audit records" in capsys.readouterr().out
        conn = await connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM audit_events WHERE action = 'old.event'") == 0
            purge = (await audit_rows(conn, "action = 'audit.purge'"))[0]
            details = purge["details"]
            assert details["purged"] == 5 and details["through_seq"] == 5
            assert purge["category"] == "retention" and purge["actor_subject"] == "system"
            assert (await verify_chain(conn)).ok
        finally:
            await conn.close()
        assert await run_cli(monkeypatch, url, "audit", "verify") == 0


# --- export ----------------------------------------------------------------------------------------------


async def test_export_a_day_as_json_lines_to_a_file_and_to_syslog(pg_url, monkeypatch, capsys, tmp_path):
    async with fresh_database(pg_url) as url:
        await some_events(url)
        out = tmp_path / "audit.jsonl"
        assert (
            await run_cli(
                monkeypatch, url, "audit", "export", "--since", "24h", "--format", "jsonl", "--output", str(out)
            )
            == 0
        )
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["seq"] for r in lines] == list(range(1, len(lines) + 1))
        actions = [r["action"] for r in lines]
        assert "tenant.create" in actions and "model.request" in actions
        model = next(r for r in lines if r["action"] == "model.request")
        assert model["at"].endswith("Z") and model["details"]["completion_tokens"] == 3
        assert model["hash"] and model["prev_hash"]

        tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
        assert await run_cli(monkeypatch, url, "audit", "export", "--since", tomorrow) == 0
        assert capsys.readouterr().out == ""

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
            receiver.bind(("127.0.0.1", 0))
            receiver.settimeout(5)
            port = receiver.getsockname()[1]
            assert (
                await run_cli(
                    monkeypatch,
                    url,
                    "audit",
                    "export",
                    "--since",
                    "1h",
                    "--syslog",
                    f"127.0.0.1:{port}",
                    "--syslog-facility",
                    "local3",
                )
                == 0
            )
            datagrams = [receiver.recv(65536).decode() for _ in lines]
        assert capsys.readouterr().out == ""  # syslog only: nothing on stdout
        # <PRI> = facility local3 (19) * 8 + info (6)
        assert all(d.startswith("<158>agencyllm-audit: {") for d in datagrams)
        sent = [json.loads(d.split("agencyllm-audit: ", 1)[1].rstrip("\x00")) for d in datagrams]
        assert sent == lines


# --- flood ---------------------------------------------------------------------------------------------


async def test_failed_sign_in_flood_adds_a_bounded_number_of_rows(pg_url):
    async with fresh_database(pg_url) as url:  # alone: every row added is the flood's
        db = Database(url, pool_size=2)
        settings = Settings(database_url=url)
        app = create_app(cors_origins=[], max_request_bytes=65536)
        authenticator = Authenticator(settings, db, None)
        for name, value in {"settings": settings, "database": db, "authenticator": authenticator}.items():
            setattr(app.state, name, value)
        try:
            pool = await db.pool()
            before = await pool.fetchval("SELECT count(*) FROM audit_events")
            started = datetime.now(UTC)
            transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

                async def burst(n: int, headers: dict) -> None:
                    for _ in range(n):
                        response = await client.get("/admin/v1/tenants", headers=headers)
                        assert response.status_code == 401

                await asyncio.gather(burst(5000, {}), burst(5000, {"authorization": "Bearer not-a-jwt"}))
            await authenticator.aclose()
            minutes = int((datetime.now(UTC) - started).total_seconds() // 60) + 2
            rows = await audit_rows(pool, "action = 'auth.failure'")
            assert await pool.fetchval("SELECT count(*) FROM audit_events") - before == len(rows)
            assert len(rows) <= 2 * minutes  # two reasons, one record per minute each
            assert {r["source"] for r in rows} == {"192.0.2.7"}
            counts: dict[str, int] = {}
            for row in rows:
                details = row["details"]
                counts[details["reason"]] = counts.get(details["reason"], 0) + details["count"]
            assert counts == {"missing_credentials": 5000, "token_without_issuer": 5000}
            async with pool.acquire() as conn:
                assert (await verify_chain(conn)).ok
        finally:
            await db.dispose()


async def test_aggregation_caps_distinct_sources_per_minute(pg_db, monkeypatch):
    import agencyllm.quotas.audit as audit

    monkeypatch.setattr(audit, "MAX_BUCKETS_PER_MINUTE", 3)
    log = AuditLog(pg_db)
    for i in range(50):
        log.auth_failure("invalid_api_key", source=f"198.51.100.{i}")
    assert log.pending == 4  # three sources and the overflow bucket
    await log.aclose()


async def test_reaped_requests_are_audited_as_expired(pg_db, make_tenant):
    tenant = await make_tenant()
    now = datetime.now(UTC)
    ledger = Ledger(pg_db, lease_seconds=10, clock=lambda: now)
    req = request(tenant)
    await ledger.reserve(req)
    reaper = Ledger(pg_db, clock=lambda: now + timedelta(seconds=11))  # another replica, later
    assert await reaper.reap() >= 1
    pool = await pg_db.pool()
    [record] = await audit_rows(pool, "request_id = $1", req.request_id)
    assert record["action"] == "model.request" and record["outcome"] == "failure"
    assert record["source"] == "reaper" and record["details"]["status"] == "expired"
    assert record["details"]["completion_tokens"] == 10  # charged in full: max_tokens
    assert record["tenant"] == tenant and record["actor_subject"] == "staff-sub"


async def test_records_written_before_the_chain_are_chained_by_the_migration(pg_url):
    from alembic import command

    from agencyllm.quotas.db import _alembic_config, upgrade_schema

    name = f"pre_{uuid.uuid4().hex[:8]}"
    admin = await connect(pg_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        base, _, query = pg_url.partition("?")
        url = f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
        await asyncio.to_thread(command.upgrade, _alembic_config(url), "0001")
        conn = await connect(url)
        try:
            for i in range(3):
                await conn.execute(
                    "INSERT INTO audit_events (actor_subject, action, target_type, target_id, after)"
                    " VALUES ('old-admin', 'tenant.create', 'tenant', $1, '{\"status\": \"active\"}')",
                    f"t{i}",
                )
            await asyncio.to_thread(upgrade_schema, url)
            result = await verify_chain(conn)
            assert result.ok and result.records == 3 and result.last_seq == 3, result.summary()
            rows = await audit_rows(conn)
            assert [r["target_id"] for r in rows] == ["t0", "t1", "t2"]
            assert rows[0]["prev_hash"] == "0" * 64 and rows[1]["prev_hash"] == rows[0]["hash"]
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
