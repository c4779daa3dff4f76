"""Batches survive their workers: `agencyllm up` in a subprocess (its own data dir, Postgres, Ray)
runs a batch while, first, the ingress replica that holds its lines is SIGKILLed, and then `up`
itself is stopped with SIGTERM and started again over the same data. After each, the batch ends
`completed` with every `custom_id` exactly once in its output and exactly once in the usage
ledger, and no reservation left open. The seconds each recovery takes are printed (`pytest -s`)
and recorded in docs/operations.md.

The same `up` serves a model given by directory (`--model`), which configures no tool-call parser:
it also proves that `required` and named tool choices work on such a model (guided decoding) and
that `auto` is refused naming the setting.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest
from test_fault_up import Up, ledger

from agencyllm.quotas.db import EmbeddedPostgres
from agencyllm.serving.ops.placeholder import write_placeholder_model

pytestmark = [pytest.mark.fault]

MODEL = "placeholder"
LINES = 60
START_TIMEOUT = 900
BATCH_TIMEOUT = 600


class Platform:
    """`up`, started and restarted over one data dir and port."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.model = write_placeholder_model(data_dir / "weights" / MODEL)
        self.runs: list[Up] = []

    @property
    def current(self) -> Up:
        return self.runs[-1]

    def start(self) -> Up:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENCYLLM_")}
        # Short leases, so a lost worker's lines and reservations are taken over within seconds.
        env.update({"AGENCYLLM_RESERVATION_LEASE_SECONDS": "15", "AGENCYLLM_BATCH_LEASE_SECONDS": "10"})
        command = [sys.executable, "-m", "agencyllm.serving.cli.main", "up", "--data-dir", str(self.data_dir),
                   "--port", str(self.port), "--model", str(self.model)]  # fmt: skip
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        running = Up(process, f"http://127.0.0.1:{self.port}", self.data_dir, False)
        self.runs.append(running)
        threading.Thread(target=lambda: running.output.extend(process.stdout), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while "Ready:" not in running.text():
            assert process.poll() is None, f"up exited with {process.returncode}:\n{running.text()[-3000:]}"
            assert time.monotonic() < deadline, f"up was not ready in {START_TIMEOUT} s:\n{running.text()[-3000:]}"
            time.sleep(1)
        running.remember_tree()
        return running

    def stop(self, running: Up) -> None:
        if running.process.poll() is None:
            running.process.send_signal(signal.SIGTERM)
            try:
                running.process.wait(120)
            except subprocess.TimeoutExpired:
                running.process.kill()
        for pid, created in running.tree.items():
            try:
                leftover = psutil.Process(pid)
                if leftover.create_time() == created:
                    leftover.kill()
            except psutil.Error:
                pass


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> Iterator[Platform]:
    from conftest import free_port

    running = Platform(tmp_path_factory.mktemp("batches"), free_port())
    try:
        running.start()
        yield running
    finally:
        for run in running.runs:
            running.stop(run)
        pid = running.runs[-1].postgres_pid() if running.runs else None
        if pid is not None and psutil.pid_exists(pid):
            EmbeddedPostgres(running.data_dir).stop()


def tenant_client(platform: Platform) -> tuple[str, openai.OpenAI]:
    name = f"b-{uuid.uuid4().hex[:8]}"
    with platform.current.admin() as admin:
        assert admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
        key = admin.post(f"/admin/v1/tenants/{name}/keys", json={"name": "batch"}).json()["key"]
    return name, openai.OpenAI(base_url=f"{platform.current.url}/v1", api_key=key, max_retries=5, timeout=60)


def start_batch(client: openai.OpenAI) -> str:
    lines = [
        {"custom_id": f"doc-{n}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Classify document {n}."}],
                  "max_tokens": 24, "ignore_eos": True}}
        for n in range(LINES)
    ]  # fmt: skip
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file_id = client.files.create(file=("docs.jsonl", io.BytesIO(content)), purpose="batch").id
    return client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id


def progress(client: openai.OpenAI, batch_id: str) -> tuple[str, int]:
    """The batch's status and completed count; through a restart, the API may be away a while."""
    try:
        batch = client.batches.retrieve(batch_id)
        return batch.status, batch.request_counts.completed
    except (openai.APIConnectionError, openai.APIStatusError):
        return "unreachable", -1


def until_completed(client: openai.OpenAI, batch_id: str, at_least: int = LINES) -> float:
    began = time.monotonic()
    while True:
        status, completed = progress(client, batch_id)
        if (status == "completed" and at_least == LINES) or (at_least < LINES and completed >= at_least):
            return time.monotonic() - began
        assert status not in ("failed", "expired", "cancelled"), status
        assert time.monotonic() - began < BATCH_TIMEOUT, f"batch {status} with {completed} done"
        time.sleep(0.5)


def check_exactly_once(platform: Platform, tenant: str, client: openai.OpenAI, batch_id: str) -> None:
    batch = client.batches.retrieve(batch_id)
    assert batch.status == "completed" and batch.request_counts.completed == LINES, batch
    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in output) == sorted(f"doc-{n}" for n in range(LINES))
    assert all(r["response"]["status_code"] == 200 for r in output)
    deadline = time.monotonic() + 60
    while True:  # reservations of the lost attempts are settled by the reaper within its lease
        rows = ledger(platform.current, tenant)
        open_count = rows.pop()["open"]
        if open_count == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    ours = [r["request_id"] for r in rows if r["request_id"].startswith(batch_id)]
    assert len(ours) == len(set(ours)) == LINES, f"{len(ours)} ledger rows for {LINES} lines"
    assert open_count == 0


def test_required_and_named_tools_work_on_a_model_without_a_tool_call_parser(platform):
    _, client = tenant_client(platform)
    tool = {"type": "function", "function": {"name": "file_document", "parameters": {
        "type": "object", "properties": {"folder": {"type": "string", "enum": ["hr", "finance"]}},
        "required": ["folder"], "additionalProperties": False}}}  # fmt: skip
    ask = [{"role": "user", "content": "File the memo."}]
    for choice in ("required", {"type": "function", "function": {"name": "file_document"}}):
        reply = client.chat.completions.create(
            model=MODEL, messages=ask, tools=[tool], tool_choice=choice, max_tokens=200
        )
        (call,) = reply.choices[0].message.tool_calls
        assert call.function.name == "file_document"
        assert json.loads(call.function.arguments)["folder"] in ("hr", "finance")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=ask, tools=[tool], max_tokens=4)
    assert (
        refused.value.body["code"] == "tool_choice_unsupported" and "tool_call_parser" in refused.value.body["message"]
    )


def ingress_replica() -> psutil.Process:
    for process in psutil.process_iter(["cmdline"]):
        if "ServeReplica:agencyllm:AgencyIngress" in " ".join(process.info["cmdline"] or []):
            return process
    raise AssertionError("no ingress replica process")


def test_a_killed_worker_s_lines_are_taken_over_each_charged_once(platform):
    tenant, client = tenant_client(platform)
    batch_id = start_batch(client)
    until_completed(client, batch_id, at_least=5)
    ingress_replica().kill()  # the worker and every line it held, mid-call
    killed_at = time.monotonic()
    resumed = until_completed(client, batch_id, at_least=progress(client, batch_id)[1] + 1)
    until_completed(client, batch_id)
    print(
        f"\nworker killed: lines running again {resumed:.1f} s later, batch done {time.monotonic() - killed_at:.1f} s"
    )
    check_exactly_once(platform, tenant, client, batch_id)


def test_a_batch_resumes_after_up_is_stopped_and_started_again(platform):
    tenant, client = tenant_client(platform)
    batch_id = start_batch(client)
    until_completed(client, batch_id, at_least=5)
    stopped_at = time.monotonic()
    platform.stop(platform.current)
    assert platform.current.process.returncode == 0, platform.current.text()[-2000:]
    down = time.monotonic() - stopped_at
    restarted_at = time.monotonic()
    platform.start()
    ready = time.monotonic() - restarted_at
    done = until_completed(client, batch_id)
    print(f"\nup stopped in {down:.1f} s, ready again in {ready:.1f} s, batch done {done:.1f} s after that")
    check_exactly_once(platform, tenant, client, batch_id)
