"""Quota ledger benchmark on the embedded Postgres: reserve+settle throughput (100 tenants; one
hot tenant) and the latency a request pays at a fixed 200 req/s.

Run from the repository root:  python -m bench.quota_bench [--seconds 10] [--concurrency 32]
Prints a table; writes bench/results/quota.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from itertools import count
from pathlib import Path

from agencyllm.quotas.db import Database, EmbeddedPostgres, upgrade_schema
from agencyllm.quotas.ledger import Ledger, ReservationRequest

RESULTS = Path(__file__).resolve().parent / "results" / "quota.json"
POLICY = dict(tokens_per_day=10**12, tokens_per_month=10**13, requests_per_minute=10**7,
              max_concurrent_requests=10**4, max_tokens_per_request=4096)
_ids = count()


async def create_tenants(db: Database, names: list[str]) -> None:
    pool = await db.pool()
    async with pool.acquire() as conn, conn.transaction():
        for name in names:
            tenant_id = await conn.fetchval(
                "INSERT INTO tenants (name, display_name) VALUES ($1, $1) RETURNING id", name)
            await conn.execute(
                "INSERT INTO quota_policies (tenant_id, tokens_per_day, tokens_per_month,"
                " requests_per_minute, max_concurrent_requests, max_tokens_per_request)"
                " VALUES ($1, $2, $3, $4, $5, $6)", tenant_id, *POLICY.values())


def make_request(tenant: str, user: int) -> ReservationRequest:
    return ReservationRequest(
        request_id=f"bench-{next(_ids)}-{uuid.uuid4().hex[:8]}", tenant=tenant,
        subject=f"user-{user}", username=None, key_id=None, model="bench-model",
        endpoint="chat", prompt_tokens=200, max_tokens=300, context_length=8192)


async def one(ledger: Ledger, tenant: str, user: int) -> tuple[float, float]:
    """reserve + settle; returns (reserve seconds, settle seconds)."""
    t0 = time.perf_counter()
    r = await ledger.reserve(make_request(tenant, user))
    t1 = time.perf_counter()
    await ledger.settle(r, prompt_tokens=200, completion_tokens=150, status="ok", ttft_ms=5.0,
                        latency_ms=50.0)
    return t1 - t0, time.perf_counter() - t1


async def throughput(ledger: Ledger, tenants: list[str], seconds: float,
                     concurrency: int) -> dict[str, float]:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.perf_counter() < deadline:
            await one(ledger, tenants[i % len(tenants)], i % 50)
            done += 1
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"requests": done, "seconds": round(elapsed, 2), "req_per_s": round(done / elapsed)}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


async def fixed_rate(ledger: Ledger, tenants: list[str], rate: float,
                     seconds: float) -> dict[str, float]:
    """Open loop: start a request every 1/rate s regardless of completions."""
    reserve_ms: list[float] = []
    total_ms: list[float] = []

    async def timed(i: int) -> None:
        r, s = await one(ledger, tenants[i % len(tenants)], i % 50)
        reserve_ms.append(r * 1000)
        total_ms.append((r + s) * 1000)

    tasks = []
    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        tasks.append(asyncio.ensure_future(timed(i)))
    await asyncio.gather(*tasks)
    return {
        "requests": n,
        "rate": rate,
        "reserve_p50_ms": round(percentile(reserve_ms, 50), 2),
        "reserve_p99_ms": round(percentile(reserve_ms, 99), 2),
        "reserve_settle_p50_ms": round(percentile(total_ms, 50), 2),
        "reserve_settle_p99_ms": round(percentile(total_ms, 99), 2),
    }


async def run(url: str, seconds: float, concurrency: int) -> dict:
    db = Database(url, pool_size=concurrency)
    ledger = Ledger(db)
    spread = [f"bench-{i:03d}-{uuid.uuid4().hex[:6]}" for i in range(100)]
    hot = [f"bench-hot-{uuid.uuid4().hex[:6]}"]
    await create_tenants(db, spread + hot)
    await throughput(ledger, spread, 2, concurrency)  # warm up: pool, prepared statements
    results = {
        "spread_100_tenants": await throughput(ledger, spread, seconds, concurrency),
        "hot_tenant": await throughput(ledger, hot, seconds, concurrency),
        "latency_at_200_rps": await fixed_rate(ledger, spread, 200, seconds),
    }
    await db.dispose()
    return results


def print_table(results: dict) -> None:
    spread, hot, lat = (results["spread_100_tenants"], results["hot_tenant"],
                        results["latency_at_200_rps"])
    rows = [
        ("reserve+settle throughput, 100 tenants", f"{spread['req_per_s']} req/s", ">= 2000 req/s"),
        ("reserve+settle throughput, 1 hot tenant", f"{hot['req_per_s']} req/s", ">= 500 req/s"),
        ("reserve latency p50 / p99 @ 200 req/s",
         f"{lat['reserve_p50_ms']} / {lat['reserve_p99_ms']} ms", ""),
        ("reserve+settle latency p50 / p99 @ 200 req/s",
         f"{lat['reserve_settle_p50_ms']} / {lat['reserve_settle_p99_ms']} ms", "p99 <= 5 ms"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | {'result':>16} | target")
    for name, value, target in rows:
        print(f"| {name.ljust(width)} | {value:>16} | {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--database-url", help="use this Postgres instead of an embedded one")
    args = parser.parse_args()

    data_dir = None if args.database_url else Path(tempfile.mkdtemp(prefix="agencyllm-bench-"))
    server = EmbeddedPostgres(data_dir) if data_dir else None
    try:
        url = args.database_url or server.start()
        upgrade_schema(url)
        results = asyncio.run(run(url, args.seconds, args.concurrency))
    finally:
        if server:
            server.stop()
    results["environment"] = {
        "python": platform.python_version(), "cpus": __import__("os").cpu_count(),
        "postgres": "embedded" if server else "external", "seconds": args.seconds,
        "concurrency": args.concurrency, "command": "python -m bench.quota_bench "
        + " ".join(sys.argv[1:]),
    }
    print_table(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")


if __name__ == "__main__":
    main()
