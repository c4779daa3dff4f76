"""Quota ledger benchmark on the embedded Postgres: reserve+settle throughput (100 tenants; one
hot tenant) and the latency a request pays at a fixed 200 req/s.

Run from the repository root:  python -m bench.quota_bench [--seconds 10] [--loop asyncio]
Prints a table; writes bench/results/quota.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from itertools import count
from pathlib import Path

import psutil

from agencyllm.quotas.db import Database, EmbeddedPostgres, upgrade_schema
from agencyllm.quotas.ledger import Ledger, ReservationRequest

RESULTS = Path(__file__).resolve().parent / "results" / "quota.json"
POLICY = dict(
    tokens_per_day=10**12,
    tokens_per_month=10**13,
    requests_per_minute=10**7,
    max_concurrent_requests=10**4,
    max_tokens_per_request=4096,
)
_ids = count()


async def create_tenants(db: Database, names: list[str]) -> None:
    pool = await db.pool()
    async with pool.acquire() as conn, conn.transaction():
        for name in names:
            tenant_id = await conn.fetchval(
                "INSERT INTO tenants (name, display_name) VALUES ($1, $1) RETURNING id", name
            )
            await conn.execute(
                "INSERT INTO quota_policies (tenant_id, tokens_per_day, tokens_per_month,"
                " requests_per_minute, max_concurrent_requests, max_tokens_per_request)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                tenant_id,
                *POLICY.values(),
            )


def make_request(tenant: str, user: int) -> ReservationRequest:
    return ReservationRequest(
        request_id=f"bench-{next(_ids)}-{uuid.uuid4().hex[:8]}",
        tenant=tenant,
        subject=f"user-{user}",
        username=None,
        key_id=None,
        model="bench-model",
        endpoint="chat",
        prompt_tokens=200,
        max_tokens=300,
        context_length=8192,
    )


async def one(ledger: Ledger, tenant: str, user: int) -> tuple[float, float]:
    """reserve + settle; returns (reserve seconds, settle seconds)."""
    t0 = time.perf_counter()
    r = await ledger.reserve(make_request(tenant, user))
    t1 = time.perf_counter()
    await ledger.settle(r, prompt_tokens=200, completion_tokens=150, status="ok", ttft_ms=5.0, latency_ms=50.0)
    return t1 - t0, time.perf_counter() - t1


class CpuMeter:
    """CPU seconds used by this process and by the Postgres server (postmaster and children):
    a cost per request that does not depend on what else the host is running."""

    def __init__(self, postmaster_pid: int | None) -> None:
        self._postmaster = psutil.Process(postmaster_pid) if postmaster_pid else None

    def _postgres_seconds(self) -> float:
        if self._postmaster is None:
            return 0.0
        total = 0.0
        for proc in [self._postmaster, *self._postmaster.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def sample(self) -> tuple[float, float]:
        return time.process_time(), self._postgres_seconds()

    def per_request_us(self, before: tuple[float, float], requests: int) -> dict[str, int]:
        client, postgres = (after - start for after, start in zip(self.sample(), before, strict=True))
        return {"client_cpu_us": round(client / requests * 1e6), "postgres_cpu_us": round(postgres / requests * 1e6)}


async def throughput(
    ledger: Ledger, tenants: list[str], seconds: float, concurrency: int, cpu: CpuMeter
) -> dict[str, float]:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.perf_counter() < deadline:
            await one(ledger, tenants[i % len(tenants)], i % 50)
            done += 1
            i += concurrency

    cpu_before = cpu.sample()
    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "requests": done,
        "seconds": round(elapsed, 2),
        "req_per_s": round(done / elapsed),
        **cpu.per_request_us(cpu_before, done),
    }


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


async def fixed_rate(ledger: Ledger, tenants: list[str], rate: float, seconds: float) -> dict[str, float]:
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


async def floor(db: Database, rate: float, seconds: float) -> dict[str, float]:
    """What one durable commit costs on this host right now, at the same rate: the floor under
    any design that records each admission in Postgres before answering."""
    pool = await db.pool()
    await pool.execute("CREATE TABLE IF NOT EXISTS bench_floor_durable (x int)")
    latencies: list[float] = []

    async def commit() -> None:
        started = time.perf_counter()
        await pool.execute("INSERT INTO bench_floor_durable VALUES (1)")
        latencies.append((time.perf_counter() - started) * 1000)

    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        tasks.append(asyncio.ensure_future(commit()))
    await asyncio.gather(*tasks)
    return {
        "insert_commit_p50_ms": round(percentile(latencies, 50), 2),
        "insert_commit_p99_ms": round(percentile(latencies, 99), 2),
    }


async def run(url: str, seconds: float, concurrency: int, phases: list[str], cpu: CpuMeter) -> dict:
    db = Database(url, pool_size=concurrency)
    ledger = Ledger(db)
    spread = [f"bench-{i:03d}-{uuid.uuid4().hex[:6]}" for i in range(100)]
    hot = [f"bench-hot-{uuid.uuid4().hex[:6]}"]
    await create_tenants(db, spread + hot)
    await throughput(ledger, spread, 2, concurrency, cpu)  # warm up: pool, prepared statements
    results = {}
    if "throughput" in phases:
        results["spread_100_tenants"] = await throughput(ledger, spread, seconds, concurrency, cpu)
        results["hot_tenant"] = await throughput(ledger, hot, seconds, concurrency, cpu)
        # What autovacuum would do at some point anyway, so it does not land inside the next
        # phase's 10 seconds.
        pool = await db.pool()
        await pool.execute("VACUUM (ANALYZE) quota_counters, quota_reservations, usage_ledger")
    if "latency" in phases:
        # The host floor right before and right after, as the host's load may change meanwhile.
        before = await floor(db, 200, min(seconds, 5))
        results["latency_at_200_rps"] = await fixed_rate(ledger, spread, 200, seconds)
        after = await floor(db, 200, min(seconds, 5))
        results["floor_at_200_rps"] = {
            f"{k}_{when}": v for when, d in (("before", before), ("after", after)) for k, v in d.items()
        }
    await db.dispose()
    return results


def print_table(results: dict) -> None:
    rows = []
    if "spread_100_tenants" in results:
        rows += [
            (
                "reserve+settle throughput, 100 tenants",
                f"{results['spread_100_tenants']['req_per_s']} req/s",
                ">= 2000 req/s",
            ),
            ("reserve+settle throughput, 1 hot tenant", f"{results['hot_tenant']['req_per_s']} req/s", ">= 500 req/s"),
        ]
        spread = results["spread_100_tenants"]
        if spread["postgres_cpu_us"]:
            cores = os.cpu_count() or 1
            bound = round(cores * 1e6 / (spread["client_cpu_us"] + spread["postgres_cpu_us"]))
            rows.append(
                (
                    "CPU per reserve+settle (client + postgres)",
                    f"{spread['client_cpu_us']} + {spread['postgres_cpu_us']} us",
                    f"CPU bound: ~{bound} req/s on {cores} cores",
                )
            )
    if "latency_at_200_rps" in results:
        lat = results["latency_at_200_rps"]
        rows += [
            ("reserve latency p50 / p99 @ 200 req/s", f"{lat['reserve_p50_ms']} / {lat['reserve_p99_ms']} ms", ""),
            (
                "reserve+settle latency p50 / p99 @ 200 req/s",
                f"{lat['reserve_settle_p50_ms']} / {lat['reserve_settle_p99_ms']} ms",
                "p99 <= 5 ms",
            ),
        ]
        fl = results["floor_at_200_rps"]
        for when in ("before", "after"):
            rows.append(
                (
                    f"host floor {when}: 1-row INSERT+commit p50 / p99",
                    f"{fl[f'insert_commit_p50_ms_{when}']} / {fl[f'insert_commit_p99_ms_{when}']} ms",
                    "(reference)",
                )
            )
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | {'result':>18} | target")
    for name, value, target in rows:
        print(f"| {name.ljust(width)} | {value:>18} | {target}")


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])


def loop_factory(name: str):
    """uvloop (default when installed): what uvicorn, and so the Ray Serve ingress, runs on."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--database-url", help="use this Postgres instead of an embedded one")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--phases", nargs="+", choices=["throughput", "latency"], default=["throughput", "latency"])
    args = parser.parse_args()

    load_before = os.getloadavg()  # the machine may be shared: record how busy it was
    if args.loop == "uvloop" and loop_factory("uvloop") is None:
        args.loop = "asyncio"
    data_dir = None if args.database_url else Path(tempfile.mkdtemp(prefix="agencyllm-bench-"))
    server = EmbeddedPostgres(data_dir) if data_dir else None
    try:
        url = args.database_url or server.start()
        upgrade_schema(url)
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            cpu = CpuMeter(postmaster_pid(data_dir) if data_dir else None)
            results = runner.run(run(url, args.seconds, args.concurrency, args.phases, cpu))
    finally:
        if server:
            server.stop()
    run_info = {
        "python": platform.python_version(),
        "event_loop": args.loop,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "postgres": "embedded" if server else "external",
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "command": " ".join(["python -m bench.quota_bench", *sys.argv[1:]]),
    }
    print_table(results)
    for phase in results.values():  # each phase records the run (and host load) it came from
        phase["run"] = run_info
    # One entry per event loop, so runs with --loop uvloop and --loop asyncio sit side by side.
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    saved.setdefault(args.loop, {}).update(results)  # a --phases run replaces only its phases
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
