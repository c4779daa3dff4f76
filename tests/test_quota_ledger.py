"""Quota ledger semantics on a real Postgres: windows, limits, settlement, reaper (one file, a little
over 400 lines: each limit's tests beside the others, on one shared database)."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pg import set_user_policy

from agencyllm.quotas.db import Database
from agencyllm.quotas.ledger import AdmissionRefused, Ledger, Reservation, ReservationRequest
from agencyllm.serving.gateway.errors import OpenAIError, as_openai_error

_ids = itertools.count()


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def request(
    tenant: str,
    *,
    subject: str = "alice",
    prompt: int = 10,
    max_tokens: int | None = 90,
    model: str = "m",
    context: int = 4096,
    endpoint: str = "chat",
) -> ReservationRequest:
    return ReservationRequest(
        request_id=f"req-{next(_ids)}-{tenant}",
        tenant=tenant,
        subject=subject,
        username=subject,
        key_id=None,
        model=model,
        endpoint=endpoint,
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        context_length=context,
    )


async def settle(ledger: Ledger, r: Reservation, completion: int, status: str = "ok") -> None:
    prompt = r.reserved_tokens - r.max_tokens
    await ledger.settle(
        r, prompt_tokens=prompt, completion_tokens=completion, status=status, ttft_ms=1.0, latency_ms=2.0
    )


async def counters(db: Database, tenant: str, subject: str = "") -> dict:
    pool = await db.pool()
    row = await pool.fetchrow(
        "SELECT c.* FROM quota_counters c JOIN tenants t ON t.id = c.tenant_id WHERE t.name = $1 AND c.subject = $2",
        tenant,
        subject,
    )
    return dict(row) if row else {}


async def ledger_rows(db: Database, tenant: str) -> list[dict]:
    pool = await db.pool()
    rows = await pool.fetch(
        "SELECT u.* FROM usage_ledger u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1", tenant
    )
    return [dict(r) for r in rows]


def answer(err: AdmissionRefused) -> OpenAIError:
    """What the client is answered (the one mapping of domain errors to HTTP)."""
    return as_openai_error(err)


async def refused(ledger: Ledger, req: ReservationRequest) -> AdmissionRefused:
    with pytest.raises(AdmissionRefused) as caught:
        await ledger.reserve(req)
    return caught.value


async def test_day_window_in_local_time_zone(pg_db, make_tenant):
    tz = ZoneInfo("Asia/Tokyo")
    tenant = await make_tenant(tokens_per_day=1000)
    clock = Clock(datetime(2026, 3, 10, 23, 59, 0, tzinfo=tz))
    ledger = Ledger(pg_db, timezone="Asia/Tokyo", clock=clock)

    r = await ledger.reserve(request(tenant, prompt=100, max_tokens=700))
    assert r.headers["x-ratelimit-limit-tokens"] == "1000"
    assert r.headers["x-ratelimit-remaining-tokens"] == "200"
    assert r.headers["x-ratelimit-reset-tokens"] == "1m0s"
    await settle(ledger, r, completion=700)

    err = await refused(ledger, request(tenant, prompt=100, max_tokens=200))
    assert (answer(err).status, answer(err).type, err.reason) == (429, "insufficient_quota", "tokens_per_day")
    assert err.retry_after == pytest.approx(60)
    assert answer(err).headers["retry-after"] == "60"

    clock.now = datetime(2026, 3, 11, 0, 0, 1, tzinfo=tz)  # local midnight (15:00 UTC)
    r = await ledger.reserve(request(tenant, prompt=100, max_tokens=200))
    assert r.headers["x-ratelimit-remaining-tokens"] == "700"
    await settle(ledger, r, completion=50)
    c = await counters(pg_db, tenant)
    assert (c["day_charged"], c["day_reserved"], c["in_flight"]) == (150, 0, 0)


async def test_utc_midnight_is_not_a_boundary_in_another_zone(pg_db, make_tenant):
    tenant = await make_tenant(tokens_per_day=500)
    clock = Clock(datetime(2026, 6, 1, 23, 59, tzinfo=UTC))  # 19:59 in New York
    ledger = Ledger(pg_db, timezone="America/New_York", clock=clock)
    await settle(ledger, await ledger.reserve(request(tenant, prompt=100, max_tokens=300)), 300)
    clock.advance(minutes=2)  # 00:01 UTC, still 20:01 in New York
    err = await refused(ledger, request(tenant, prompt=100, max_tokens=200))
    assert err.retry_after == pytest.approx(4 * 3600 - 60)  # New York midnight is 04:00 UTC


async def test_calendar_month_not_thirty_days(pg_db, make_tenant):
    tz = ZoneInfo("Europe/Berlin")
    tenant = await make_tenant(tokens_per_month=1000)
    clock = Clock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=tz))
    ledger = Ledger(pg_db, timezone="Europe/Berlin", clock=clock)
    await settle(ledger, await ledger.reserve(request(tenant, prompt=100, max_tokens=800)), 800)

    clock.now = datetime(2026, 1, 31, 23, 59, 59, tzinfo=tz)  # 31 days later, same month
    err = await refused(ledger, request(tenant, prompt=100, max_tokens=200))
    assert (err.reason, err.retry_after) == ("tokens_per_month", pytest.approx(1))

    clock.now = datetime(2026, 2, 1, 0, 0, 0, tzinfo=tz)
    r = await ledger.reserve(request(tenant, prompt=100, max_tokens=200))
    assert r.headers["x-ratelimit-remaining-tokens"] == "700"
    await settle(ledger, r, 0)


async def test_window_boundary_between_reserve_and_settle_charges_reserving_window(pg_db, make_tenant):
    tenant = await make_tenant(tokens_per_day=1000)
    clock = Clock(datetime(2026, 5, 5, 23, 59, 50, tzinfo=UTC))
    ledger = Ledger(pg_db, clock=clock)
    r = await ledger.reserve(request(tenant, prompt=100, max_tokens=800))
    clock.advance(seconds=20)  # the next day
    other = await ledger.reserve(request(tenant, prompt=100, max_tokens=800))
    await settle(ledger, r, 800)
    c = await counters(pg_db, tenant)
    # Yesterday's request charged yesterday; today holds only today's open reservation.
    assert (c["day_charged"], c["day_reserved"], c["in_flight"]) == (0, 900, 1)
    rows = await ledger_rows(pg_db, tenant)
    assert [row["total_tokens"] for row in rows] == [900]
    await settle(ledger, other, 0)


async def test_requests_per_minute(pg_db, make_tenant):
    tenant = await make_tenant(requests_per_minute=3)
    clock = Clock(datetime(2026, 7, 1, 12, 0, 15, tzinfo=UTC))
    ledger = Ledger(pg_db, clock=clock)
    for expected_left in (2, 1, 0):
        r = await ledger.reserve(request(tenant))
        assert r.headers["x-ratelimit-remaining-requests"] == str(expected_left)
        assert r.headers["x-ratelimit-reset-requests"] == "45s"
        await settle(ledger, r, 5)
    err = await refused(ledger, request(tenant))
    assert (answer(err).status, answer(err).type, err.reason) == (429, "rate_limit_exceeded", "requests_per_minute")
    assert err.retry_after == pytest.approx(45)
    clock.advance(seconds=45)
    await settle(ledger, await ledger.reserve(request(tenant)), 5)


async def test_concurrency_slot_freed_at_settle(pg_db, make_tenant):
    tenant = await make_tenant(max_concurrent_requests=2)
    ledger = Ledger(pg_db)
    first = await ledger.reserve(request(tenant))
    second = await ledger.reserve(request(tenant))
    err = await refused(ledger, request(tenant))
    assert (answer(err).status, answer(err).type, err.reason, err.retry_after) == (
        429,
        "rate_limit_exceeded",
        "max_concurrent_requests",
        None,
    )
    # The client disconnects: the ingress settles what was generated so far, at once.
    await settle(ledger, first, 3, status="cancelled")
    third = await ledger.reserve(request(tenant))
    for r in (second, third):
        await settle(ledger, r, 1)
    assert (await counters(pg_db, tenant))["in_flight"] == 0


async def test_cancelled_settle_still_completes(pg_db, make_tenant):
    tenant = await make_tenant(max_concurrent_requests=1)
    ledger = Ledger(pg_db)
    r = await ledger.reserve(request(tenant))
    task = asyncio.ensure_future(settle(ledger, r, 1, status="cancelled"))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0.2)
    assert (await counters(pg_db, tenant))["in_flight"] == 0
    assert len(await ledger_rows(pg_db, tenant)) == 1


async def test_reaper_settles_dead_ingress(pg_url, pg_db, make_tenant):
    tenant = await make_tenant(tokens_per_day=10_000, max_concurrent_requests=5)
    clock = Clock(datetime(2026, 8, 1, 9, 0, tzinfo=UTC))
    dead_db = Database(pg_url, pool_size=2)
    dead = Ledger(dead_db, lease_seconds=30, clock=clock)
    orphan = await dead.reserve(request(tenant, prompt=100, max_tokens=400))
    kept = await dead.reserve(request(tenant, prompt=100, max_tokens=400))
    await dead_db.dispose()  # the ingress replica dies mid-request

    survivor = Ledger(pg_db, lease_seconds=30, clock=clock)
    clock.advance(seconds=20)
    await survivor.renew([kept])  # still owned by a live ingress (in the test: renewed)
    assert await survivor.reap() == 0
    clock.advance(seconds=15)  # orphan's lease (30 s) is over, kept's runs to 50 s
    assert await survivor.reap() == 1

    rows = await ledger_rows(pg_db, tenant)
    assert [(r["request_id"], r["status"], r["total_tokens"], r["completion_tokens"]) for r in rows] == [
        (orphan.request_id, "expired", 500, 400)
    ]
    assert rows[0]["latency_ms"] == pytest.approx(35_000)
    c = await counters(pg_db, tenant)
    assert (c["day_charged"], c["day_reserved"], c["in_flight"]) == (500, 500, 1)
    await settle(survivor, orphan, 1)  # the dead ingress' late settle is a no-op
    await settle(survivor, kept, 10)
    c = await counters(pg_db, tenant)
    assert (c["day_charged"], c["day_reserved"], c["in_flight"]) == (610, 0, 0)


async def test_suspended_tenant_forbidden(pg_db, make_tenant):
    tenant = await make_tenant(status="suspended")
    err = await refused(Ledger(pg_db), request(tenant))
    assert (answer(err).status, answer(err).type, err.reason) == (403, "permission_error", "tenant_suspended")


async def test_unknown_tenant(pg_db):
    err = await refused(Ledger(pg_db), request("no-such-tenant"))
    assert (answer(err).status, err.reason) == (404, "tenant_not_found")


async def test_allowed_models_with_user_override(pg_db, make_tenant):
    tenant = await make_tenant(allowed_models=["small"])
    ledger = Ledger(pg_db)
    err = await refused(ledger, request(tenant, model="large"))
    assert (answer(err).status, err.reason, err.param) == (403, "model_not_allowed", "model")
    await settle(ledger, await ledger.reserve(request(tenant, model="small")), 1)
    await set_user_policy(pg_db, tenant, "bob", allowed_models=["small", "large"])
    await settle(ledger, await ledger.reserve(request(tenant, subject="bob", model="large")), 1)


async def test_max_tokens_cap_mode(pg_db, make_tenant):
    tenant = await make_tenant(max_tokens_per_request=256)
    ledger = Ledger(pg_db)
    r = await ledger.reserve(request(tenant, prompt=10, max_tokens=1000))
    assert (r.max_tokens, r.reserved_tokens) == (256, 266)
    await settle(ledger, r, 256)
    r = await ledger.reserve(request(tenant, prompt=10, max_tokens=None, context=100))
    assert r.max_tokens == 90  # unset: the rest of the context, under the cap
    await settle(ledger, r, 0)


async def test_max_tokens_reject_mode(pg_db, make_tenant):
    tenant = await make_tenant(max_tokens_per_request=256, max_tokens_mode="reject")
    ledger = Ledger(pg_db)
    err = await refused(ledger, request(tenant, max_tokens=257))
    assert (answer(err).status, answer(err).type, err.param) == (400, "invalid_request_error", "max_tokens")
    r = await ledger.reserve(request(tenant, max_tokens=None))  # nothing asked: capped
    assert r.max_tokens == 256
    await settle(ledger, r, 0)
    assert len(await ledger_rows(pg_db, tenant)) == 1


async def test_context_length_exceeded(pg_db, make_tenant):
    tenant = await make_tenant()
    err = await refused(Ledger(pg_db), request(tenant, prompt=4096, context=4096))
    assert (answer(err).status, err.reason) == (400, "context_length_exceeded")


async def test_settle_is_idempotent(pg_db, make_tenant):
    tenant = await make_tenant(tokens_per_day=1000)
    ledger = Ledger(pg_db)
    r = await ledger.reserve(request(tenant, prompt=10, max_tokens=90))
    await settle(ledger, r, 40)
    await settle(ledger, r, 90)
    rows = await ledger_rows(pg_db, tenant)
    assert [(x["prompt_tokens"], x["completion_tokens"], x["status"]) for x in rows] == [(10, 40, "ok")]
    c = await counters(pg_db, tenant)
    assert (c["day_charged"], c["day_reserved"], c["in_flight"]) == (50, 0, 0)


async def test_user_override_and_tenant_sum(pg_db, make_tenant):
    tenant = await make_tenant(tokens_per_day=1000)
    await set_user_policy(pg_db, tenant, "alice", tokens_per_day=300)
    ledger = Ledger(pg_db)
    await settle(ledger, await ledger.reserve(request(tenant, prompt=100, max_tokens=200)), 200)
    err = await refused(ledger, request(tenant, prompt=1, max_tokens=1))
    assert (err.reason, "your user" in err.message) == ("tokens_per_day", True)
    # Bob has no override: only the tenant's budget (700 left) limits him.
    await settle(ledger, await ledger.reserve(request(tenant, subject="bob", prompt=100, max_tokens=500)), 500)
    err = await refused(ledger, request(tenant, subject="carol", prompt=100, max_tokens=50))
    assert (err.reason, f"tenant '{tenant}'" in err.message) == ("tokens_per_day", True)

    left = await ledger.remaining(tenant, "alice")
    assert left["tenant_limits"]["tokens_per_day"] | {"resets_at": None} == {
        "limit": 1000,
        "used": 900,
        "reserved": 0,
        "remaining": 100,
        "resets_at": None,
    }
    assert left["user_limits"]["tokens_per_day"]["remaining"] == 0
    assert left["user_limits"]["tokens_per_month"]["limit"] is None


async def test_reserve_cancelled_midway_releases(pg_db, make_tenant):
    tenant = await make_tenant(max_concurrent_requests=1)
    ledger = Ledger(pg_db)
    await settle(ledger, await ledger.reserve(request(tenant)), 1)  # creates the counter rows
    pool = await pg_db.pool()
    async with pool.acquire() as blocker:
        # Hold the tenant's counter row so the admission waits inside Postgres.
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            "SELECT 1 FROM quota_counters c JOIN tenants t ON t.id = c.tenant_id"
            " WHERE t.name = $1 AND c.subject = '' FOR UPDATE",
            tenant,
        )
        task = asyncio.ensure_future(ledger.reserve(request(tenant)))
        await asyncio.sleep(0.2)
        task.cancel()  # the client goes away mid-admission
        await tx.rollback()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(50):
        rows = await ledger_rows(pg_db, tenant)
        if len(rows) == 2:
            break
        await asyncio.sleep(0.05)
    assert sorted(r["status"] for r in rows) == ["cancelled", "ok"]
    assert (await counters(pg_db, tenant))["in_flight"] == 0


async def test_maintain_renews_own_leases_and_reaps_others(pg_url, pg_db, make_tenant):
    tenant = await make_tenant()
    clock = Clock(datetime(2026, 9, 1, 8, 0, tzinfo=UTC))
    live = Ledger(pg_db, lease_seconds=30, clock=clock)
    dead_db = Database(pg_url, pool_size=1)
    dead = Ledger(dead_db, lease_seconds=30, clock=clock)
    mine = await live.reserve(request(tenant))
    theirs = await dead.reserve(request(tenant))
    await dead_db.dispose()
    assert live.open_reservations == [mine]

    keeper = asyncio.ensure_future(live.maintain(interval=0.05))
    for _ in range(4):
        clock.advance(seconds=20)
        await asyncio.sleep(0.15)
    keeper.cancel()
    rows = await ledger_rows(pg_db, tenant)
    assert [(r["request_id"], r["status"]) for r in rows] == [(theirs.request_id, "expired")]
    await settle(live, mine, 5)
    assert live.open_reservations == []


async def test_renewal_skips_a_reservation_being_settled_instead_of_waiting(pg_db, make_tenant):
    """A settlement holds its reservation's row: the renewal passes over it (it is about to go)
    rather than queue behind it, so the two can never deadlock."""
    tenant = await make_tenant()
    clock = Clock(datetime(2026, 9, 1, 8, 0, tzinfo=UTC))
    ledger = Ledger(pg_db, lease_seconds=30, clock=clock)
    held, free = await ledger.reserve(request(tenant)), await ledger.reserve(request(tenant))
    pool = await pg_db.pool()
    leases = "SELECT id, lease_expires_at FROM quota_reservations WHERE id = ANY($1::bigint[])"
    before = dict(await pool.fetch(leases, [held.id, free.id]))
    clock.advance(seconds=20)
    async with pool.acquire() as settling, settling.transaction():
        await settling.execute("SELECT 1 FROM quota_reservations WHERE id = $1 FOR UPDATE", held.id)
        await asyncio.wait_for(ledger.renew([held, free]), 5)
    after = dict(await pool.fetch(leases, [held.id, free.id]))
    assert after[held.id] == before[held.id] and after[free.id] > before[free.id]
    await settle(ledger, held, 1)
    await settle(ledger, free, 1)


async def test_metrics_count_admissions_refusals_and_tokens(pg_db, make_tenant):
    from prometheus_client import REGISTRY

    tenant = await make_tenant(tokens_per_day=120)
    ledger = Ledger(pg_db)
    await settle(ledger, await ledger.reserve(request(tenant, prompt=10, max_tokens=90)), 30)
    await refused(ledger, request(tenant, prompt=10, max_tokens=90))
    labels = {"tenant": tenant, "model": "m"}
    assert REGISTRY.get_sample_value("agencyllm_requests_admitted_total", labels) == 1
    assert REGISTRY.get_sample_value("agencyllm_tokens_charged_total", labels) == 40
    assert REGISTRY.get_sample_value("agencyllm_requests_refused_total", labels | {"reason": "tokens_per_day"}) == 1
    assert REGISTRY.get_sample_value("agencyllm_reservation_seconds_count") >= 2


async def test_remaining_reports_effective_per_request_fields(pg_db, make_tenant):
    tenant = await make_tenant(
        max_tokens_per_request=100, max_tokens_mode="reject", allowed_models=["a"], requests_per_minute=10
    )
    await set_user_policy(pg_db, tenant, "dave", allowed_models=["a", "b"])
    ledger = Ledger(pg_db)
    await settle(ledger, await ledger.reserve(request(tenant, subject="dave", model="b", max_tokens=50)), 10)
    left = await ledger.remaining(tenant, "dave")
    assert (left["max_tokens_per_request"], left["max_tokens_mode"], left["allowed_models"]) == (
        100,
        "reject",
        ["a", "b"],
    )
    assert left["tenant_limits"]["requests_per_minute"]["remaining"] == 9
    tenant_only = await ledger.remaining(tenant)
    assert tenant_only["allowed_models"] == ["a"] and "user_limits" not in tenant_only
