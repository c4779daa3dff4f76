"""The servers a benchmark compares, started and stopped the same way: plain vLLM's OpenAI server,
Ray Serve LLM's `build_openai_app` (bench/ray_serve_llm.py) and agencyllm's local stack."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.serving_common import MODEL_ID, STOP_TIMEOUT_S, VLLM_ENV, log

# ---- the three servers ----------------------------------------------------------------------


def plain_vllm_command(model_dir: Path, port: int, *extra_args: str, host: str = "127.0.0.1") -> list[str]:
    """Plain vLLM's OpenAI server; `extra_args` are more of its command-line options."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        MODEL_ID,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "1024",
        *extra_args,
    ]


def start_plain_vllm(model_dir: Path, port: int, log_file: Path, *extra_args: str) -> subprocess.Popen:
    env = {**os.environ, **VLLM_ENV}
    out = open(log_file, "wb")
    command = plain_vllm_command(model_dir, port, *extra_args)
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


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
