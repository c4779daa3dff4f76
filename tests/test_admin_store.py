"""quotas/store/ on real Postgres: validation, audit trail, all-or-nothing writes, key lookup."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from agencyllm.quotas import store
from agencyllm.quotas.models import ApiKey, AuditEvent, QuotaPolicy, Tenant, UsageRecord

ACTOR = store.SystemActor(subject="admin-sub", username="admin")


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def audit_rows(session, target_id: str) -> list[AuditEvent]:
    query = select(AuditEvent).where(AuditEvent.target_id == target_id).order_by(AuditEvent.id)
    return list(await session.scalars(query))


async def test_tenant_lifecycle_is_audited(pg_db):
    name = unique()
    async with pg_db.sessions() as session:
        await store.create_tenant(session, ACTOR, name=name, display_name="Office", keycloak_group=f"/a/{name}")
        await store.update_tenant(session, ACTOR, name, {"display_name": "Office B"})
        await store.set_tenant_status(session, ACTOR, name, "suspended")
        await store.set_tenant_status(session, ACTOR, name, "suspended")  # no change, no event
        await store.set_tenant_status(session, ACTOR, name, "active")
        events = await audit_rows(session, name)
    assert [e.action for e in events] == ["tenant.create", "tenant.update", "tenant.suspend", "tenant.resume"]
    assert events[0].before is None and events[0].after["keycloak_group"] == f"/a/{name}"
    assert events[1].before["display_name"] == "Office" and events[1].after["display_name"] == "Office B"
    assert events[2].after["status"] == "suspended"
    assert all(e.actor_subject == "admin-sub" and e.at.tzinfo is not None for e in events)


async def test_duplicate_name_and_group_conflict(pg_db):
    name, group = unique(), unique("g")
    async with pg_db.sessions() as session:
        await store.create_tenant(session, ACTOR, name=name, keycloak_group=group)
        with pytest.raises(store.Conflict, match="already exists"):
            await store.create_tenant(session, ACTOR, name=name)
        with pytest.raises(store.Conflict, match="already mapped"):
            await store.create_tenant(session, ACTOR, name=unique(), keycloak_group=group)
        with pytest.raises(store.Invalid, match="Tenant name"):
            await store.create_tenant(session, ACTOR, name="Bad Name!")
        count = await session.scalar(select(func.count()).select_from(Tenant).where(Tenant.keycloak_group == group))
    assert count == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tokens_per_day": -1}, "tokens_per_day"),
        ({"requests_per_minute": 2**31}, "requests_per_minute"),
        ({"tokens_per_month": "10"}, "tokens_per_month"),
        ({"tokens_per_day": True}, "tokens_per_day"),
        ({"max_tokens_mode": "drop"}, "max_tokens_mode"),
        ({"allowed_models": "gpt"}, "allowed_models"),
        ({"allowed_models": ["ok", 3]}, "allowed_models"),
        ({"tokens_per_week": 5}, "Unknown quota field 'tokens_per_week'"),
    ],
)
def test_quota_validation(fields, message):
    with pytest.raises(store.Invalid, match=message):
        store.validate_quota(fields)


async def test_quota_set_replaces_policy_and_bad_input_writes_nothing(pg_db):
    name = unique()
    async with pg_db.sessions() as session:
        await store.create_tenant(session, ACTOR, name=name)
        assert (await store.get_quota(session, name))["tokens_per_day"] is None
        await store.set_quota(session, ACTOR, name, {"tokens_per_day": 1000, "allowed_models": ["m1", "m1"]})
        with pytest.raises(store.Invalid):
            await store.set_quota(session, ACTOR, name, {"tokens_per_day": -5})
        await store.set_quota(session, ACTOR, name, {"tokens_per_month": 9000}, subject="user-1")
        tenant_policy = await store.get_quota(session, name)
        user_policy = await store.get_quota(session, name, "user-1")
        events = await audit_rows(session, name)
        user_events = await audit_rows(session, f"{name}/user-1")
    assert tenant_policy["tokens_per_day"] == 1000 and tenant_policy["allowed_models"] == ["m1"]
    assert user_policy["tokens_per_month"] == 9000 and user_policy["tokens_per_day"] is None
    assert [e.action for e in events] == ["tenant.create", "quota.set"]
    assert events[1].before is None and events[1].after["tokens_per_day"] == 1000
    assert len(user_events) == 1


async def test_unknown_tenant_is_not_found(pg_db):
    async with pg_db.sessions() as session:
        with pytest.raises(store.NotFound, match="No tenant named"):
            await store.set_quota(session, ACTOR, unique(), {"tokens_per_day": 1})
        with pytest.raises(store.NotFound):
            await store.set_tenant_status(session, ACTOR, unique(), "suspended")


async def test_failure_after_first_write_rolls_everything_back(pg_db, monkeypatch):
    name = unique()

    def broken_audit(*args, **kwargs):
        raise RuntimeError("audit store down")

    monkeypatch.setattr(store.tenants, "record_change", broken_audit)
    async with pg_db.sessions() as session:
        with pytest.raises(RuntimeError):
            await store.create_tenant(session, ACTOR, name=name)
    monkeypatch.undo()
    async with pg_db.sessions() as session:
        assert await session.scalar(select(Tenant).where(Tenant.name == name)) is None


async def test_key_lifecycle(pg_db):
    name = unique()
    async with pg_db.sessions() as session:
        await store.create_tenant(session, ACTOR, name=name)
        created = await store.create_key(
            session,
            ACTOR,
            tenant_name=name,
            kind="personal",
            name="laptop",
            owner_subject="u-1",
            owner_username="jdoe",
        )
        stored = await session.get(ApiKey, created.key.id)
        assert created.secret.startswith("sk-agency-") and created.secret not in stored.key_hash

        found = await store.find_active_key(await pg_db.pool(), created.secret)
        await session.commit()
        assert found is not None and found.id == created.key.id
        first_use = (await session.get(ApiKey, created.key.id, populate_existing=True)).last_used_at
        assert first_use is not None
        await store.find_active_key(await pg_db.pool(), created.secret)  # within the minute: no new write
        await session.commit()
        assert (await session.get(ApiKey, created.key.id, populate_existing=True)).last_used_at == first_use

        assert await store.find_active_key(await pg_db.pool(), created.secret[:-2] + "xx") is None
        assert await store.find_active_key(await pg_db.pool(), "sk-agency-nope") is None
        await store.revoke_key(session, ACTOR, created.key.id)
        assert await store.find_active_key(await pg_db.pool(), created.secret) is None
        listed = await store.list_keys(session, tenant_name=name, include_revoked=True)
        events = await audit_rows(session, str(created.key.id))
    assert [k.id for k, _ in listed] == [created.key.id]
    assert [e.action for e in events] == ["key.create", "key.revoke"]
    assert "key_hash" not in events[0].after and events[1].after["revoked_at"] is not None


async def test_expired_key_is_refused(pg_db):
    name = unique()
    async with pg_db.sessions() as session:
        await store.create_tenant(session, ACTOR, name=name)
        created = await store.create_key(
            session,
            ACTOR,
            tenant_name=name,
            kind="service",
            name="ci",
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        )
        assert await store.find_active_key(await pg_db.pool(), created.secret) is not None
        await session.execute(
            update(ApiKey)
            .where(ApiKey.id == created.key.id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        await session.commit()
        assert await store.find_active_key(await pg_db.pool(), created.secret) is None
        with pytest.raises(store.Invalid, match="future"):
            await store.create_key(
                session,
                ACTOR,
                tenant_name=name,
                kind="service",
                name="old",
                expires_at=datetime.now(UTC) - timedelta(days=1),
            )


async def test_tenant_for_hints(pg_db):
    a, b = unique(), unique()
    async with pg_db.sessions() as session:
        await store.create_tenant(session, ACTOR, name=a, keycloak_group=f"/agencies/{a}-group")
        await store.create_tenant(session, ACTOR, name=b, keycloak_group=f"{b}-group")
        by_path = await store.tenant_for_hints(session, [f"/agencies/{a}-group", f"{a}-group"])
        by_name = await store.tenant_for_hints(session, [f"{b}-group"])
        first_wins = await store.tenant_for_hints(session, ["nobody", f"{b}-group", f"/agencies/{a}-group"])
        none = await store.tenant_for_hints(session, ["nobody", "/"])
        by_tenant_name = await store.tenant_for_hints(session, [a], match_names=True)
        not_by_name = await store.tenant_for_hints(session, [a])
    assert by_path.name == a and by_name.name == b and first_wins.name == b
    assert none is None and by_tenant_name.name == a and not_by_name is None


async def test_delete_tenant(pg_db):
    kept, gone = unique(), unique()
    async with pg_db.sessions() as session:
        for name in (kept, gone):
            await store.create_tenant(session, ACTOR, name=name)
            await store.set_quota(session, ACTOR, name, {"tokens_per_day": 5})
        tenant = await store.get_tenant(session, kept)
        now = datetime.now(UTC)
        session.add(
            UsageRecord(
                request_id=unique("req"),
                tenant_id=tenant.id,
                subject="u",
                model="m",
                endpoint="chat",
                prompt_tokens=1,
                completion_tokens=1,
                total_tokens=2,
                status="ok",
                latency_ms=1.0,
                started_at=now,
                finished_at=now,
            )
        )
        await session.commit()
        with pytest.raises(store.Conflict, match="usage history"):
            await store.delete_tenant(session, ACTOR, kept)
        gone_id = (await store.get_tenant(session, gone)).id
        await store.delete_tenant(session, ACTOR, gone)
        policies = await session.scalar(
            select(func.count()).select_from(QuotaPolicy).where(QuotaPolicy.tenant_id == gone_id)
        )
        events = await audit_rows(session, gone)
        assert await store.get_tenant(session, kept)
    assert policies == 0 and events[-1].action == "tenant.delete" and events[-1].after is None


async def test_usage_report_groups(pg_db):
    name = unique()
    async with pg_db.sessions() as session:
        tenant = await store.create_tenant(session, ACTOR, name=name)
        day1 = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
        rows = [
            ("u1", "alice", "m1", day1, 10, 5),
            ("u1", "alice", "m2", day1, 1, 1),
            ("u2", "bob", "m1", day1 + timedelta(hours=1), 4, 4),
        ]
        for subject, username, model, at, prompt, completion in rows:
            session.add(
                UsageRecord(
                    request_id=unique("req"),
                    tenant_id=tenant.id,
                    subject=subject,
                    username=username,
                    model=model,
                    endpoint="chat",
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    total_tokens=prompt + completion,
                    status="ok",
                    latency_ms=3.0,
                    started_at=at,
                    finished_at=at,
                )
            )
        await session.commit()
        by_day = await store.usage_report(session, tenant_name=name, group_by="day")
        by_day_ny = await store.usage_report(session, tenant_name=name, group_by="day", time_zone="America/New_York")
        by_user = await store.usage_report(session, tenant_name=name, group_by="user", model="m1")
        by_tenant = await store.usage_report(session, tenant_name=name, group_by="tenant", user="alice")
        since = await store.usage_report(session, tenant_name=name, since=day1 + timedelta(minutes=1))
    assert by_day == [
        {"day": "2026-03-01", "requests": 2, "prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17},
        {"day": "2026-03-02", "requests": 1, "prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8},
    ]
    assert [r["day"] for r in by_day_ny] == ["2026-03-01"] and by_day_ny[0]["requests"] == 3
    assert [(r["user"], r["username"], r["total_tokens"]) for r in by_user] == [("u1", "alice", 15), ("u2", "bob", 8)]
    assert by_tenant == [
        {"tenant": name, "requests": 2, "prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}
    ]
    assert since[0]["requests"] == 1
