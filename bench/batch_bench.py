"""Batch benchmark: a 1,000-line chat batch beside an interactive user, on a saturated engine.

Run from the repository root:  python -m bench.batch_bench [--lines 1000] [--out bench/results/batch.json]

agencyllm with the placeholder model, its engine as busy as a shared GPU (8 running slots, as in
the fair-sharing benchmark), in one run:

1. quiet: tenant A sends interactive streamed requests (16 tokens) one at a time;
2. direct: tenant B sends the batch's lines straight to /v1/chat/completions, 24 at a time, with
   its batch key (the batch traffic class), while A keeps chatting;
3. batch API: B uploads the same lines as a file and runs them with /v1/batches (the ingress
   replica's worker runs 24 at a time), while A keeps chatting.

Reported: A's TTFT p50/p90/p99 in each phase against the fair-sharing benchmark's interactive
targets (p50 <= 500 ms, p90 <= 1 s), and B's lines per second through the Batch API against the
same lines sent directly.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.fair_share_bench import MODEL_ID, PROBE_PAUSE_S, SLOTS, Caller, Target, stream_probe, tenants
from bench.servers import start_stack
from bench.serving_common import environment, free_port, log, pct, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "batch.json"
CONCURRENCY = 24
LINE_TOKENS = 32
QUIET_S = 15.0
TARGETS = {"p50": 500.0, "p90": 1000.0}


def lines(count: int) -> list[dict]:
    return [
        {
            "custom_id": f"doc-{n}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL_ID,
                "messages": [{"role": "user", "content": f"Classify document {n} of the archive."}],
                "max_tokens": LINE_TOKENS,
                "ignore_eos": True,
            },
        }
        for n in range(count)
    ]


async def probe_while(client, target: Target, caller: Caller, running: asyncio.Future) -> dict:
    """A's interactive requests, one at a time, until `running` is done."""
    ttfts: list[float] = []
    failed = 0
    while not running.done():
        ttft = await stream_probe(client, target, caller)
        if ttft is None:
            failed += 1
        else:
            ttfts.append(ttft)
        await asyncio.sleep(PROBE_PAUSE_S)
    return {"n": len(ttfts), "failed": failed, "p50": pct(ttfts, 50), "p90": pct(ttfts, 90), "p99": pct(ttfts, 99)}


async def direct(client, target: Target, caller: Caller, work: list[dict]) -> dict:
    queue = list(work)
    errors = 0

    async def worker() -> None:
        nonlocal errors
        while queue:
            line = queue.pop()
            response = await client.post(
                f"{target.base_url}/v1/chat/completions", json=line["body"], headers=caller.headers
            )
            if response.status_code != 200:
                errors += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    seconds = time.perf_counter() - began
    done = len(work) - errors
    return {"seconds": round(seconds, 1), "lines_per_s": round(done / seconds, 2), "lines": done, "errors": errors}


async def through_batches(client, target: Target, caller: Caller, work: list[dict]) -> dict:
    content = "".join(json.dumps(line) + "\n" for line in work).encode()
    uploaded = await client.post(
        f"{target.base_url}/v1/files",
        files={"file": ("docs.jsonl", io.BytesIO(content))},
        data={"purpose": "batch"},
        headers=caller.headers,
    )
    assert uploaded.status_code == 200, uploaded.text
    began = time.perf_counter()
    created = await client.post(
        f"{target.base_url}/v1/batches",
        json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        headers=caller.headers,
    )
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    while True:
        batch = (await client.get(f"{target.base_url}/v1/batches/{batch_id}", headers=caller.headers)).json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            break
        await asyncio.sleep(0.5)
    seconds = time.perf_counter() - began
    counts = batch["request_counts"]
    return {
        "seconds": round(seconds, 1),
        "lines_per_s": round(counts["completed"] / seconds, 2),
        "status": batch["status"],
        "lines": counts["completed"],
        "failed": counts["failed"],
    }


async def run(target: Target, count: int) -> dict:
    import httpx

    work = lines(count)
    a, b = target.callers["A"], target.callers["B_batch"]
    async with httpx.AsyncClient(
        trust_env=False, timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=64)
    ) as client:
        for _ in range(3):  # warm-up
            await stream_probe(client, target, a)
        log("quiet: A chats alone")
        quiet = asyncio.ensure_future(asyncio.sleep(QUIET_S))
        results = {"quiet": {"probe_ttft_ms": await probe_while(client, target, a, quiet)}}
        log(f"direct: B sends {count} lines, {CONCURRENCY} at a time, while A chats")
        flood = asyncio.ensure_future(direct(client, target, b, work))
        probes = await probe_while(client, target, a, flood)
        results["direct"] = {"probe_ttft_ms": probes, "b": flood.result()}
        log(f"batch API: B runs the same {count} lines as a batch while A chats")
        batch = asyncio.ensure_future(through_batches(client, target, b, work))
        probes = await probe_while(client, target, a, batch)
        results["batch_api"] = {"probe_ttft_ms": probes, "b": batch.result()}
    return results


def report(results: dict) -> str:
    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value:,.0f}"

    rows = [
        "| phase | A TTFT p50 | A TTFT p90 | A TTFT p99 | A requests | B lines/s | B lines |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in ("quiet", "direct", "batch_api"):
        probe, b = results[phase]["probe_ttft_ms"], results[phase].get("b", {})
        rows.append(
            f"| {phase} | {ms(probe['p50'])} | {ms(probe['p90'])} | {ms(probe['p99'])} | {probe['n']} "
            f"| {b.get('lines_per_s', '—')} | {b.get('lines', '—')} |"
        )
    direct, batch = results["direct"]["b"]["lines_per_s"], results["batch_api"]["b"]["lines_per_s"]
    probe = results["batch_api"]["probe_ttft_ms"]
    rows += [
        "",
        f"Batch API lines/s ÷ direct: {batch / max(direct, 1e-9):.2f}",
        f"Interactive targets during the batch: p50 <= {TARGETS['p50']:.0f} ms "
        f"{'met' if (probe['p50'] or 1e9) <= TARGETS['p50'] else 'NOT met'}, p90 <= {TARGETS['p90']:.0f} ms "
        f"{'met' if (probe['p90'] or 1e9) <= TARGETS['p90'] else 'NOT met'}",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from pydantic import SecretStr

    from agencyllm.quotas.db import EmbeddedPostgres
    from agencyllm.serving.config import FairShare, ModelSpec, ServingConfig
    from agencyllm.serving.ops.placeholder import write_placeholder_model
    from agencyllm.serving.ops.stack import LocalStack
    from agencyllm.serving.settings import Settings

    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    model_dir = write_placeholder_model(work / MODEL_ID)
    postgres = EmbeddedPostgres(work / "pg")
    stack = None
    try:
        url = postgres.start()
        settings = Settings(
            data_dir=work / "data",
            port=free_port(),
            database_url=SecretStr(url),
            direct_ingress=True,
            batch_concurrency=CONCURRENCY,
        )
        spec = ModelSpec(
            id=MODEL_ID, path=model_dir, engine_args={"max_model_len": 1024}, fair_share=FairShare(slots=SLOTS)
        )
        stack = LocalStack(settings, ServingConfig(models=[spec]))
        log("starting agencyllm (8 engine slots, the batch worker running 24 lines at a time)")
        start_stack(stack)
        callers = asyncio.run(tenants(url))
        results = asyncio.run(run(Target("agencyllm", stack.base_url, callers), args.lines))
    finally:
        if stack is not None:
            stack.stop()
        postgres.stop()
    shutil.rmtree(work, ignore_errors=True)  # kept on failure: the servers' logs are in there
    out = {
        "what": f"{args.lines}-line chat batch (max_tokens {LINE_TOKENS}) beside an interactive user; "
        f"engine slots {SLOTS}; direct flood and batch worker {CONCURRENCY} at a time",
        "command": " ".join(["python -m bench.batch_bench", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(),
        "runtime_s": round(time.monotonic() - began, 1),
        "targets_ms": TARGETS,
        "results": results,
    }
    print()
    print(report(results))
    write_results(out, args.out, {})
    log(f"wrote {args.out} (runtime {out['runtime_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
