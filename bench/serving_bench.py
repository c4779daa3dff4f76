"""Serving benchmark: plain vLLM's OpenAI server, Ray Serve LLM's `build_openai_app` (its defaults)
and agencyllm (as `agencyllm up` runs it, auth and quotas on every request), same placeholder
model and engine settings, same machine, same run, rounds interleaved A B C C B A.

Run from the repository root:  python -m bench.serving_bench [--quick] [--out bench/results/serving.json]

Streamed chat completions (max_tokens 16, ignore_eos: every request makes exactly 16 tokens):
TTFT (first chunk carrying content), inter-token latency (gaps between content chunks as the
client reads them) and end-to-end latency per request, requests/s at concurrency 1, 8 and 32,
CPU per request by process group. Prints tables in the shape of the serving-path issue's target
table; writes all raw samples and the environment as JSON. Also probes where the added time goes
(bare HTTP hop, auth lookup, ledger round trips).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"
MODEL_ID = "placeholder"
MAX_TOKENS = 16
PROMPT = "Hello! How can I help you today? Write a short answer in plain language."
LEVELS = (1, 8, 32)
# Per concurrency: (rounds per target, requests per round).
FULL_PLAN = {1: (8, 24), 8: (8, 64), 32: (8, 128)}
QUICK_PLAN = {1: (2, 12), 8: (2, 32), 32: (2, 64)}
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
PLAIN, RAY_LLM, OURS = "plain-vllm", "ray-serve-llm", "agencyllm"
TARGETS = (PLAIN, RAY_LLM, OURS)
# Bounded waits: start-up on a loaded 2-core host, one clean stop per server.
START_TIMEOUT_S = 900
STOP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(q / 100 * len(ordered) + 0.4999))))
    return ordered[rank - 1]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- the three servers ----------------------------------------------------------------------


def start_plain_vllm(model_dir: Path, port: int, log_file: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        MODEL_ID,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "1024",
    ]
    env = {**os.environ, **VLLM_ENV}
    out = open(log_file, "wb")
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def start_ray_serve_llm(model_dir: Path, port: int, log_file: Path) -> subprocess.Popen:
    """Ray Serve LLM's `build_openai_app` in its own process and its own local Ray instance."""
    cmd = [
        sys.executable,
        "-m",
        "bench.ray_serve_llm",
        "--model",
        str(model_dir),
        "--model-id",
        MODEL_ID,
        "--port",
        str(port),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}  # Ray's defaults
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")])
    )
    out = open(log_file, "wb")
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_http(url: str, process: subprocess.Popen | None, timeout: float, headers: dict | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=5, headers=headers, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f}s")


def stop_process(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> float:
    """SIGTERM to the server's process group, SIGKILL after `timeout`; seconds until it was gone."""
    began = time.monotonic()
    if process.poll() is None:
        try:
            os.killpg(process.pid, 15)
            process.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            log(f"process {process.pid} did not stop in {timeout:.0f}s: killing its group")
            try:
                os.killpg(process.pid, 9)
                process.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
    return time.monotonic() - began


async def make_identity(url: str) -> str:
    from agencyllm.quotas import store
    from agencyllm.quotas.db import Database

    database = Database(url)
    try:
        async with database.sessions() as session:
            actor = store.SystemActor()
            await store.create_tenant(session, actor, name="bench", display_name="Serving benchmark")
            key = await store.create_key(
                session,
                actor,
                tenant_name="bench",
                kind="personal",
                name="serving-bench",
                owner_subject="bench-user",
                owner_username="bench",
            )
        return key.secret
    finally:
        await database.dispose()


# ---- CPU accounting ---------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(roots: set[int]) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))):
            parents[int(entry.name)] = st[0]
    found = set(roots)
    while True:
        more = {pid for pid, ppid in parents.items() if ppid in found and pid not in found}
        if not more:
            return found
        found |= more


def _holding(path_fragment: str) -> set[int]:
    """Processes with an open file under a path containing `path_fragment` (Ray session logs)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if path_fragment in os.readlink(fd):
                    pids.add(int(entry.name))
                    break
        except OSError:
            continue
    return pids


def _ray_label(prefix: str, cmd: str) -> str:
    return (
        f"{prefix}: ray proxy"
        if "ProxyActor" in cmd
        else f"{prefix}: ingress"
        if "Ingress" in cmd
        else f"{prefix}: llmserver"
        if "LLMServer" in cmd
        else f"{prefix}: engine core"
        if "EngineCore" in cmd or "VLLM::Worker" in cmd
        else f"{prefix}: ray system"
    )


# Process groups whose CPU is the serving front end (what the engine then lacks), per target.
FRONT_END = {
    PLAIN: ("plain: api server",),
    RAY_LLM: ("rayllm: ray proxy", "rayllm: ingress", "rayllm: llmserver"),
    OURS: ("ours: ray proxy", "ours: ingress", "ours: llmserver"),
}
GROUP_PREFIX = {PLAIN: "plain", RAY_LLM: "rayllm", OURS: "ours"}


def family(name: str) -> str:
    """`agencyllm-c0` (an experiment's variant of our stack) counts as agencyllm."""
    return OURS if name.startswith(OURS) else name


def variant_id(coalesce_ms: float) -> str:
    return f"{OURS}-c{coalesce_ms:g}"


class CpuGroups:
    """CPU seconds per labelled process group: plain vLLM (API server + engine core), Ray Serve
    LLM's and our stack's Ray proxy, ingress, LLMServer, engine core and Ray system processes,
    and our Postgres."""

    def __init__(self, plain_pid: int, ray_llm_pid: int, ray_session: str | None, pg_dir: str) -> None:
        self.labels: dict[int, str] = {}
        for pid in _descendants({plain_pid}):
            self.labels[pid] = "plain: api server" if pid == plain_pid else "plain: engine core"
        # Ray Serve LLM's driver started its own Ray instance: everything it runs descends from it.
        for pid in _descendants({ray_llm_pid}) - set(self.labels):
            self.labels[pid] = "rayllm: ray system" if pid == ray_llm_pid else _ray_label("rayllm", _cmdline(pid))
        ours = _descendants(_holding(ray_session)) if ray_session else set()
        for pid in ours - {os.getpid()} - set(self.labels):
            self.labels[pid] = _ray_label("ours", _cmdline(pid))
        postmaster = {pid for pid in self._all() if pg_dir in _cmdline(pid)}
        for pid in _descendants(postmaster):
            self.labels.setdefault(pid, "ours: postgres")
        self.labels[os.getpid()] = "client (load generator)"

    @staticmethod
    def _all() -> set[int]:
        return {int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()}

    def snapshot(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid, label in self.labels.items():
            if (st := _stat(pid)) is not None:
                totals[label] = totals.get(label, 0.0) + st[1]
        return totals


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


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
        "itl_ms": [round((b - a) * 1000, 3) for a, b in zip(arrivals, arrivals[1:])],
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


# ---- where the added time goes --------------------------------------------------------------


async def timed(fn, n: int) -> dict:
    values = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        values.append((time.perf_counter() - t0) * 1000)
    return {"n": n, "p50_ms": pct(values, 50), "p99_ms": pct(values, 99), "mean_ms": statistics.fmean(values)}


async def probe_hops(plain: Target, ours: Target, n: int) -> dict:
    """Bare HTTP round trips, interleaved: what a request pays before any model work."""
    out: dict = {}
    cases = {
        "plain GET /health": lambda: plain.client.get(f"{plain.base_url}/health"),
        "ours GET /healthz (HTTP entry -> ingress)": lambda: ours.client.get(f"{ours.base_url}/healthz"),
        "plain GET /v1/models": lambda: plain.client.get(f"{plain.base_url}/v1/models"),
        "ours GET /v1/models (+ API key lookup)": lambda: ours.client.get(f"{ours.base_url}/v1/models"),
    }
    values: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(n):
        for name, call in cases.items():
            t0 = time.perf_counter()
            response = await call()
            values[name].append((time.perf_counter() - t0) * 1000)
            assert response.status_code == 200, (name, response.status_code)
    for name, vals in values.items():
        out[name] = {"n": n, "p50_ms": pct(vals, 50), "p99_ms": pct(vals, 99)}
    return out


async def probe_database(url: str, api_key: str, n: int) -> dict:
    """The per-request database work of our ingress, timed from this process against the same
    Postgres (the ingress replica runs the same code): the API key lookup and the ledger's
    reserve/settle round trips."""
    from agencyllm.quotas.db import Database
    from agencyllm.quotas.ledger import Ledger, ReservationRequest
    from agencyllm.serving.gateway.identity import Authenticator
    from agencyllm.serving.settings import Settings

    header = f"Bearer {api_key}"
    out: dict = {}

    shipped = Database(url)
    auth = Authenticator(Settings(database_url=None), shipped, None)
    await auth.authenticate(header)
    out["auth: API key lookup (one statement on the ledger pool)"] = await timed(lambda: auth.authenticate(header), n)

    ledger = Ledger(shipped, lease_seconds=30)
    counter = iter(range(10**9))

    def request() -> ReservationRequest:
        return ReservationRequest(
            request_id=f"probe-{next(counter)}-{time.time_ns()}",
            tenant="bench",
            subject="bench-user",
            username="bench",
            key_id=None,
            model=MODEL_ID,
            endpoint="chat",
            prompt_tokens=30,
            max_tokens=MAX_TOKENS,
            context_length=1024,
        )

    reservations: list = []

    async def reserve() -> None:
        reservations.append(await ledger.reserve(request()))

    out["ledger: reserve (quota_reserve, 1 statement)"] = await timed(reserve, n)
    pending = iter(reservations)

    async def settle() -> None:
        await ledger.settle(
            next(pending), prompt_tokens=30, completion_tokens=MAX_TOKENS, status="ok", ttft_ms=1.0, latency_ms=2.0
        )

    out["ledger: settle (quota_settle, 1 statement)"] = await timed(settle, n)
    await shipped.dispose()
    return out


# ---- report ---------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+,.{digits}f}" if sign else f"{value:,.{digits}f}"


def deltas(summary: dict) -> dict:
    """Each target against plain vLLM: added latency (ms) and throughput ratio."""
    base = summary[PLAIN]
    out: dict = {}
    for name, v in summary.items():
        if name == PLAIN:
            continue

        def diff(key: str) -> float | None:
            return None if base[key] is None or v[key] is None else v[key] - base[key]

        def ratio(key: str) -> float | None:
            return v[key] / base[key] if base.get(key) and v.get(key) is not None else None

        out[name] = {
            "ttft_added_p50_ms": diff("ttft_p50_ms"),
            "ttft_added_p99_ms": diff("ttft_p99_ms"),
            "itl_added_p50_ms": diff("itl_p50_ms"),
            "itl_added_p99_ms": diff("itl_p99_ms"),
            "e2e_added_p50_ms": diff("e2e_p50_ms"),
            "e2e_added_p99_ms": diff("e2e_p99_ms"),
            "throughput_ratio": ratio("req_per_s"),
            "throughput_ratio_round_medians": ratio("req_per_s_round_median"),
            "throughput_ratio_best_rounds": ratio("req_per_s_round_best"),
        }
    return out


def front_end_cpu(groups: dict[str, float] | None, name: str) -> dict | None:
    """CPU ms per request of one target's own processes while its rounds ran."""
    if not groups:
        return None
    name = family(name)
    prefix = GROUP_PREFIX[name] + ": "
    own = {k[len(prefix) :]: v for k, v in groups.items() if k.startswith(prefix)}
    front = sum(groups.get(k, 0.0) for k in FRONT_END[name])
    return {
        "front_end_ms": front,
        "ray_system_ms": own.get("ray system", 0.0),
        "engine_core_ms": own.get("engine core", 0.0),
        "postgres_ms": own.get("postgres", 0.0),
        "groups": own,
    }


def tables(results: dict, runtime: dict) -> str:
    present = list(next(iter(results.values()))["summary"])
    names = [n for n in TARGETS if n in present] + [n for n in present if n not in TARGETS]
    lines = [
        "| c | target | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p50 | E2E p99 | req/s | failed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, entry in results.items():
        for name in names:
            v = entry["summary"][name]
            lines.append(
                f"| {level} | {name} | {fmt(v['ttft_p50_ms'])} | {fmt(v['ttft_p99_ms'])} | "
                f"{fmt(v['itl_p50_ms'], 2)} | {fmt(v['itl_p99_ms'], 2)} | {fmt(v['e2e_p50_ms'])} | "
                f"{fmt(v['e2e_p99_ms'])} | {fmt(v['req_per_s'], 2)} | {v['failed']}/{v['requests']} |"
            )
    lines += [
        "",
        "| c | target | TTFT added p50 | TTFT added p99 | ITL added p50 | ITL added p99 | E2E added p50 | "
        "throughput ×plain, all rounds | best rounds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, entry in results.items():
        for name, d in entry["delta"].items():
            lines.append(
                f"| {level} | {name} | {fmt(d['ttft_added_p50_ms'], sign=True)} | {fmt(d['ttft_added_p99_ms'], sign=True)} | "
                f"{fmt(d['itl_added_p50_ms'], 2, True)} | {fmt(d['itl_added_p99_ms'], 2, True)} | "
                f"{fmt(d['e2e_added_p50_ms'], sign=True)} | {fmt(d['throughput_ratio'], 2)} | "
                f"{fmt(d['throughput_ratio_best_rounds'], 2)} |"
            )
    lines += [
        "",
        "| c | target | front-end CPU ms/request | of which | Ray's own processes | engine core |",
        "|---:|---|---:|---|---:|---:|",
    ]
    for level, entry in results.items():
        for name in names:
            cpu = front_end_cpu((entry.get("cpu_ms_per_request") or {}).get(name), name)
            if cpu is None:
                continue
            parts = ", ".join(
                f"{k} {v:.1f}"
                for k, v in cpu["groups"].items()
                if GROUP_PREFIX[family(name)] + ": " + k in FRONT_END[family(name)]
            )
            extra = f" (+ postgres {cpu['postgres_ms']:.1f})" if cpu["postgres_ms"] else ""
            lines.append(
                f"| {level} | {name} | {cpu['front_end_ms']:.1f} | {parts} | "
                f"{cpu['ray_system_ms']:.1f}{extra} | {cpu['engine_core_ms']:.1f} |"
            )
    lines += ["", target_table(results, names, runtime)]
    return "\n".join(lines)


def target_table(results: dict, names: list[str], runtime: dict) -> str:
    """The serving-path issue's table, re-measured: one column per target."""
    heading = {PLAIN: "plain vLLM", RAY_LLM: "Ray Serve LLM `build_openai_app`", OURS: "agencyllm"}
    heading.update({n: n for n in names if n not in heading})
    goal = {
        "ttft": "≤ 3 ms / ≤ 15 ms",
        "tput": "≥ 0.97×, and above Ray Serve LLM",
        "cpu": "≤ 2× plain vLLM",
        "itl": "smooth (report)",
    }
    top = str(max(map(int, results)))
    first = str(min(map(int, results)))

    def cell(name: str, what: str) -> str:
        s1, s32 = results[first]["summary"][name], results[top]["summary"][name]
        d1 = results[first]["delta"].get(name)
        d32 = results[top]["delta"].get(name)
        if what == "ttft":
            return (
                "—"
                if d1 is None
                else f"{fmt(d1['ttft_added_p50_ms'], sign=True)} / {fmt(d1['ttft_added_p99_ms'], sign=True)}"
            )
        if what == "itl1":
            return f"{fmt(s1['itl_p50_ms'], 2)} / {fmt(s1['itl_p99_ms'], 1)}"
        if what == "itl32":
            return f"{fmt(s32['itl_p50_ms'], 2)} / {fmt(s32['itl_p99_ms'], 1)}"
        if what == "e2e":
            return f"{fmt(s1['e2e_p50_ms'])} / {fmt(s1['e2e_p99_ms'])}"
        if what == "rps":
            return " / ".join(fmt(results[c]["summary"][name]["req_per_s"], 1) for c in results)
        if what == "tput":
            if d32 is None:
                return "1.00×"
            return f"{fmt(d32['throughput_ratio'], 2)}× (best rounds {fmt(d32['throughput_ratio_best_rounds'], 2)}×)"
        if what == "cpu":
            cpu = front_end_cpu((results[top].get("cpu_ms_per_request") or {}).get(name), name)
            if cpu is None:
                return "-"
            text = f"{cpu['front_end_ms']:.1f} ms"
            if name != PLAIN:
                text += f" + {cpu['ray_system_ms']:.1f} in Ray's processes"
            return text
        if what == "start":
            return fmt(runtime.get("ready_s", {}).get(name), 0) + " s"
        raise ValueError(what)

    rows = [
        (f"TTFT added at c={first}, p50 / p99 (ms)", "ttft", goal["ttft"]),
        (f"inter-token latency at c={first}, p50 / p99 (ms)", "itl1", goal["itl"]),
        (f"inter-token latency at c={top}, p50 / p99 (ms)", "itl32", goal["itl"]),
        (f"E2E at c={first}, p50 / p99 (ms)", "e2e", ""),
        ("req/s at c=" + "/".join(results), "rps", ""),
        (f"throughput at c={top}", "tput", goal["tput"]),
        (f"front-end CPU per request at c={top}", "cpu", goal["cpu"]),
        ("process start to first answer, this run (all three starting together)", "start", ""),
    ]
    lines = [
        "| measure (same run) | " + " | ".join(heading[n] for n in names) + " | target |",
        "|---|" + "---|" * len(names) + "---|",
    ]
    for label, what, target in rows:
        lines.append(f"| {label} | " + " | ".join(cell(n, what) for n in names) + f" | {target} |")
    return "\n".join(lines)


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    try:
        load_avg = os.getloadavg()
    except OSError:
        load_avg = None
    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vllm": v("vllm-cpu") or v("vllm"),
        "ray": v("ray"),
        "torch": v("torch"),
        "httpx": v("httpx"),
        "loadavg_at_end": load_avg,
    }


def start_stack(stack) -> None:
    """LocalStack.start, retried once: on a loaded 2-core machine Ray's node can time out."""
    import ray

    for attempt in (1, 2):
        try:
            stack.start(timeout=900)
            return
        except Exception as exc:
            if attempt == 2:
                raise
            log(f"agencyllm failed to start ({type(exc).__name__}: {exc}); retrying once")
            stack.stop()
            ray.shutdown()
            time.sleep(10)


def patch_stream_batching(interval_ms: float) -> None:
    """Experiment without editing serving/: the LLMConfig is built in this driver and shipped to
    the replicas, so wrapping `llm_config` here changes the coalescing interval the LLMServer
    replica runs with (`stream_coalesce_ms` travels as `stream_batching_interval_ms`)."""
    from agencyllm.serving.rayserve import app, engines

    original = engines.llm_config

    def patched(spec, *, cpu):
        config = original(spec, cpu=cpu)
        return config.model_copy(
            update={"experimental_configs": {**config.experimental_configs, "stream_batching_interval_ms": interval_ms}}
        )

    engines.llm_config = patched
    app.llm_config = patched


# ---- main -----------------------------------------------------------------------------------


def proxy_port() -> int:
    """Where Ray Serve's proxy listens in the running stack (with direct ingress, not the user's port)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    return ray.get(controller.get_http_config.remote(), timeout=30).port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds per level instead of 8 (about 4-6 minutes with start-up)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--stream-batching-ms",
        type=float,
        default=None,
        help="experiment: override our models' stream_coalesce_ms (shipped: the ModelSpec default)",
    )
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="experiment: agencyllm without direct ingress (Ray Serve's proxy serves its port, "
        "as before); by default its ingress replica serves the port itself and the proxy's "
        "own port is measured beside it as target agencyllm-via-proxy",
    )
    parser.add_argument(
        "--engine-gateway",
        action="store_true",
        help="agencyllm with AGENCYLLM_ENGINE_GATEWAY=true: the engine's replica serves the "
        "gateway itself instead of a separate ingress replica calling it by handle",
    )
    parser.add_argument("--no-ray-serve-llm", action="store_true", help="leave out the Ray Serve LLM target")
    parser.add_argument(
        "--coalesce-variants",
        type=float,
        nargs="*",
        default=[],
        metavar="MS",
        help="experiment: our stack also serves the placeholder as `placeholder-cMS` with "
        "stream_coalesce_ms MS, measured as target `agencyllm-cMS` in the same run",
    )
    args = parser.parse_args(argv)
    if args.stream_batching_ms is not None:
        patch_stream_batching(args.stream_batching_ms)
    plan = QUICK_PLAN if args.quick else FULL_PLAN

    from pydantic import SecretStr

    from agencyllm.quotas.db import EmbeddedPostgres
    from agencyllm.serving.config import DEFAULT_STREAM_COALESCE_MS, ServingConfig, single_model_config
    from agencyllm.serving.ops.placeholder import write_placeholder_model
    from agencyllm.serving.ops.stack import LocalStack
    from agencyllm.serving.settings import Settings

    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    model_dir = write_placeholder_model(work / MODEL_ID)  # the directory name is the model id
    plain_port, ray_llm_port, ours_port = free_port(), free_port(), free_port()
    log(f"work dir {work}; starting plain vLLM on :{plain_port}")
    plain_proc = start_plain_vllm(model_dir, plain_port, work / "plain-vllm.log")
    ray_llm_proc = None
    if not args.no_ray_serve_llm:
        log(f"starting Ray Serve LLM build_openai_app on :{ray_llm_port} (its own Ray instance)")
        ray_llm_proc = start_ray_serve_llm(model_dir, ray_llm_port, work / "ray-serve-llm.log")
    postgres = EmbeddedPostgres(work / "pg")
    stack = None
    runtime: dict = {"ready_s": {}, "stop_s": {}}
    measured = None
    try:
        url = postgres.start()
        settings = Settings(
            data_dir=work / "data",
            host="127.0.0.1",
            port=ours_port,
            database_url=SecretStr(url),
            ingress_replicas=1,
            direct_ingress=not args.proxy,
            engine_gateway=args.engine_gateway,
        )
        serving = single_model_config(model_dir)
        if args.coalesce_variants:
            base = serving.models[0]
            serving = ServingConfig(
                models=[
                    base,
                    *(
                        base.model_copy(update={"id": f"{MODEL_ID}-c{ms:g}", "stream_coalesce_ms": ms})
                        for ms in args.coalesce_variants
                    ),
                ]
            )
        stack = LocalStack(settings, serving)
        log(
            f"starting agencyllm on :{ours_port} (Ray Serve, "
            + (
                "Ray's proxy)"
                if args.proxy
                else "direct ingress, "
                + ("engine-hosted gateway)" if args.engine_gateway else "separate ingress replica)")
            )
        )
        start_stack(stack)
        api_key = asyncio.run(make_identity(url))
        ours_url = stack.base_url
        via_proxy = None if args.proxy else f"http://127.0.0.1:{proxy_port()}"
        wait_http(f"http://127.0.0.1:{plain_port}/v1/models", plain_proc, START_TIMEOUT_S)
        if ray_llm_proc is not None:
            wait_http(f"http://127.0.0.1:{ray_llm_port}/v1/models", ray_llm_proc, START_TIMEOUT_S)

        async def run() -> dict:
            targets = [Target(PLAIN, f"http://127.0.0.1:{plain_port}", None)]
            if ray_llm_proc is not None:
                targets.append(Target(RAY_LLM, f"http://127.0.0.1:{ray_llm_port}", None))
            targets.append(Target(OURS, ours_url, api_key))
            for ms in args.coalesce_variants:
                targets.append(Target(variant_id(ms), ours_url, api_key, model=f"{MODEL_ID}-c{ms:g}"))
            if via_proxy is not None:  # direct ingress: the proxy still serves its own port, same stack
                targets.append(Target(f"{OURS}-via-proxy", via_proxy, api_key))
            try:
                for target in targets:
                    await wait_answering(target, START_TIMEOUT_S)
                    runtime["ready_s"][target.name] = round(time.monotonic() - began, 1)
                log("all answering after " + ", ".join(f"{k} {v:.0f}s" for k, v in runtime["ready_s"].items()))
                try:
                    import ray

                    session = Path(ray._private.worker._global_node.get_session_dir_path()).name
                    cpu = CpuGroups(plain_proc.pid, ray_llm_proc.pid if ray_llm_proc else -1, session, str(work / "pg"))
                except Exception as exc:  # accounting is a diagnostic: never fail the run on it
                    log(f"no CPU accounting: {type(exc).__name__}: {exc}")
                    cpu = None
                results = await load(targets, plan, cpu)
                log("probing hops and database round trips")
                probes: dict = {}
                try:
                    probes["http"] = await probe_hops(
                        targets[0], next(t for t in targets if t.name == OURS), 40 if args.quick else 200
                    )
                    probes["database"] = await probe_database(url, api_key, 40 if args.quick else 300)
                except Exception as exc:  # diagnostics after the load: report, do not lose the run
                    log(f"probe failed: {type(exc).__name__}: {exc}")
                return {"results": results, "probes": probes}
            finally:
                for target in targets:
                    await target.client.aclose()

        measured = asyncio.run(run())
    finally:
        # Every server stops, whatever failed; each stop is bounded.
        for name, proc in ((PLAIN, plain_proc), (RAY_LLM, ray_llm_proc)):
            if proc is not None:
                runtime["stop_s"][name] = round(stop_process(proc), 1)
        if stack is not None:
            stopped = time.monotonic()
            try:
                stack.stop()
            except Exception as exc:
                log(f"agencyllm stop failed: {type(exc).__name__}: {exc}")
            runtime["stop_s"][OURS] = round(time.monotonic() - stopped, 1)
        postgres.stop()
        log("stopped: " + ", ".join(f"{k} in {v:.1f}s" for k, v in runtime["stop_s"].items()))
    shutil.rmtree(work, ignore_errors=True)  # kept on failure: the servers' logs are in there

    for entry in measured["results"].values():
        entry["delta"] = deltas(entry["summary"])
    report = {
        "what": "plain vLLM OpenAI server vs Ray Serve LLM build_openai_app (defaults) vs agencyllm, placeholder "
        f"model, streamed chat, max_tokens {MAX_TOKENS} with ignore_eos, interleaved A B C C B A rounds",
        "command": " ".join(["python -m bench.serving_bench", *(argv if argv is not None else sys.argv[1:])]),
        "stream_coalesce_ms": DEFAULT_STREAM_COALESCE_MS
        if args.stream_batching_ms is None
        else args.stream_batching_ms,
        "direct_ingress": not args.proxy,
        "engine_gateway": args.engine_gateway and not args.proxy,
        "plan": {str(k): {"rounds_per_target": r, "requests_per_round": n} for k, (r, n) in plan.items()},
        "environment": environment(),
        "runtime_s": round(time.monotonic() - began, 1),
        **runtime,
        **measured,
    }
    print()
    print(tables(measured["results"], runtime))
    print()
    for group in measured["probes"].values():
        for name, v in group.items():
            print(f"  {name}: p50 {fmt(v['p50_ms'], 2)} ms, p99 {fmt(v['p99_ms'], 2)} ms")
    load_avg = report["environment"]["loadavg_at_end"]
    print(f"  load average at the end: {load_avg}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out} (runtime {report['runtime_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
