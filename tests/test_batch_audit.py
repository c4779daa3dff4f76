"""Files and batches leave audit records of who changed them, in the change's own transaction, and
never their content (quotas/batches with the real database)."""

from __future__ import annotations

import json

import pytest

from agencyllm.quotas.audit import Actor
from agencyllm.quotas.batches.files import FileStore, StorageFull
from agencyllm.quotas.batches.jobs import BatchStore

CALLER = Actor(subject="sub-ada", username="ada", client_id=None, key_id="5b7c1a8e-0000-4000-8000-000000000001")
SECRET_TEXT = "the minister's draft budget"


async def records(pg_db, target_id: str) -> list[dict]:
    rows = await (await pg_db.pool()).fetch(
        "SELECT action, category, outcome, actor_subject, actor_username, actor_key_id, tenant, target_type,"
        " details FROM audit_events WHERE target_id = $1 ORDER BY seq",
        target_id,
    )
    return [dict(r) | {"details": json.loads(r["details"]) if r["details"] else None} for r in rows]


async def test_upload_and_delete_are_recorded_without_the_content(pg_db, make_tenant):
    tenant = await make_tenant()
    files = FileStore(pg_db)
    content = json.dumps({"custom_id": "1", "body": SECRET_TEXT}).encode()
    stored = await files.save(
        tenant, "sub-ada", "batch", "memo.jsonl", content, expires_at=None, tenant_limit=10**6, audit=CALLER
    )
    assert await files.delete(stored.id, tenant, "sub-ada", audit=CALLER)
    assert not await files.delete(stored.id, tenant, "sub-ada", audit=CALLER)  # gone: nothing more to record
    found = await records(pg_db, stored.id)
    assert [(r["action"], r["category"], r["outcome"]) for r in found] == [
        ("file.upload", "admin", "success"),
        ("file.delete", "admin", "success"),
    ]
    assert all(
        (r["actor_subject"], r["actor_username"], r["actor_key_id"], r["tenant"], r["target_type"])
        == ("sub-ada", "ada", CALLER.key_id, tenant, "file")
        for r in found
    )
    assert found[0]["details"] == {"purpose": "batch", "bytes": len(content)}
    assert SECRET_TEXT not in json.dumps(found) and "memo.jsonl" not in json.dumps(found)


async def test_a_refused_upload_leaves_no_record(pg_db, make_tenant):
    tenant = await make_tenant()
    files = FileStore(pg_db)
    with pytest.raises(StorageFull):
        await files.save(
            tenant, "sub-ada", "batch", "big.jsonl", b"x" * 100, expires_at=None, tenant_limit=10, audit=CALLER
        )
    count = await (await pg_db.pool()).fetchval(
        "SELECT count(*) FROM audit_events WHERE tenant = $1 AND action LIKE 'file.%'", tenant
    )
    assert count == 0


async def test_batch_create_and_one_cancel_are_recorded(pg_db, make_tenant):
    tenant = await make_tenant()
    files = FileStore(pg_db)
    batches = BatchStore(pg_db, files)
    upload = await files.save(
        tenant, "sub-ada", "batch", "in.jsonl", b"{}\n", expires_at=None, tenant_limit=10**6, audit=CALLER
    )
    body = {"model": "placeholder", "messages": [{"role": "user", "content": SECRET_TEXT}]}
    batch = await batches.create(
        tenant=tenant,
        owner={"subject": "sub-ada", "username": "ada"},
        endpoint="/v1/chat/completions",
        input_file_id=upload.id,
        window_seconds=86400,
        metadata=None,
        lines=[("a", body), ("b", body)],
        errors=[],
        model="placeholder",
        audit=CALLER,
    )
    await batches.cancel(batch.id, tenant, "sub-ada", audit=CALLER)
    await batches.cancel(batch.id, tenant, "sub-ada", audit=CALLER)  # already cancelling: nothing changes
    await batches.cancel(batch.id, tenant, "someone-else", audit=Actor("someone-else"))  # not theirs
    found = await records(pg_db, batch.id)
    assert [r["action"] for r in found] == ["batch.create", "batch.cancel"]
    assert found[0]["details"] == {
        "endpoint": "/v1/chat/completions",
        "input_file_id": upload.id,
        "lines": 2,
        "status": "in_progress",
    }
    assert {r["actor_subject"] for r in found} == {"sub-ada"} and SECRET_TEXT not in json.dumps(found)
