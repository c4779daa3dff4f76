"""The guarantee under races: charged tokens never exceed the budget, across ingress replicas
(independent Database/Ledger instances, and separate OS processes), and the ledger holds exactly
one row per admitted request."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import uuid

from agencyllm.quotas.db import Database
from agencyllm.quotas.ledger import AdmissionRefused, Ledger, ReservationRequest

PROMPT, MAX_TOKENS = 100, 100
BUDGET = 50 * (PROMPT + MAX_TOKENS)  # room for ~50 reservations at once


async def one_request(ledger: Ledger, tenant: str, rng: random.Random) -> tuple[str, int]:
    """An ingress request: admit, 'generate', settle. Returns (outcome, tokens used)."""
    req = ReservationRequest(
        request_id=f"race-{uuid.uuid4()}",
        tenant=tenant,
        subject=f"user{rng.randrange(5)}",
        username=None,
        key_id=None,
        model="m",
        endpoint="chat",
        prompt_tokens=PROMPT,
        max_tokens=MAX_TOKENS,
        context_length=4096,
    )
    try:
        reservation = await ledger.reserve(req)
    except AdmissionRefused as refusal:
        assert refusal.reason in ("tokens_per_day", "tokens_per_month"), refusal.message
        return "refused", 0
    await asyncio.sleep(rng.random() * 0.05)
    completion = rng.randint(0, MAX_TOKENS)
    await ledger.settle(
        reservation, prompt_tokens=PROMPT, completion_tokens=completion, status="ok", ttft_ms=1.0, latency_ms=10.0
    )
    return "admitted", PROMPT + completion


async def tally(db: Database, tenant: str) -> dict:
    pool = await db.pool()
    return dict(
        await pool.fetchrow(
            "SELECT (SELECT count(*) FROM usage_ledger u WHERE u.tenant_id = t.id) AS rows,"
            " (SELECT coalesce(sum(total_tokens), 0) FROM usage_ledger u WHERE u.tenant_id = t.id)"
            "   AS ledger_tokens,"
            " c.day_charged, c.day_reserved, c.month_charged, c.in_flight"
            " FROM tenants t JOIN quota_counters c ON c.tenant_id = t.id AND c.subject = ''"
            " WHERE t.name = $1",
            tenant,
        )
    )


async def test_300_concurrent_through_two_replicas(pg_url, pg_db, make_tenant):
    tenant = await make_tenant(tokens_per_day=BUDGET, tokens_per_month=BUDGET * 10)
    replicas = [Database(pg_url, pool_size=8), Database(pg_url, pool_size=8)]
    ledgers = [Ledger(db) for db in replicas]
    rng = random.Random(4)
    try:
        results = await asyncio.gather(*(one_request(ledgers[i % 2], tenant, rng) for i in range(300)))
    finally:
        for db in replicas:
            await db.dispose()
    admitted = [tokens for outcome, tokens in results if outcome == "admitted"]
    t = await tally(pg_db, tenant)
    assert 50 <= len(admitted) < 300
    assert t["rows"] == len(admitted)
    assert t["ledger_tokens"] == t["day_charged"] == t["month_charged"] == sum(admitted)
    assert t["day_charged"] <= BUDGET
    assert (t["day_reserved"], t["in_flight"]) == (0, 0)


WORKER = """
import asyncio, json, random, sys
sys.path.insert(0, sys.argv[4])
from test_quota_concurrency import one_request
from agencyllm.quotas.db import Database
from agencyllm.quotas.ledger import Ledger

async def main(url, tenant, n):
    db = Database(url, pool_size=6)
    ledger = Ledger(db)
    rng = random.Random(tenant + str(n))
    results = await asyncio.gather(*(one_request(ledger, tenant, rng) for _ in range(n)))
    await db.dispose()
    print(json.dumps([tokens for outcome, tokens in results if outcome == "admitted"]))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_two_processes(pg_url, pg_db, make_tenant):
    tenant = await make_tenant(tokens_per_day=BUDGET)
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, pg_url, tenant, "150", tests_dir, stdout=asyncio.subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [await w.communicate() for w in workers]
    assert all(w.returncode == 0 for w in workers)
    admitted = [tokens for out, _ in outputs for tokens in json.loads(out)]
    t = await tally(pg_db, tenant)
    assert 50 <= t["rows"] == len(admitted) < 300
    assert t["ledger_tokens"] == t["day_charged"] == sum(admitted) <= BUDGET
    assert (t["day_reserved"], t["in_flight"]) == (0, 0)


DYING_INGRESS = """
import asyncio, sys
from agencyllm.quotas.db import Database
from agencyllm.quotas.ledger import Ledger, ReservationRequest

async def main(url, tenant):
    ledger = Ledger(Database(url, pool_size=1), lease_seconds=1)
    r = await ledger.reserve(ReservationRequest(
        request_id="doomed-" + tenant, tenant=tenant, subject="u", username=None, key_id=None,
        model="m", endpoint="chat", prompt_tokens=100, max_tokens=100, context_length=4096))
    print(r.id, flush=True)
    await asyncio.sleep(3600)  # mid-request, until killed

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_killed_ingress_process_is_reaped(pg_url, pg_db, make_tenant):
    tenant = await make_tenant(tokens_per_day=1000, max_concurrent_requests=1)
    ingress = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DYING_INGRESS, pg_url, tenant, stdout=asyncio.subprocess.PIPE
    )
    assert (await asyncio.wait_for(ingress.stdout.readline(), 60)).strip().isdigit()
    ingress.kill()  # SIGKILL: no settle, no cleanup
    await ingress.wait()

    survivor = Ledger(pg_db)
    reaped, deadline = 0, time.monotonic() + 30  # the 1 s lease runs out; a loaded host is slower
    while reaped == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        reaped += await survivor.reap()
    assert reaped == 1
    t = await tally(pg_db, tenant)
    assert (t["rows"], t["ledger_tokens"], t["day_charged"], t["day_reserved"], t["in_flight"]) == (1, 200, 200, 0, 0)
