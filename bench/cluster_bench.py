"""Serving benchmark on a Ray cluster of separate hosts: `python -m bench.serving_bench --cluster`.

A head host and an engine worker host, each its own network and mount namespace on this machine
(bench/netns_hosts.py; needs root). Ray runs on each as the Ansible install starts it: the nodes'
environment has the ingress replica serve the API port (direct ingress), and a custom resource
stands in for the GPU, so the engine can only be placed on the worker. `agencyllm up --address`
on the head runs the platform there. In one run, rounds interleaved as in the one-machine
benchmark, the client on the head host measures:

- `plain-vllm`: vLLM's own OpenAI server on the worker host (same model and engine settings);
- `agencyllm`: the API port, served by the ingress replica on the head (one hop: ingress → engine);
- `agencyllm-via-proxy`: the same application through Ray Serve's proxy on the next port (two
  hops: proxy → ingress → engine), what a cluster install serves without direct ingress.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import yaml

from bench.netns_hosts import Hosts, can_make_hosts
from bench.servers import plain_vllm_command
from bench.serving_common import (
    MAX_TOKENS,
    MODEL_ID,
    OURS,
    PLAIN,
    START_TIMEOUT_S,
    VLLM_ENV,
    environment,
    log,
    write_results,
)
from bench.serving_load import Target, load, wait_answering
from bench.serving_report import deltas, tables

RESULTS = Path(__file__).resolve().parent / "results" / "serving_cluster.json"
API_PORT, GCS_PORT, PLAIN_PORT = 8000, 6379, 8100
ENGINE_RESOURCE = "engine_node"
VIA_PROXY = f"{OURS}-via-proxy"


def node_environment(token: Path) -> dict[str, str]:
    """What every node and `up` start with: the Ansible environment file's Ray variables (token
    auth, offline, direct ingress on the API port, the proxy's port)."""
    from agencyllm.serving.rayserve.ray_env import direct_ingress_env

    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AGENCYLLM_", "RAY_"))},
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        **direct_ingress_env(API_PORT),
        "AGENCYLLM_PROXY_PORT": str(API_PORT + 1),
    }


def ray_start(hosts: Hosts, name: str, temp: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
        f"--node-ip-address={hosts.address(name)}", "--num-gpus=0", f"--temp-dir={temp / name[0]}",
        "--disable-usage-stats", *extra,
    ]  # fmt: skip


def tenant_key(base_url: str, admin_key: str) -> str:
    with httpx.Client(base_url=base_url, timeout=30, headers={"authorization": f"Bearer {admin_key}"}) as admin:
        assert admin.post("/admin/v1/tenants", json={"name": "bench"}).status_code == 201
        response = admin.post("/admin/v1/tenants/bench/keys", json={"name": "serving-bench"})
        assert response.status_code == 201, response.text
        return response.json()["key"]


def until(check, timeout: float, what: str, process=None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(1)


def start(
    hosts: Hosts, work: Path, ray_temp: Path, env: dict, model_dir: Path, logs: dict[str, Path]
) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Ray on the head, then on the worker; `agencyllm up --address` on the head; plain vLLM on
    the worker. Returns `up` and plain vLLM (both still starting)."""
    head = hosts.address("head")
    head_ray = ray_start(hosts, "head", ray_temp, "--head", f"--port={GCS_PORT}", "--num-cpus=2")
    hosts.spawn("head", [*head_ray, "--include-dashboard=false"], log=logs["head"], env=env)
    until(lambda: "Ray runtime started" in logs["head"].read_text(errors="replace"), 180, "the Ray head")
    resources = f"--resources={json.dumps({ENGINE_RESOURCE: 1})}"
    worker_ray = ray_start(hosts, "worker", ray_temp, f"--address={head}:{GCS_PORT}", "--num-cpus=4", resources)
    hosts.spawn("worker", worker_ray, log=logs["worker"], env=env)
    up_command = [
        sys.executable, "-m", "agencyllm.serving.cli.main", "up", "--address", f"{head}:{GCS_PORT}",
        "--host", "0.0.0.0", "--port", str(API_PORT), "--data-dir", str(work / "data"),
        "--config", str(work / "models.yaml"),
    ]  # fmt: skip
    up = hosts.spawn("head", up_command, log=logs["up"], env=env)
    plain_command = plain_vllm_command(model_dir, PLAIN_PORT, host="0.0.0.0")
    plain = hosts.spawn("worker", plain_command, log=logs["plain-vllm"], env={**env, **VLLM_ENV})
    log("Ray on both hosts; agencyllm up --address on the head; plain vLLM on the worker")
    return up, plain


def run(plan: dict, command: str, out: Path) -> int:
    from agencyllm.serving.ops.placeholder import write_placeholder_model

    reason = can_make_hosts()
    if reason is not None:
        print(f"--cluster needs several hosts on this machine: {reason}", file=sys.stderr)
        return 2
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="serving-cluster-"))
    # Short: Ray's socket paths under its temp dir must stay under the kernel's 107 bytes.
    ray_temp = Path(tempfile.mkdtemp(prefix=f"al-{os.getpid()}-"))
    token = work / "ray-auth-token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    token.chmod(0o600)
    env = node_environment(token)
    model_dir = write_placeholder_model(work / MODEL_ID)
    models = {"models": [{"id": MODEL_ID, "path": str(model_dir), "accelerator": {"resources": {ENGINE_RESOURCE: 1}}}]}
    (work / "models.yaml").write_text(yaml.safe_dump(models))
    runtime: dict = {"ready_s": {}, "stop_s": {}}
    measured = None
    ok = False
    with Hosts(["head", "worker"]) as hosts:
        head, worker = hosts.address("head"), hosts.address("worker")
        logs = {name: work / f"{name}.log" for name in ("head", "worker", "up", "plain-vllm")}
        up = None
        try:
            log(f"hosts: head {head}, worker {worker}; work dir {work}")
            up, plain = start(hosts, work, ray_temp, env, model_dir, logs)
            until(lambda: "Ready:" in logs["up"].read_text(errors="replace"), START_TIMEOUT_S, "agencyllm up", up)
            runtime["ready_s"][OURS] = round(time.monotonic() - began, 1)
            with hosts.entered("head"):  # the client is on the head host; its sockets open there
                key = tenant_key(f"http://{head}:{API_PORT}", (work / "data" / "admin.key").read_text().strip())
                targets = [
                    Target(PLAIN, f"http://{worker}:{PLAIN_PORT}", None),
                    Target(OURS, f"http://{head}:{API_PORT}", key),
                    Target(VIA_PROXY, f"http://{head}:{API_PORT + 1}", key),
                ]
                measured = asyncio.run(measure(targets, plan, runtime, began, plain))
            ok = True
        finally:
            if up is not None and up.poll() is None:
                stopped = time.monotonic()
                up.terminate()
                try:
                    up.wait(120)
                except subprocess.TimeoutExpired:
                    up.kill()
                runtime["stop_s"][OURS] = round(time.monotonic() - stopped, 1)
            if not ok:  # the work dir stays too, with every log
                for name, path in logs.items():
                    if path.exists():
                        print(f"---- {name}\n{path.read_text(errors='replace')[-3000:]}", file=sys.stderr)
            shutil.rmtree(ray_temp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)

    for entry in measured.values():
        entry["delta"] = deltas(entry["summary"])
    report = {
        "what": "a Ray cluster of two hosts (network namespaces on one machine): plain vLLM's OpenAI server on "
        "the worker vs agencyllm (up --address on the head, engine on the worker) through the ingress replica "
        f"(direct ingress) and through Ray Serve's proxy; placeholder model, streamed chat, max_tokens {MAX_TOKENS} "
        "with ignore_eos, interleaved rounds; the client on the head host",
        "command": command,
        "plan": {str(k): {"rounds_per_target": r, "requests_per_round": n} for k, (r, n) in plan.items()},
        "environment": environment(),
        "runtime_s": round(time.monotonic() - began, 1),
        **runtime,
        "results": measured,
    }
    print()
    print(tables(measured, runtime))
    raw = write_results(report, out, {level: entry.pop("raw") for level, entry in report["results"].items()})
    log(f"wrote {out}, raw samples {raw} (runtime {report['runtime_s']}s)")
    return 0


async def measure(targets: list[Target], plan: dict, runtime: dict, began: float, plain: subprocess.Popen) -> dict:
    try:
        for target in targets:
            if target.name == PLAIN and plain.poll() is not None:
                raise RuntimeError(f"plain vLLM exited with {plain.returncode}")
            await wait_answering(target, START_TIMEOUT_S)
            runtime["ready_s"].setdefault(target.name, round(time.monotonic() - began, 1))
        log("all answering after " + ", ".join(f"{k} {v:.0f}s" for k, v in runtime["ready_s"].items()))
        return await load(targets, plan)
    finally:
        for target in targets:
            await target.client.aclose()
