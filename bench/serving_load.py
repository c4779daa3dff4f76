"""The serving benchmark's load generator: streamed chat requests at a fixed concurrency, in rounds,
and their summary (TTFT, inter-token latency, end-to-end latency, requests/s, CPU per request)."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time

from bench.cpu_groups import CpuGroups, cpu_delta
from bench.serving_common import LEVELS, MAX_TOKENS, MODEL_ID, PROMPT, log, pct
from bench.serving_report import fmt

# ---- load generator -------------------------------------------------------------------------


class Target:
    def __init__(self, name: str, base_url: str, api_key: str | None, model: str = MODEL_ID) -> None:
        import httpx

        self.name = name
        self.body = {**BODY, "model": model}
        self.url = f"{base_url}/v1/chat/completions"
        self.base_url = base_url
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            http1=True,
            http2=False,
            trust_env=False,
            headers=headers,
            timeout=httpx.Timeout(120.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )


BODY = {
    "model": MODEL_ID,
    "messages": [{"role": "user", "content": PROMPT}],
    "max_tokens": MAX_TOKENS,
    "ignore_eos": True,
    "stream": True,
    # Both servers then report completion_tokens: we check every request made exactly 16.
    "stream_options": {"include_usage": True},
}


async def sse_lines(response):
    """Lines split on b"\\n" only: httpx's aiter_lines() also splits on U+2028, U+0085 and friends,
    which the placeholder's gibberish output can contain inside a JSON string."""
    buffer = b""
    async for data in response.aiter_bytes():
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if buffer:
        yield buffer


async def one_request(target: Target) -> dict:
    """One streamed chat completion: TTFT, time to [DONE], time to end of response (ms)."""
    start = time.perf_counter()
    ttft = done = None
    chunks = 0
    completion_tokens = None
    arrivals: list[float] = []
    try:
        async with target.client.stream("POST", target.url, json=target.body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"ok": False, "status": response.status_code, "error": response.text[:200]}
            async for line in sse_lines(response):
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:]
                if payload == b"[DONE]":
                    payload = "[DONE]"
                if payload == "[DONE]":
                    done = time.perf_counter()
                    continue
                data = json.loads(payload)
                if data.get("usage"):
                    completion_tokens = data["usage"].get("completion_tokens")
                for choice in data.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        arrivals.append(time.perf_counter())
                        if ttft is None:
                            ttft = arrivals[-1]
        end = time.perf_counter()
    except Exception as exc:  # counted, never fatal: a benchmark reports its failures
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:200]}
    ok = ttft is not None and done is not None and completion_tokens == MAX_TOKENS
    return {
        "ok": ok,
        "ttft_ms": (ttft - start) * 1000 if ttft else None,
        "done_ms": (done - start) * 1000 if done else None,
        "e2e_ms": (end - start) * 1000,
        "chunks": chunks,
        # Inter-token latency as the client sees it: gaps between consecutive content chunks
        # (one per token on every target; chunks read in one network read are ~0 ms apart).
        "itl_ms": [round((b - a) * 1000, 3) for a, b in itertools.pairwise(arrivals)],
        "completion_tokens": completion_tokens,
        "start": start,
    }


async def wait_answering(target: Target, timeout: float) -> None:
    """Until one streamed chat request succeeds (a route answering before its engine is up is not ready)."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        last = await one_request(target)
        if last["ok"]:
            return
        await asyncio.sleep(2)
    raise TimeoutError(f"{target.name} did not answer a chat request in {timeout:.0f}s: {last}")


async def run_round(target: Target, concurrency: int, requests: int) -> dict:
    """Closed loop: `concurrency` workers share `requests` requests."""
    remaining = requests
    samples: list[dict] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            samples.append(await one_request(target))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {"wall_s": wall, "samples": samples}


def summarize(rounds: list[dict]) -> dict:
    samples = [s for r in rounds for s in r["samples"]]
    good = [s for s in samples if s["ok"]]
    ttft = [s["ttft_ms"] for s in good]
    itl = [gap for s in good for gap in s["itl_ms"]]
    e2e = [s["e2e_ms"] for s in good]
    done = [s["done_ms"] for s in good]
    wall = sum(r["wall_s"] for r in rounds)
    per_round = [len(r["samples"]) / r["wall_s"] for r in rounds]
    return {
        "requests": len(samples),
        "failed": len(samples) - len(good),
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p90_ms": pct(ttft, 90),
        "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50),
        "itl_p90_ms": pct(itl, 90),
        "itl_p99_ms": pct(itl, 99),
        "itl_mean_ms": statistics.fmean(itl) if itl else None,
        "e2e_p50_ms": pct(e2e, 50),
        "e2e_p90_ms": pct(e2e, 90),
        "e2e_p99_ms": pct(e2e, 99),
        "done_p50_ms": pct(done, 50),
        "done_p99_ms": pct(done, 99),
        "req_per_s": len(samples) / wall if wall else None,
        "req_per_s_rounds": per_round,
        "req_per_s_round_median": statistics.median(per_round) if per_round else None,
        # The least disturbed round: closest to what the server does on a quiet machine.
        "req_per_s_round_best": max(per_round) if per_round else None,
    }


def cpu_per_request(rounds: list[dict]) -> dict[str, float] | None:
    """CPU milliseconds per request by process group while this target ran (its rounds only)."""
    if not rounds or "cpu_s" not in rounds[0]:
        return None
    requests = sum(len(r["samples"]) for r in rounds)
    totals: dict[str, float] = {}
    for r in rounds:
        for label, seconds in r["cpu_s"].items():
            totals[label] = totals.get(label, 0.0) + seconds
    return {label: round(1000 * seconds / requests, 2) for label, seconds in sorted(totals.items())}


async def load(targets: list[Target], plan: dict[int, tuple[int, int]], cpu: CpuGroups | None = None) -> dict:
    log("warm-up")
    for target in targets:
        for _ in range(4):
            await one_request(target)
        await run_round(target, 32, 64)
    results: dict = {}
    for concurrency in LEVELS:
        rounds, per_round = plan[concurrency]
        raw: dict[str, list[dict]] = {t.name: [] for t in targets}
        for i in range(rounds):
            order = targets if i % 2 == 0 else list(reversed(targets))  # A B C C B A A B C ...
            for target in order:
                before = cpu.snapshot() if cpu else {}
                result = await run_round(target, concurrency, per_round)
                if cpu:
                    result["cpu_s"] = cpu_delta(before, cpu.snapshot())
                raw[target.name].append(result)
        results[str(concurrency)] = {
            "rounds": rounds,
            "requests_per_round": per_round,
            "summary": {name: summarize(r) for name, r in raw.items()},
            "cpu_ms_per_request": {name: cpu_per_request(rs) for name, rs in raw.items()},
            "raw": {
                name: [
                    {
                        "wall_s": r["wall_s"],
                        "cpu_s": r.get("cpu_s"),
                        "samples": [{k: v for k, v in s.items() if k != "start"} for s in r["samples"]],
                    }
                    for r in rs
                ]
                for name, rs in raw.items()
            },
        }
        s = results[str(concurrency)]["summary"]
        log(
            f"c={concurrency}: "
            + "  ".join(
                f"{n} ttft p50 {fmt(v['ttft_p50_ms'])} ms, {fmt(v['req_per_s'], 2)} req/s, failed {v['failed']}"
                for n, v in s.items()
            )
        )
    return results
