"""Serving benchmark: plain vLLM's OpenAI server, Ray Serve LLM's `build_openai_app` (its defaults)
and agencyllm (as `agencyllm up` runs it, auth and quotas on every request), same placeholder
model and engine settings, same machine, same run, rounds interleaved A B C C B A.

Run from the repository root:  python -m bench.serving_bench [--quick] [--out bench/results/serving.json]
On a Ray cluster of separate hosts (root):  python -m bench.serving_bench --cluster (bench/cluster_bench.py)

Streamed chat completions (max_tokens 16, ignore_eos: every request makes exactly 16 tokens):
TTFT (first chunk carrying content), inter-token latency (gaps between content chunks as the
client reads them) and end-to-end latency per request, requests/s at concurrency 1, 8 and 32,
CPU per request by process group. Prints tables in the shape of the serving-path issue's target
table; writes the summaries and the environment as JSON (`--out`) and all raw samples beside it
under `raw/` (git-ignored: the repository keeps the summaries only). Also probes where the added
time goes (bare HTTP hop, auth lookup, ledger round trips).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.cpu_groups import CpuGroups
from bench.servers import make_identity, start_plain_vllm, start_ray_serve_llm, start_stack, stop_process, wait_http
from bench.serving_common import (
    FULL_PLAN,
    MAX_TOKENS,
    MODEL_ID,
    OURS,
    PLAIN,
    QUICK_PLAN,
    RAY_LLM,
    START_TIMEOUT_S,
    environment,
    free_port,
    log,
    pct,
    variant_id,
    write_results,
)
from bench.serving_load import Target, load, wait_answering
from bench.serving_report import deltas, fmt, tables

RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds per level instead of 8 (about 4-6 minutes with start-up)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"default {RESULTS.name}, with --cluster serving_cluster.json"
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="a Ray cluster of a head and an engine worker host (network namespaces, needs root): plain vLLM on "
        "the worker vs agencyllm up --address through its ingress replica and through Ray Serve's proxy",
    )
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
    command = " ".join(["python -m bench.serving_bench", *(argv if argv is not None else sys.argv[1:])])
    if args.cluster:
        from bench import cluster_bench

        return cluster_bench.run(plan, command, args.out or cluster_bench.RESULTS)
    args.out = args.out or RESULTS

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
        via_proxy = None if args.proxy else f"http://127.0.0.1:{stack.proxy_port}"
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

                    session = ray.get_runtime_context().get_session_name()
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
        "command": command,
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
    raw = write_results(report, args.out, {level: entry.pop("raw") for level, entry in report["results"].items()})
    log(f"wrote {args.out}, raw samples {raw} (runtime {report['runtime_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
