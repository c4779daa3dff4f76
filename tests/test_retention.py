"""Data governance: no prompt or output is stored unless a tenant opts in; opted-in content, the
ledger and audit records are purged after their retention (injectable clock) and the purge is
audited; each tenant's engine requests carry its own stable, unguessable vLLM cache_salt."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from audit_helpers import audit_rows, fresh_database
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from agencyllm.quotas import store
from agencyllm.quotas.compliance.governance import ContentPolicy, set_content_retention, tenant_cache_salt
from agencyllm.quotas.compliance.retention import Retention
from agencyllm.quotas.db import Database
from agencyllm.serving.gateway.governance import Governance

ACTOR = store.SystemActor(subject="admin-sub", username="admin")


def later(days: float):
    moment = datetime.now(UTC) + timedelta(days=days)
    return lambda: moment


# --- cache salt ---------------------------------------------------------------------------------------


def test_cache_salt_is_stable_per_tenant_differs_across_tenants_and_needs_the_secret():
    secret = b"s" * 64
    a1, a2, b = (tenant_cache_salt(secret, t) for t in ("office-a", "office-a", "office-b"))
    assert a1 == a2 and a1 != b
    assert tenant_cache_salt(b"another install's secret", "office-a") != a1
    assert len(a1) == 64 and "office-a" not in a1


async def test_every_engine_request_carries_its_tenants_salt(pg_db):
    governance = await Governance.load(pg_db)
    again = await Governance.load(pg_db)  # another replica: same secret from the database
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    completion = CompletionRequest(model="m", prompt="hi")
    governance.salt(chat, "office-a")
    again.salt(completion, "office-a")
    assert chat.cache_salt == completion.cache_salt == governance.cache_salt("office-a")
    other = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    governance.salt(other, "office-b")
    assert other.cache_salt != chat.cache_salt


# --- retention job (database only) ---------------------------------------------------------------------


async def test_opted_in_content_is_purged_after_its_retention_and_the_purge_is_audited(pg_url):
    async with fresh_database(pg_url) as url:
        db = Database(url, pool_size=2)
        try:
            async with db.sessions() as session:
                for name in ("keeps", "keeps-not"):
                    await store.create_tenant(session, ACTOR, name=name)
                await set_content_retention(session, ACTOR, "keeps", 7)
                with pytest.raises(store.Invalid):
                    await set_content_retention(session, ACTOR, "keeps", 0)
            policy = ContentPolicy(db)
            await policy.keep("r-kept", "keeps", [{"role": "user", "content": "kept prompt"}], "kept output")
            await policy.keep("r-dropped", "keeps-not", [{"role": "user", "content": "secret"}], "x")
            pool = await db.pool()
            assert [r["request_id"] for r in await pool.fetch("SELECT request_id FROM request_content")] == ["r-kept"]

            assert (await Retention(db, clock=later(6)).run()).content == {}
            report = await Retention(db, clock=later(8)).run()
            assert report.content == {"keeps": 1}
            assert await pool.fetchval("SELECT count(*) FROM request_content") == 0
            purge = (await audit_rows(pool, "action = 'content.purge'"))[0]
            assert purge["tenant"] == "keeps" and purge["details"] == {"purged": 1}
            assert purge["category"] == "retention"
            opt_in = (await audit_rows(pool, "action = 'tenant.retention'"))[0]
            assert opt_in["before"] == {"content_retention_days": None}
            assert opt_in["after"] == {"content_retention_days": 7}

            # Opting out deletes what was kept at the next run.
            await policy.keep("r-later", "keeps", ["p"], None)
            async with db.sessions() as session:
                await set_content_retention(session, ACTOR, "keeps", None)
            assert (await Retention(db).run()).content == {"keeps": 1}
        finally:
            await db.dispose()


async def test_stored_responses_follow_the_tenant_and_files_their_own_expiry(pg_url):
    """Stored Responses API responses are the tenant's content: kept only under its opt-in,
    purged with the rest. Uploaded files go when their own `expires_at` passes."""

    from agencyllm.quotas.batches.files import FileStore
    from agencyllm.quotas.compliance.responses import ResponseStore

    async with fresh_database(pg_url) as url:
        db = Database(url, pool_size=2)
        try:
            async with db.sessions() as session:
                for name in ("keeps", "keeps-not"):
                    await store.create_tenant(session, ACTOR, name=name)
                await set_content_retention(session, ACTOR, "keeps", 7)
            responses = ResponseStore(db)
            assert await responses.save("resp_a", "keeps", "u", None, [{"type": "message"}], {"id": "resp_a"})
            assert not await responses.save("resp_b", "keeps-not", "u", None, [], {"id": "resp_b"})
            assert (await responses.get("resp_a", "keeps", "u")).response == {"id": "resp_a"}
            assert await responses.get("resp_a", "keeps", "someone-else") is None
            files = FileStore(db)
            soon = datetime.now(UTC) + timedelta(days=2)
            await files.save("keeps-not", "u", "batch", "a.jsonl", b"{}\n", expires_at=soon, tenant_limit=10**6)
            await files.save("keeps-not", "u", "user_data", "b.txt", b"kept", expires_at=None, tenant_limit=10**6)

            assert (await Retention(db, clock=later(1)).run()).content == {}
            assert (await Retention(db, clock=later(3)).run()).content == {"keeps-not": 1}
            assert (await Retention(db, clock=later(8)).run()).content == {"keeps": 1}
            pool = await db.pool()
            assert await pool.fetchval("SELECT count(*) FROM stored_responses") == 0
            assert [r["filename"] for r in await pool.fetch("SELECT filename FROM files")] == ["b.txt"]
        finally:
            await db.dispose()


async def test_ledger_rows_past_their_retention_are_purged_and_audited(pg_url):
    async with fresh_database(pg_url) as url:
        db = Database(url, pool_size=2)
        try:
            async with db.sessions() as session:
                tenant = await store.create_tenant(session, ACTOR, name="ledger-t")
            pool = await db.pool()
            now = datetime.now(UTC)
            for i, age in enumerate((40, 20, 1)):
                at = now - timedelta(days=age)
                await pool.execute(
                    "INSERT INTO usage_ledger (request_id, tenant_id, subject, model, endpoint, prompt_tokens,"
                    " completion_tokens, total_tokens, status, latency_ms, started_at, finished_at)"
                    " VALUES ($1, $2, 's', 'm', 'chat', 1, 1, 2, 'ok', 1, $3, $3)",
                    f"l{i}",
                    tenant.id,
                    at,
                )
            assert (await Retention(db).run()).ledger == 0  # default: the ledger is kept for ever
            report = await Retention(db, ledger_days=30).run()
            assert report.ledger == 1
            assert (await Retention(db, ledger_days=30, clock=later(15)).run()).ledger == 1
            assert [r["request_id"] for r in await pool.fetch("SELECT request_id FROM usage_ledger")] == ["l2"]
            purges = await audit_rows(pool, "action = 'ledger.purge'")
            assert [p["details"]["purged"] for p in purges] == [1, 1]
        finally:
            await db.dispose()


async def test_maintenance_runs_retention_at_most_once_per_interval(pg_db):
    runs = []

    class Counting(Retention):
        async def run(self):
            runs.append(1)
            return await super().run()

    clock_now = [datetime.now(UTC)]
    job = Counting(pg_db, clock=lambda: clock_now[0])
    await job.run_if_due()
    await job.run_if_due()
    clock_now[0] += timedelta(hours=2)
    await job.run_if_due()
    assert len(runs) == 2


# --- end to end: the real stack ---------------------------------------------------------------------------


def new_tenant(stack) -> tuple[str, str]:
    name = f"g-{uuid.uuid4().hex[:10]}"
    with stack.admin() as admin:
        assert admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
        response = admin.post(f"/admin/v1/tenants/{name}/keys", json={"name": "gov"})
        assert response.status_code == 201, response.text
        return name, response.json()["key"]


def chat(stack, key: str, content: str, *, stream: bool = False) -> str:
    with httpx.Client(base_url=stack.url, timeout=60, headers={"authorization": f"Bearer {key}"}) as client:
        body = {
            "model": "placeholder",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
            "stream": stream,
        }
        if stream:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                request_id = response.headers["x-agencyllm-request-id"]
                list(response.iter_lines())
        else:
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            request_id = response.headers["x-agencyllm-request-id"]
    return request_id


async def settled(pool, request_ids: list[str], *, table: str = "usage_ledger") -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = await pool.fetchval(f"SELECT count(*) FROM {table} WHERE request_id = ANY($1)", request_ids)
        if found == len(request_ids):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{request_ids} not in {table} after 30 s")


TEXT_COLUMNS_SQL = """
SELECT table_name, column_name FROM information_schema.columns
WHERE table_schema = 'public'
  AND (data_type IN ('text', 'character varying', 'character', 'jsonb', 'json')
       OR (data_type = 'ARRAY' AND udt_name IN ('_text', '_varchar')))
ORDER BY table_name, column_name
"""


@pytest.mark.stack
async def test_with_retention_off_no_prompt_text_is_anywhere_in_the_database(stack, pg_url):
    marker = f"zanzibar{uuid.uuid4().hex[:12]}"
    ids = [
        chat(stack, stack.api_key, f"Please summarise {marker} for me"),
        chat(stack, stack.api_key, f"And {marker} again, streamed", stream=True),
    ]
    db = Database(pg_url, pool_size=2)
    try:
        pool = await db.pool()
        await settled(pool, ids)
        columns = await pool.fetch(TEXT_COLUMNS_SQL)
        assert {("audit_events", "details"), ("request_content", "prompt"), ("feedback", "comment")} <= {
            (c["table_name"], c["column_name"]) for c in columns
        }
        hits = []
        for column in columns:
            table, name = column["table_name"], column["column_name"]
            count = await pool.fetchval(f'SELECT count(*) FROM "{table}" WHERE "{name}"::text LIKE $1', f"%{marker}%")
            if count:
                hits.append(f"{table}.{name}")
        assert hits == []
        # The request itself is audited, with who and where, but without its content.
        records = await audit_rows(pool, "request_id = ANY($1)", ids)
        assert len(records) == 2
        for record in records:
            assert record["action"] == "model.request" and record["tenant"] == stack.tenant
            assert record["actor_subject"] == "staff-1" and record["actor_username"] == "staff"
            assert record["actor_key_id"] and record["source"] == "127.0.0.1"
            assert record["details"]["status"] == "ok" and record["details"]["completion_tokens"] >= 1
    finally:
        await db.dispose()


@pytest.mark.stack
async def test_opted_in_tenant_keeps_content_until_its_retention_ends(stack, pg_url):
    name, key = new_tenant(stack)
    with stack.admin() as admin:
        response = admin.put(f"/admin/v1/tenants/{name}/retention", json={"content_retention_days": 30})
        assert response.status_code == 200, response.text
        assert admin.get(f"/admin/v1/tenants/{name}/retention").json()["content_retention_days"] == 30
        bad = admin.put(f"/admin/v1/tenants/{name}/retention", json={"content_retention_days": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"]
    with httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {key}"}) as staff:
        refused = staff.put(f"/admin/v1/tenants/{name}/retention", json={"content_retention_days": 1})
        assert refused.status_code == 403
    marker = f"records-law-{uuid.uuid4().hex[:8]}"
    ids = [chat(stack, key, f"Keep {marker}"), chat(stack, key, f"Stream {marker}", stream=True)]
    db = Database(pg_url, pool_size=2)
    try:
        pool = await db.pool()
        await settled(pool, ids, table="request_content")
        rows = await pool.fetch(
            "SELECT request_id, prompt::text AS prompt, output FROM request_content WHERE request_id = ANY($1)", ids
        )
        assert all(marker in r["prompt"] and r["output"] for r in rows)

        assert (await Retention(db, clock=later(29)).run()).content.get(name) is None
        report = await Retention(db, clock=later(31)).run()
        assert report.content[name] == 2
        assert await pool.fetchval("SELECT count(*) FROM request_content WHERE request_id = ANY($1)", ids) == 0
        purge = await audit_rows(pool, "action = 'content.purge' AND tenant = $1", name)
        assert purge and purge[-1]["details"]["purged"] == 2
        [opt_in] = await audit_rows(pool, "action = 'tenant.retention' AND tenant = $1", name)
        assert opt_in["after"] == {"content_retention_days": 30}
        assert opt_in["source"] == "127.0.0.1" and opt_in["actor_key_id"]  # the admin's key
    finally:
        await db.dispose()
