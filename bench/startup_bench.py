"""Start-up benchmark: `agencyllm up` with the default models, to `Ready:` and the first requests.

Run from the repository root:  python -m bench.startup_bench [--runs 1] [--out bench/results/startup.json]

Each run starts `agencyllm up` with a fresh data directory (placeholder chat model and the bundled
MiniLM embedding model, as a new user gets them) and reports: seconds from the command to its
`Ready:` line, the progress lines it printed on the way (each step's elapsed seconds), then the
first chat and embedding requests right after `Ready:` against the warm latency (p50 of the next
requests), then stops it with SIGTERM. `--python` runs another interpreter (e.g. a venv with an
older checkout installed) to compare two versions in the same conditions. The machine's load
average is recorded: on a shared host, compare runs made side by side only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results" / "startup.json"
START_TIMEOUT = 900
WARM_REQUESTS = 20
CPU_SAMPLE_SECONDS = 0.5
STEP = re.compile(r"^\[\s*(\d+\.\d)s\] (.+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_cpu(root: int, seen: dict[tuple[int, float], float]) -> None:
    """User + system CPU seconds of every process of `root`'s tree so far (Postgres, Ray, engine
    processes), by (pid, start time); a process that exits between samples keeps its last value."""
    import psutil

    try:
        processes = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return
    for proc in processes:
        try:
            times = proc.cpu_times()
            seen[(proc.pid, proc.create_time())] = times.user + times.system
        except psutil.Error:
            pass


def timed(client: httpx.Client, path: str, body: dict) -> float:
    started = time.perf_counter()
    response = client.post(path, json=body)
    took = time.perf_counter() - started
    response.raise_for_status()
    return took


def one_run(python: str, *, keep: bool = False) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="agencyllm-startup-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENCYLLM_")}
    command = [python, "-m", "agencyllm.serving.cli.main", "up", "--data-dir", str(data_dir), "--port", str(port)]
    load_before = os.getloadavg()
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()
    ready_at: list[float] = []

    def read() -> None:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if "Ready:" in line and not ready.is_set():
                ready_at.append(time.monotonic() - started)
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    cpu: dict[tuple[int, float], float] = {}
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.wait(CPU_SAMPLE_SECONDS):
            sample_cpu(process.pid, cpu)
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("not ready:\n" + "\n".join(lines[-30:]))
        sample_cpu(process.pid, cpu)
        key = (data_dir / "admin.key").read_text().strip()
        chat = {"model": "placeholder", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        embed = {"model": "all-MiniLM-L6-v2", "input": "hi"}
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {key}"}, timeout=120
        ) as client:
            first_chat = timed(client, "/v1/chat/completions", chat)
            first_embed = timed(client, "/v1/embeddings", embed)
            warm_chat = [timed(client, "/v1/chat/completions", chat) for _ in range(WARM_REQUESTS)]
            warm_embed = [timed(client, "/v1/embeddings", embed) for _ in range(WARM_REQUESTS)]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    steps = [{"at_s": float(m.group(1)), "step": m.group(2)} for line in lines if (m := STEP.match(line))]
    return {
        "ready_s": round(ready_at[0], 1),
        "data_dir": str(data_dir) if keep else None,
        # CPU the start cost, whatever else runs on the host: on N free cores, Ready comes no
        # sooner than this / N (and no sooner than the longest chain of steps).
        "cpu_s_to_ready": round(sum(cpu.values()), 1),
        "steps": steps,
        "first_chat_ms": round(first_chat * 1000, 1),
        "warm_chat_p50_ms": round(statistics.median(warm_chat) * 1000, 1),
        "first_embedding_ms": round(first_embed * 1000, 1),
        "warm_embedding_p50_ms": round(statistics.median(warm_embed) * 1000, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--python", default=sys.executable, help="interpreter whose agencyllm to start")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep each run's data dir (its logs/agencyllm.log)")
    args = parser.parse_args(argv)
    runs = []
    for number in range(1, args.runs + 1):
        run = one_run(args.python, keep=args.keep)
        runs.append(run)
        print(
            f"run {number}: Ready in {run['ready_s']:.1f} s, {run['cpu_s_to_ready']:.0f} CPU-s "
            f"(load {run['load_average_before'][0]:.1f})"
        )
        for step in run["steps"]:
            print(f"  [{step['at_s']:6.1f}s] {step['step']}")
        print(
            f"  first chat {run['first_chat_ms']:.0f} ms vs warm p50 {run['warm_chat_p50_ms']:.0f} ms; "
            f"first embedding {run['first_embedding_ms']:.0f} ms vs warm p50 {run['warm_embedding_p50_ms']:.0f} ms"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cores": os.cpu_count(), "runs": runs}, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
