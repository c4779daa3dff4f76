"""Fair-sharing benchmark: does one tenant's flood starve another's interactive use?

Run from the repository root:  python -m bench.fair_share_bench [--quick] [--out bench/results/fair_share.json]

The placeholder model with the engine saturated as a busy GPU is (vLLM `max_num_seqs` 8), on three
targets in one run, one after the other on the same machine: plain vLLM's OpenAI server with
`fcfs` scheduling, plain vLLM with `priority` scheduling (the flood sends priority 10, the
interactive caller 0), and agencyllm (auth, quotas and the fair queue on every request).

Tenant B floods (24 concurrent chat requests of 200 tokens, ignore_eos) while tenant A sends
interactive streamed requests one at a time (16 tokens). Reported: A's TTFT quiet, under B's batch
flood and under B's interactive flood; B's token rate alone and while A is active; two tenants with
equal shares flooding together (12 workers each) and their token rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.fair_share_report import table, verdicts
from bench.servers import start_plain_vllm, start_stack, stop_process, wait_http
from bench.serving_common import environment, free_port, log, pct
from bench.serving_load import sse_lines

RESULTS = Path(__file__).resolve().parent / "results" / "fair_share.json"
MODEL_ID = "placeholder"
SLOTS = 8
FLOOD_CONCURRENCY = 24
FLOOD_TOKENS = 200
PROBE_TOKENS = 16
PROBE_PAUSE_S = 0.25
RAMP_S = 4.0
PROMPT = [{"role": "user", "content": "Summarise the attached memo for the director in plain words."}]


@dataclass
class Caller:
    """One tenant's way of calling a target: credentials, and what marks its requests as batch."""

    name: str
    headers: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class Target:
    name: str
    base_url: str
    callers: dict[str, Caller]


async def stream_probe(client, target: Target, caller: Caller) -> float | None:
    """One streamed interactive request; its TTFT in ms (first chunk with content)."""
    body = {
        "model": MODEL_ID,
        "messages": PROMPT,
        "max_tokens": PROBE_TOKENS,
        "ignore_eos": True,
        "stream": True,
        **caller.extra,
    }
    start = time.perf_counter()
    async with client.stream(
        "POST", f"{target.base_url}/v1/chat/completions", json=body, headers=caller.headers
    ) as response:
        if response.status_code != 200:
            await response.aread()
            return None
        ttft = None
        async for line in sse_lines(response):
            if ttft is None and line.startswith(b"data: {") and b'"content"' in line:
                ttft = (time.perf_counter() - start) * 1000
        return ttft


async def flood_worker(
    client, target: Target, caller: Caller, deadline: float, done: list[tuple[float, int]], errors: list[int]
) -> None:
    body = {"model": MODEL_ID, "messages": PROMPT, "max_tokens": FLOOD_TOKENS, "ignore_eos": True, **caller.extra}
    while time.perf_counter() < deadline:
        try:
            response = await client.post(f"{target.base_url}/v1/chat/completions", json=body, headers=caller.headers)
        except Exception:  # a benchmark counts its failures
            errors.append(0)
            continue
        if response.status_code == 200:
            done.append((time.perf_counter(), response.json()["usage"]["completion_tokens"]))
        else:
            errors.append(response.status_code)
            await asyncio.sleep(0.2)


async def scenario(target: Target, floods: dict[str, int], probe: str | None, seconds: float) -> dict:
    """Floods (caller -> concurrency) for `seconds`, with `probe` sending interactive requests
    after the ramp; token rates count requests completed after the ramp."""
    import httpx

    async with httpx.AsyncClient(
        trust_env=False,
        timeout=httpx.Timeout(600.0),
        limits=httpx.Limits(max_connections=128, max_keepalive_connections=128),
    ) as client:
        start = time.perf_counter()
        deadline = start + RAMP_S + seconds
        completions = {name: [] for name in floods}
        errors = {name: [] for name in floods}
        workers = [
            asyncio.ensure_future(
                flood_worker(client, target, target.callers[name], deadline, completions[name], errors[name])
            )
            for name, concurrency in floods.items()
            for _ in range(concurrency)
        ]
        ttfts: list[float] = []
        failed_probes = 0
        if floods:
            await asyncio.sleep(RAMP_S)
        measured_from = time.perf_counter()
        if probe is not None:
            while time.perf_counter() < deadline:
                ttft = await stream_probe(client, target, target.callers[probe])
                if ttft is None:
                    failed_probes += 1
                else:
                    ttfts.append(ttft)
                await asyncio.sleep(PROBE_PAUSE_S)
        else:
            await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        measured_s = time.perf_counter() - measured_from
        # Requests still running at the deadline finish (and are not counted) before the next scenario.
        await asyncio.gather(*workers, return_exceptions=True)
    rates = {
        name: sum(tokens for at, tokens in done if measured_from <= at <= deadline) / measured_s
        for name, done in completions.items()
    }
    return {
        "probe_ttft_ms": {
            "n": len(ttfts),
            "failed": failed_probes,
            "p50": pct(ttfts, 50),
            "p90": pct(ttfts, 90),
            "p99": pct(ttfts, 99),
            "samples": [round(t, 1) for t in ttfts],
        },
        "tokens_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "flood_errors": {name: len(e) for name, e in errors.items()},
        "measured_s": round(measured_s, 1),
    }


async def warm_up(target: Target) -> None:
    """First requests through cold servers (and each key's first lookup) are not what we measure."""
    import httpx

    async with httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(120.0)) as client:
        for caller in target.callers.values():
            for _ in range(3):
                await stream_probe(client, target, caller)


async def run_scenarios(target: Target, seconds: float) -> dict:
    await warm_up(target)
    log(f"{target.name}: quiet")
    results = {"quiet": await scenario(target, {}, "A", seconds)}
    log(f"{target.name}: B floods with batch work while A chats")
    results["batch_flood"] = await scenario(target, {"B_batch": FLOOD_CONCURRENCY}, "A", seconds)
    log(f"{target.name}: B floods with interactive work while A chats")
    results["interactive_flood"] = await scenario(target, {"B": FLOOD_CONCURRENCY}, "A", seconds)
    log(f"{target.name}: B's batch flood alone")
    results["b_alone"] = await scenario(target, {"B_batch": FLOOD_CONCURRENCY}, None, seconds)
    log(f"{target.name}: B and C, equal shares, both flooding")
    results["equal_floods"] = await scenario(
        target, {"B": FLOOD_CONCURRENCY // 2, "C": FLOOD_CONCURRENCY // 2}, None, seconds
    )
    return results


# ---- the targets ----------------------------------------------------------------------------


def plain_vllm(model_dir: Path, work: Path, policy: str, seconds: float) -> dict:
    port = free_port()
    options = ("--max-num-seqs", str(SLOTS), "--scheduling-policy", policy)
    process = start_plain_vllm(model_dir, port, work / f"vllm-{policy}.log", *options)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", process, 600)
        batch = {"priority": 10} if policy == "priority" else {}
        interactive = {"priority": 0} if policy == "priority" else {}
        callers = {
            "A": Caller("A", extra=interactive),
            "B": Caller("B", extra=interactive),
            "B_batch": Caller("B", extra=batch),
            "C": Caller("C", extra=interactive),
        }
        return asyncio.run(run_scenarios(Target(f"vllm-{policy}", f"http://127.0.0.1:{port}", callers), seconds))
    finally:
        stop_process(process)


async def tenants(database_url: str) -> dict[str, Caller]:
    """Tenants A, B and C (equal shares) with interactive keys; B also has a batch key."""
    from agencyllm.quotas import store
    from agencyllm.quotas.db import Database

    database = Database(database_url)
    keys: dict[str, Caller] = {}
    try:
        async with database.sessions() as session:
            actor = store.SystemActor()
            for tenant in ("a", "b", "c"):
                await store.create_tenant(
                    session, actor, name=f"bench-{tenant}", display_name=f"Tenant {tenant.upper()}"
                )
            for name, tenant, traffic_class in (
                ("A", "a", "interactive"),
                ("B", "b", "interactive"),
                ("B_batch", "b", "batch"),
                ("C", "c", "interactive"),
            ):
                created = await store.create_key(
                    session,
                    actor,
                    tenant_name=f"bench-{tenant}",
                    kind="service",
                    name=name,
                    traffic_class=traffic_class,
                )
                keys[name] = Caller(name, headers={"authorization": f"Bearer {created.secret}"})
        return keys
    finally:
        await database.dispose()


def agencyllm(model_dir: Path, work: Path, seconds: float, database_dir: Path | None = None) -> dict:
    from pydantic import SecretStr

    from agencyllm.quotas.db import EmbeddedPostgres
    from agencyllm.serving.config import FairShare, ModelSpec, ServingConfig
    from agencyllm.serving.ops.stack import LocalStack
    from agencyllm.serving.settings import Settings

    pg_dir = work / "pg" if database_dir is None else Path(tempfile.mkdtemp(prefix="fair-share-pg-", dir=database_dir))
    postgres = EmbeddedPostgres(pg_dir)
    stack = None
    try:
        url = postgres.start()
        # Direct ingress (one ingress replica serving the port), as the recorded runs had it.
        settings = Settings(data_dir=work / "data", port=free_port(), database_url=SecretStr(url), direct_ingress=True)
        spec = ModelSpec(
            id=MODEL_ID, path=model_dir, engine_args={"max_model_len": 1024}, fair_share=FairShare(slots=SLOTS)
        )
        stack = LocalStack(settings, ServingConfig(models=[spec]))
        start_stack(stack)
        callers = asyncio.run(tenants(url))
        return asyncio.run(run_scenarios(Target("agencyllm", stack.base_url, callers), seconds))
    finally:
        if stack is not None:
            stack.stop()
        postgres.stop()
        if database_dir is not None:
            shutil.rmtree(pg_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="15 s per scenario instead of 40 (about 8 minutes in all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only",
        choices=("vllm-fcfs", "vllm-priority", "agencyllm"),
        action="append",
        help="run only these targets (repeatable)",
    )
    parser.add_argument(
        "--database-dir",
        type=Path,
        help="experiment: keep agencyllm's embedded Postgres under this directory instead of the "
        "run's temporary directory, e.g. on a faster disk (or /dev/shm, to see what the "
        "disk's commit latency costs; never for real data)",
    )
    args = parser.parse_args(argv)
    seconds = 15.0 if args.quick else 40.0
    wanted = args.only or ["vllm-fcfs", "vllm-priority", "agencyllm"]

    from agencyllm.serving.ops.placeholder import write_placeholder_model

    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fair-share-bench-"))
    model_dir = write_placeholder_model(work / MODEL_ID)
    results: dict[str, dict] = {}
    for name in wanted:
        log(f"starting {name}")
        if name == "agencyllm":
            results[name] = agencyllm(model_dir, work, seconds, args.database_dir)
        else:
            results[name] = plain_vllm(model_dir, work, name.removeprefix("vllm-"), seconds)
    shutil.rmtree(work, ignore_errors=True)

    report = {
        "what": f"tenant B floods (c={FLOOD_CONCURRENCY}, {FLOOD_TOKENS} tokens) while tenant A chats "
        f"(streamed, {PROBE_TOKENS} tokens); placeholder model, max_num_seqs {SLOTS}",
        "command": " ".join(["python -m bench.fair_share_bench", *(argv if argv is not None else sys.argv[1:])]),
        "seconds_per_scenario": seconds,
        "environment": environment(),
        "runtime_s": round(time.monotonic() - began, 1),
        "results": results,
        "verdicts": {name: verdicts(r) for name, r in results.items()},
    }
    print()
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out} (runtime {report['runtime_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
