"""An engine replica SIGKILLed mid-stream on the shared stack: every open stream gets an in-band
error event promptly, new requests get 503 with Retry-After (never a hang) until a replica is
back, every request has its ledger row, no reservation stays open, and the stack recovers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from agencyllm.serving.ops.stack import PLACEHOLDER_ID

pytestmark = [pytest.mark.stack, pytest.mark.fault]

STREAMS = 3
ERROR_EVENT_WITHIN = 15.0  # seconds from the kill to the error event on every open stream
RECOVERY_WITHIN = 420.0


def engine_replicas(model: str) -> list[psutil.Process]:
    """This session's engine replica processes for `model` (other Ray clusters may run beside it:
    only descendants of this test process count)."""
    wanted = f"ServeReplica:agencyllm:LLMServer:{model}"
    found = []
    for process in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if any(part.startswith(f"ray::{wanted}") or part == wanted for part in process.cmdline()):
                found.append(process)
            elif wanted in " ".join(process.cmdline()) and "initialize_and_get_metadata" not in process.name():
                found.append(process)
        except psutil.Error:
            pass
    return found


def test_killed_engine_fails_streams_at_once_and_recovers(stack, pg_url):
    from test_fault_settlement import open_on_stack, rows_of, stack_tenant

    tenant, key = stack_tenant(stack)
    headers = {"authorization": f"Bearer {key}"}
    body = {
        "model": PLACEHOLDER_ID,
        "messages": [{"role": "user", "content": "Write the annual report."}],
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    started = threading.Barrier(STREAMS + 1, timeout=120)
    outcomes: list[dict] = []
    killed_at: list[float] = []

    def stream() -> None:
        outcome: dict = {"error_at": None, "request_id": None, "lines": 0}
        try:
            with httpx.Client(base_url=stack.url, timeout=120) as client:
                with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                    outcome["request_id"] = response.headers.get("x-agencyllm-request-id")
                    lines = response.iter_lines()
                    for _ in range(3):
                        next(lines)
                    started.wait()
                    for line in lines:
                        outcome["lines"] += 1
                        if line.startswith("data: {") and '"error"' in line:
                            outcome["error_at"] = time.monotonic()
                            outcome["error"] = json.loads(line[6:])["error"]
        except (httpx.HTTPError, threading.BrokenBarrierError) as exc:
            outcome["exception"] = type(exc).__name__
        outcomes.append(outcome)

    workers = [threading.Thread(target=stream) for _ in range(STREAMS)]
    for worker in workers:
        worker.start()
    started.wait()
    replicas = engine_replicas(PLACEHOLDER_ID)
    assert replicas, "no engine replica process found"
    children = [c for r in replicas for c in r.children(recursive=True)]
    killed_at.append(time.monotonic())
    for replica in replicas:
        replica.send_signal(signal.SIGKILL)

    # New requests meanwhile: 503 with Retry-After, quickly, never a 500 or a hang.
    refused = []
    with httpx.Client(base_url=stack.url, timeout=60, headers=headers) as client:
        for _ in range(3):
            asked = time.monotonic()
            response = client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
            refused.append((response.status_code, time.monotonic() - asked, response))
            time.sleep(0.5)
    for worker in workers:
        worker.join(120)

    try:
        assert len(outcomes) == STREAMS
        for outcome in outcomes:
            assert outcome["error_at"] is not None, f"a stream got no error event: {outcome}"
            assert outcome["error"]["type"] == "service_unavailable"
            assert outcome["error_at"] - killed_at[0] < ERROR_EVENT_WITHIN, outcome
        for status, took, response in refused:
            assert status in (200, 503), response.text
            if status == 503:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["error"]["type"] == "service_unavailable"
            assert took < 30, f"a request waited {took:.0f} s for a dead engine"
        assert any(status == 503 for status, _, _ in refused)
        error_after = max(o["error_at"] for o in outcomes) - killed_at[0]

        # Failover: the first request answered after the kill.
        deadline = time.monotonic() + RECOVERY_WITHIN
        with httpx.Client(base_url=stack.url, timeout=60, headers=headers) as client:
            while True:
                response = client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
                if response.status_code == 200 or time.monotonic() > deadline:
                    break
                assert response.status_code == 503, response.text
                time.sleep(1)
        failover = time.monotonic() - killed_at[0]
        assert response.status_code == 200, f"no engine answered {RECOVERY_WITHIN:.0f} s after the kill"
        print(f"\nengine killed: error events after {error_after:.1f} s; requests served again after {failover:.1f} s")

        ids = {o["request_id"] for o in outcomes}
        deadline = time.monotonic() + 30
        while True:
            rows = {r["request_id"]: r for r in rows_of(pg_url, tenant)}
            if ids <= set(rows) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert ids <= set(rows), "a killed stream has no ledger row"
        assert {rows[i]["status"] for i in ids} == {"engine_error"}
        assert all(rows[i]["prompt_tokens"] > 0 and rows[i]["completion_tokens"] > 0 for i in ids)
        assert open_on_stack(pg_url, tenant) == 0
    finally:
        stack.stack.wait_ready(RECOVERY_WITHIN)
        for child in children:  # an engine core left behind by its dead replica
            try:
                child.kill()
            except psutil.Error:
                pass
