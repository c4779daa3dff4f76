"""Serving benchmark: plain vLLM OpenAI server vs agencyllm (Ray Serve proxy -> our ingress ->
LLMServer), same placeholder model, same machine, same run, requests interleaved A/B/B/A.

Run from the repository root:  python -m bench.serving_bench [--quick] [--out bench/results/serving.json]

Streamed chat completions (max_tokens 16, ignore_eos: every request makes exactly 16 tokens),
TTFT (first chunk carrying content) and end-to-end latency per request, requests/s at
concurrency 1, 8 and 32. Prints a table; writes all raw samples and the environment as JSON.
Also probes where the added time goes (bare HTTP hop, auth lookup, ledger round trips).
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


# ---- the two servers ------------------------------------------------------------------------


def start_plain_vllm(model_dir: Path, port: int, log_file: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", MODEL_ID, "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
    ]
    env = {**os.environ, **VLLM_ENV}
    out = open(log_file, "wb")  # noqa: SIM115 - lives as long as the process
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


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, 15)
            process.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(process.pid, 9)
            except ProcessLookupError:
                pass


async def make_identity(url: str) -> str:
    from agencyllm.quotas import admin as store
    from agencyllm.quotas.db import Database

    database = Database(url)
    try:
        async with database.sessions() as session:
            actor = store.SystemActor()
            await store.create_tenant(session, actor, name="bench", display_name="Serving benchmark")
            key = await store.create_key(
                session, actor, tenant_name="bench", kind="personal", name="serving-bench",
                owner_subject="bench-user", owner_username="bench",
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


class CpuGroups:
    """CPU seconds per labelled process group: plain vLLM (API server + engine core), and our
    stack's Ray proxy, ingress, LLMServer, engine core, Ray system processes and Postgres."""

    def __init__(self, plain_pid: int, ray_session: str | None, pg_dir: str) -> None:
        self.labels: dict[int, str] = {}
        for pid in _descendants({plain_pid}):
            self.labels[pid] = "plain: api server" if pid == plain_pid else "plain: engine core"
        ours = _descendants(_holding(ray_session)) if ray_session else set()
        for pid in ours - {os.getpid()} - set(self.labels):
            cmd = _cmdline(pid)
            label = ("ours: ray proxy" if "ProxyActor" in cmd else
                     "ours: ingress" if "AgencyIngress" in cmd else
                     "ours: llmserver" if "LLMServer" in cmd else
                     "ours: engine core" if "EngineCore" in cmd else "ours: ray system")
            self.labels[pid] = label
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
    def __init__(self, name: str, base_url: str, api_key: str | None) -> None:
        import httpx

        self.name = name
        self.url = f"{base_url}/v1/chat/completions"
        self.base_url = base_url
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            http1=True, http2=False, trust_env=False, headers=headers,
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
    try:
        async with target.client.stream("POST", target.url, json=BODY) as response:
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
                        if ttft is None:
                            ttft = time.perf_counter()
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
        "completion_tokens": completion_tokens,
        "start": start,
    }


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
    e2e = [s["e2e_ms"] for s in good]
    done = [s["done_ms"] for s in good]
    wall = sum(r["wall_s"] for r in rounds)
    per_round = [len(r["samples"]) / r["wall_s"] for r in rounds]
    return {
        "requests": len(samples),
        "failed": len(samples) - len(good),
        "ttft_p50_ms": pct(ttft, 50), "ttft_p90_ms": pct(ttft, 90), "ttft_p99_ms": pct(ttft, 99),
        "e2e_p50_ms": pct(e2e, 50), "e2e_p90_ms": pct(e2e, 90), "e2e_p99_ms": pct(e2e, 99),
        "done_p50_ms": pct(done, 50), "done_p99_ms": pct(done, 99),
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
            order = targets if i % 2 == 0 else list(reversed(targets))  # A B B A A B ...
            for target in order:
                before = cpu.snapshot() if cpu else {}
                result = await run_round(target, concurrency, per_round)
                if cpu:
                    result["cpu_s"] = cpu_delta(before, cpu.snapshot())
                raw[target.name].append(result)
        results[str(concurrency)] = {
            "rounds": rounds, "requests_per_round": per_round,
            "summary": {name: summarize(r) for name, r in raw.items()},
            "cpu_ms_per_request": {name: cpu_per_request(rs) for name, rs in raw.items()},
            "raw": {name: [{"wall_s": r["wall_s"], "cpu_s": r.get("cpu_s"), "samples": [{k: v for k, v in s.items() if k != "start"} for s in r["samples"]]} for r in rs]
                    for name, rs in raw.items()},
        }
        s = results[str(concurrency)]["summary"]
        log(f"c={concurrency}: " + "  ".join(f"{n} ttft p50 {v['ttft_p50_ms']:.1f} ms, {v['req_per_s']:.2f} req/s, failed {v['failed']}" for n, v in s.items()))
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
        "ours GET /healthz (proxy -> ingress)": lambda: ours.client.get(f"{ours.base_url}/healthz"),
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
    from agencyllm.serving.identity import Authenticator
    from agencyllm.serving.settings import Settings

    header = f"Bearer {api_key}"
    out: dict = {}

    shipped = Database(url)
    auth = Authenticator(Settings(database_url=None), shipped, None)
    await auth.authenticate(header)
    out["auth: API key lookup (one statement on the ledger pool)"] = await timed(
        lambda: auth.authenticate(header), n)

    ledger = Ledger(shipped, lease_seconds=30)
    counter = iter(range(10**9))

    def request() -> ReservationRequest:
        return ReservationRequest(
            request_id=f"probe-{next(counter)}-{time.time_ns()}", tenant="bench", subject="bench-user",
            username="bench", key_id=None, model=MODEL_ID, endpoint="chat", prompt_tokens=30,
            max_tokens=MAX_TOKENS, context_length=1024)

    reservations: list = []

    async def reserve() -> None:
        reservations.append(await ledger.reserve(request()))

    out["ledger: reserve (quota_reserve, 1 statement)"] = await timed(reserve, n)
    pending = iter(reservations)

    async def settle() -> None:
        await ledger.settle(next(pending), prompt_tokens=30, completion_tokens=MAX_TOKENS, status="ok",
                            ttft_ms=1.0, latency_ms=2.0)

    out["ledger: settle (quota_settle, 1 statement)"] = await timed(settle, n)
    await shipped.dispose()
    return out


# ---- report ---------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict) -> str:
    lines = [
        "| c | target | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | E2E p99 ms | req/s | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level, entry in results.items():
        s = entry["summary"]
        for name in ("plain-vllm", "agencyllm"):
            v = s[name]
            lines.append(f"| {level} | {name} | {fmt(v['ttft_p50_ms'])} | {fmt(v['ttft_p99_ms'])} | "
                         f"{fmt(v['e2e_p50_ms'])} | {fmt(v['e2e_p99_ms'])} | {fmt(v['req_per_s'], 2)} | "
                         f"{v['failed']}/{v['requests']} |")
    lines += ["", "| c | TTFT added p50 ms | TTFT added p99 ms | E2E added p50 ms | E2E added p99 ms | throughput ours/plain | (best rounds) |",
              "|---|---|---|---|---|---|---|"]
    for level, entry in results.items():
        d = entry["delta"]
        lines.append(f"| {level} | {fmt(d['ttft_added_p50_ms'])} | {fmt(d['ttft_added_p99_ms'])} | "
                     f"{fmt(d['e2e_added_p50_ms'])} | {fmt(d['e2e_added_p99_ms'])} | {fmt(d['throughput_ratio'], 3)} | "
                     f"{fmt(d.get('throughput_ratio_best_rounds'), 3)} |")
    return "\n".join(lines)


def deltas(summary: dict) -> dict:
    a, b = summary["plain-vllm"], summary["agencyllm"]

    def diff(key: str) -> float | None:
        return None if a[key] is None or b[key] is None else b[key] - a[key]

    return {
        "ttft_added_p50_ms": diff("ttft_p50_ms"), "ttft_added_p99_ms": diff("ttft_p99_ms"),
        "e2e_added_p50_ms": diff("e2e_p50_ms"), "e2e_added_p99_ms": diff("e2e_p99_ms"),
        "throughput_ratio": b["req_per_s"] / a["req_per_s"] if a["req_per_s"] else None,
        "throughput_ratio_round_medians": (b["req_per_s_round_median"] / a["req_per_s_round_median"]
                                           if a["req_per_s_round_median"] else None),
        "throughput_ratio_best_rounds": (b["req_per_s_round_best"] / a["req_per_s_round_best"]
                                         if a.get("req_per_s_round_best") else None),
    }


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
        "vllm": v("vllm-cpu") or v("vllm"), "ray": v("ray"), "torch": v("torch"), "httpx": v("httpx"),
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
    the replicas, so wrapping `llm_config` here changes what the LLMServer replica runs with."""
    from agencyllm.serving import app, engines

    original = engines.llm_config

    def patched(spec, *, cpu):
        config = original(spec, cpu=cpu)
        return config.model_copy(update={"experimental_configs": {
            **config.experimental_configs, "stream_batching_interval_ms": interval_ms}})

    engines.llm_config = patched
    app.llm_config = patched


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds per level instead of 8 (about 2-4 minutes with start-up)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stream-batching-ms", type=float, default=None,
                        help="experiment: override our engines' stream_batching_interval_ms (shipped: 0)")
    args = parser.parse_args(argv)
    if args.stream_batching_ms is not None:
        patch_stream_batching(args.stream_batching_ms)
    plan = QUICK_PLAN if args.quick else FULL_PLAN

    from pydantic import SecretStr

    from agencyllm.quotas.db import EmbeddedPostgres
    from agencyllm.serving.config import single_model_config
    from agencyllm.serving.placeholder import write_placeholder_model
    from agencyllm.serving.settings import Settings
    from agencyllm.serving.stack import LocalStack

    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    model_dir = write_placeholder_model(work / MODEL_ID)  # the directory name is the model id
    plain_port, ours_port = free_port(), free_port()
    log(f"work dir {work}; starting plain vLLM on :{plain_port}")
    vllm_log = work / "plain-vllm.log"
    plain_proc = start_plain_vllm(model_dir, plain_port, vllm_log)
    postgres = EmbeddedPostgres(work / "pg")
    stack = None
    try:
        url = postgres.start()
        settings = Settings(data_dir=work / "data", host="127.0.0.1", port=ours_port,
                            database_url=SecretStr(url), ingress_replicas=1)
        stack = LocalStack(settings, single_model_config(model_dir))
        log(f"starting agencyllm on :{ours_port} (Ray Serve, 1 ingress replica)")
        start_stack(stack)
        api_key = asyncio.run(make_identity(url))
        wait_http(f"http://127.0.0.1:{plain_port}/v1/models", plain_proc, 600)
        log(f"both ready after {time.monotonic() - began:.0f}s")

        async def run() -> dict:
            plain = Target("plain-vllm", f"http://127.0.0.1:{plain_port}", None)
            ours = Target("agencyllm", stack.base_url, api_key)
            try:
                try:
                    import ray

                    session = Path(ray._private.worker._global_node.get_session_dir_path()).name
                    cpu = CpuGroups(plain_proc.pid, session, str(work / "pg"))
                except Exception as exc:  # accounting is a diagnostic: never fail the run on it
                    log(f"no CPU accounting: {type(exc).__name__}: {exc}")
                    cpu = None
                results = await load([plain, ours], plan, cpu)
                log("probing hops and database round trips")
                probes = {"http": await probe_hops(plain, ours, 40 if args.quick else 200),
                          "database": await probe_database(url, api_key, 40 if args.quick else 300)}
                return {"results": results, "probes": probes}
            finally:
                await plain.client.aclose()
                await ours.client.aclose()

        measured = asyncio.run(run())
    finally:
        stop_process(plain_proc)
        if stack is not None:
            stack.stop()
        postgres.stop()
    shutil.rmtree(work, ignore_errors=True)  # kept on failure: plain-vllm.log is in there

    for entry in measured["results"].values():
        entry["delta"] = deltas(entry["summary"])
    report = {
        "what": "plain vLLM OpenAI server vs agencyllm, placeholder model, streamed chat, "
                f"max_tokens {MAX_TOKENS} with ignore_eos, interleaved A/B/B/A rounds",
        "command": " ".join(["python -m bench.serving_bench", *(argv if argv is not None else sys.argv[1:])]),
        "stream_batching_interval_ms": 0 if args.stream_batching_ms is None else args.stream_batching_ms,
        "plan": {str(k): {"rounds_per_target": r, "requests_per_round": n} for k, (r, n) in plan.items()},
        "environment": environment(),
        "runtime_s": round(time.monotonic() - began, 1),
        **measured,
    }
    print()
    print(table(measured["results"]))
    print()
    for level, entry in measured["results"].items():
        for name, groups in (entry.get("cpu_ms_per_request") or {}).items():
            own = {k: v for k, v in groups.items() if k.startswith("ours" if name == "agencyllm" else "plain")}
            print(f"  c={level} {name}: CPU ms/request {sum(own.values()):.1f} = "
                  + ", ".join(f"{k.split(': ')[1]} {v:.1f}" for k, v in own.items()))
    print()
    for group in measured["probes"].values():
        for name, v in group.items():
            print(f"  {name}: p50 {fmt(v['p50_ms'], 2)} ms, p99 {fmt(v['p99_ms'], 2)} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out} (runtime {report['runtime_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
