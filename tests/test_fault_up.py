"""`agencyllm up` as an operator runs it, in a subprocess with its own data dir and one engine,
once with each way of serving its port (a separate ingress replica; the engine-hosted gateway):
its embedded Postgres SIGKILLed under load (503 with Retry-After, a restart, recovery, every
admitted request in the ledger), the replica serving its port SIGKILLed (the port served again),
then SIGTERM with a request in flight (exit 0, no process of its tree left, Postgres stopped, the
ledger complete), then a start and stop over the stale state. One file over 400 lines: the faults
run in order against the same running `up`, started once per topology."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from agencyllm.quotas.db import EmbeddedPostgres
from agencyllm.serving.ops.placeholder import write_placeholder_model

pytestmark = [pytest.mark.fault]

MODEL = "placeholder"
START_TIMEOUT = 900
STOP_TIMEOUT = 120  # the supervisor's own bound is 45 s + 10 s; leave room on a loaded machine


@dataclass
class Up:
    process: subprocess.Popen
    url: str
    data_dir: Path
    engine_gateway: bool
    output: list[str] = field(default_factory=list)
    tree: dict[int, float] = field(default_factory=dict)

    def remember_tree(self) -> None:
        try:
            root = psutil.Process(self.process.pid)
            for p in [root, *root.children(recursive=True)]:
                self.tree.setdefault(p.pid, p.create_time())
        except psutil.Error:
            pass

    def admin(self) -> httpx.Client:
        key = (self.data_dir / "admin.key").read_text().strip()
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {key}"}, timeout=30)

    def postgres_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postgres" / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def text(self) -> str:
        return "".join(self.output)


def _env(engine_gateway: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENCYLLM_")}
    env["AGENCYLLM_RESERVATION_LEASE_SECONDS"] = "60"
    env["AGENCYLLM_ENGINE_GATEWAY"] = str(engine_gateway).lower()
    return env


# Every fault runs against both topologies `up` can serve its port with: the default separate
# ingress replica, and the engine replica hosting the gateway (AGENCYLLM_ENGINE_GATEWAY=true).
@pytest.fixture(scope="module", params=[False, True], ids=["separate-ingress", "engine-gateway"])
def up(request, tmp_path_factory):
    from conftest import free_port

    data_dir = tmp_path_factory.mktemp("up")
    model_dir = write_placeholder_model(data_dir / "weights" / MODEL)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "agencyllm.serving.cli.main",
        "up",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        "--model",
        str(model_dir),
    ]
    process = subprocess.Popen(
        command, env=_env(request.param), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    running = Up(process, f"http://127.0.0.1:{port}", data_dir, request.param)

    def read() -> None:
        for line in process.stdout:
            running.output.append(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "Ready:" not in running.text():
            assert process.poll() is None, f"up exited with {process.returncode}:\n{running.text()[-3000:]}"
            assert time.monotonic() < deadline, f"up was not ready in {START_TIMEOUT} s:\n{running.text()[-3000:]}"
            time.sleep(1)
        running.remember_tree()
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
        for pid, created in running.tree.items():
            try:
                leftover = psutil.Process(pid)
                if leftover.create_time() == created:
                    leftover.kill()
            except psutil.Error:
                pass
        pid = running.postgres_pid()
        if pid is not None and psutil.pid_exists(pid):
            EmbeddedPostgres(data_dir).stop()


@pytest.fixture(scope="module")
def tenant_key(up) -> tuple[str, str]:
    name = f"up-{uuid.uuid4().hex[:8]}"
    with up.admin() as admin:
        assert admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
        response = admin.post(f"/admin/v1/tenants/{name}/keys", json={"name": "fault"})
        assert response.status_code == 201, response.text
    return name, response.json()["key"]


def chat(key: str, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Report."}], "max_tokens": 4, **extra}
    return {"url": "/v1/chat/completions", "json": body, "headers": {"authorization": f"Bearer {key}"}}


def ledger(up: Up, tenant: str) -> list[dict]:
    """Read the ledger over the server's own socket (joining the server as a handle would keep
    the supervisor from stopping it)."""
    import asyncpg

    lines = (up.data_dir / "postgres" / "postmaster.pid").read_text().split("\n")

    async def read() -> list[dict]:
        connection = await asyncpg.connect(host=lines[4], port=int(lines[3]), user="postgres", database="agencyllm")
        try:
            rows = await connection.fetch(
                "SELECT u.request_id, u.status, u.completion_tokens FROM usage_ledger u"
                " JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1",
                tenant,
            )
            open_count = await connection.fetchval(
                "SELECT count(*) FROM quota_reservations r JOIN tenants t ON t.id = r.tenant_id WHERE t.name = $1",
                tenant,
            )
        finally:
            await connection.close()
        return [dict(r) for r in rows] + [{"open": open_count}]

    return asyncio.run(read())


def test_up_serves_requests(up, tenant_key):
    _, key = tenant_key
    with httpx.Client(base_url=up.url, timeout=60) as client:
        response = client.post(**chat(key))
    assert response.status_code == 200, response.text
    # The replica serving the port is the one this topology puts there.
    serving = (
        f"ServeReplica:agencyllm:LLMServer:{MODEL}" if up.engine_gateway else "ServeReplica:agencyllm:AgencyIngress"
    )
    assert serving in " ".join(_port_owner(up).cmdline())
    up.remember_tree()


def test_client_that_leaves_mid_stream_is_settled_at_once(up, tenant_key):
    """The engine stops and the row is written when the client leaves, on the port `up` serves."""
    tenant, key = tenant_key
    with httpx.Client(base_url=up.url, timeout=60) as client:
        with client.stream("POST", **chat(key, max_tokens=900, ignore_eos=True, stream=True)) as response:
            assert response.status_code == 200
            request_id = response.headers["x-agencyllm-request-id"]
            for i, _ in enumerate(response.iter_lines()):
                if i >= 5:
                    break
    deadline = time.monotonic() + 20
    while (
        not (rows := [r for r in ledger(up, tenant)[:-1] if r["request_id"] == request_id])
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert [r["status"] for r in rows] == ["cancelled"], "the request was not settled when its client left"
    assert rows[0]["completion_tokens"] < 900
    assert ledger(up, tenant)[-1]["open"] == 0


def test_up_shows_one_line_per_step_and_no_log_records(up, tenant_key):
    """Progress lines with elapsed seconds (database, migrations, Ray, each model, Ready), the
    log file named; Alembic's, Serve's and the engine's own records only in that file, and no
    access log lines there (off by default)."""
    _, key = tenant_key
    with httpx.Client(base_url=up.url, timeout=60) as client:
        assert client.post(**chat(key)).status_code == 200
    time.sleep(2)  # the replicas' output reaches the log file through Ray's log relay
    from agencyllm.quotas.db import head_revisions

    lines = up.text().splitlines()
    steps = [m.group(1) for line in lines if (m := re.match(r"^\[\s*\d+\.\ds\] (.+)$", line))]
    log_file = up.data_dir / "logs" / "agencyllm.log"
    expected = [
        f"Ray, Serve and engine logs: {log_file} (--verbose shows them here)",
        "database ready",
        f"migrations at {', '.join(sorted(head_revisions()))}",
        "Ray started",
        f"model {MODEL} loaded and warm",
        f"Ready: {up.url}/v1",
    ]
    for step in expected:
        assert step in steps, f"no progress line {step!r}:\n{up.text()[-3000:]}"
    order = [steps.index(step) for step in expected]
    assert order[1] < order[2] and order[3] < order[4] < order[5], steps  # Ray starts beside the database
    records = [
        line
        for line in lines
        if line.lstrip().startswith("{") or re.match(r"^(\x1b\[\d+m)?\(?\w*(DEBUG|INFO|WARNING) ", line)
    ]
    assert not records, f"log records on the terminal: {records[:5]}"
    text = log_file.read_text(errors="replace")
    assert "Started vLLM engine" in text and f"LLMServer:{MODEL}" in text
    # Access logs are off by default: the request above left no line.
    assert "POST /v1/chat/completions" not in text and "CALL chat OK" not in text


def test_database_death_gives_503_then_recovers_without_restart(up, tenant_key):
    tenant, key = tenant_key
    admitted: list[str] = []

    def stream_through_the_outage(results: list) -> None:
        with httpx.Client(base_url=up.url, timeout=120) as client:
            with client.stream("POST", **chat(key, max_tokens=120, ignore_eos=True, stream=True)) as response:
                results.append(response.headers.get("x-agencyllm-request-id"))
                for _ in response.iter_lines():
                    pass

    streams: list = []
    workers = [threading.Thread(target=stream_through_the_outage, args=(streams,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)  # both admitted and streaming
    pid = up.postgres_pid()
    assert pid is not None
    psutil.Process(pid).kill()

    seen: dict[str, list[httpx.Response]] = {"chat": [], "admin": [], "readyz": []}
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=up.url, timeout=30) as client, up.admin() as admin:
        while time.monotonic() < deadline:
            seen["chat"].append(response := client.post(**chat(key, max_tokens=1)))
            if response.status_code == 200:
                admitted.append(response.headers["x-agencyllm-request-id"])
            seen["admin"].append(admin.get("/admin/v1/tenants"))
            seen["readyz"].append(client.get("/readyz"))
            recovered = all(seen[name][-1].status_code == 200 for name in seen)
            if recovered and any(r.status_code == 503 for r in seen["chat"]):
                break
            time.sleep(0.1)
    for worker in workers:
        worker.join(120)

    for name, responses in seen.items():
        statuses = [r.status_code for r in responses]
        assert 500 not in statuses, (name, statuses)
        assert set(statuses) <= {200, 503}, (name, statuses)
        assert statuses[-1] == 200, f"{name} did not recover: {statuses}"
    outage = [r for name in ("chat", "admin") for r in seen[name] if r.status_code == 503]
    assert outage, "no request saw the outage"
    for response in outage:
        assert response.json()["error"]["type"] == "service_unavailable"
        assert int(response.headers["retry-after"]) >= 1
    assert any(r.status_code == 503 for r in seen["readyz"]), "/readyz never said not ready"
    assert up.text().count("stopped unexpectedly; restarting") == 1, up.text()[-2000:]

    # Every admitted request has its one ledger row, the two streams included, none left open.
    expected = set(admitted) | {s for s in streams if s}
    deadline = time.monotonic() + 60
    while True:
        rows = ledger(up, tenant)
        ids = {r["request_id"] for r in rows if "request_id" in r}
        if expected <= ids and rows[-1]["open"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert expected <= ids, f"missing ledger rows: {expected - ids}"
    assert rows[-1]["open"] == 0
    up.remember_tree()


def _stream_to_the_end(up: Up, key: str, max_tokens: int, request_ids: list[str]) -> None:
    """One long stream, read until the server ends it, however it ends (its id noted)."""
    try:
        with httpx.Client(base_url=up.url, timeout=120) as client:
            with client.stream("POST", **chat(key, max_tokens=max_tokens, ignore_eos=True, stream=True)) as response:
                request_ids.append(response.headers["x-agencyllm-request-id"])
                for _ in response.iter_lines():
                    pass
    except httpx.HTTPError:
        pass


def _port_owner(up: Up) -> psutil.Process:
    port = int(up.url.rsplit(":", 1)[1])
    pids = {
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid
    }
    assert len(pids) == 1, f"who listens on {port}: {pids}"
    return psutil.Process(pids.pop())


def test_killed_replica_serving_the_port_comes_back_on_it(up, tenant_key):
    """The replica that serves `up`'s port (the ingress, or the engine replica hosting the
    gateway) SIGKILLed with streams open: the streams end at once (no hang), a new replica
    serves the same port again (its connections' TIME_WAIT must not lock Ray out of the port),
    and the interrupted requests are settled by the lease reaper, none left open."""
    tenant, key = tenant_key
    request_ids: list[str] = []
    ended: list[float] = []

    def stream() -> None:
        _stream_to_the_end(up, key, 900, request_ids)
        ended.append(time.monotonic())

    workers = [threading.Thread(target=stream) for _ in range(2)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 30
    while len(request_ids) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(request_ids) == 2
    owner = _port_owner(up)
    owner.kill()
    killed = time.monotonic()
    for worker in workers:
        worker.join(60)
    assert len(ended) == 2 and max(ended) - killed < 15, "a stream hung after its replica died"

    back = None
    with httpx.Client(base_url=up.url, timeout=30) as client:
        while time.monotonic() - killed < 400:
            try:
                if client.post(**chat(key)).status_code == 200:
                    back = time.monotonic() - killed
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
    assert back is not None, f"the port was not served again within 400 s:\n{up.text()[-2000:]}"
    assert _port_owner(up).pid != owner.pid
    print(f"port served again {back:.1f} s after the kill")

    deadline = time.monotonic() + 150  # the lease (60 s here) and a reaper round
    while True:
        rows = ledger(up, tenant)
        settled = [r for r in rows[:-1] if r["request_id"] in request_ids]
        if len(settled) == 2 and rows[-1]["open"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sorted(r["request_id"] for r in settled) == sorted(request_ids), settled
    assert rows[-1]["open"] == 0
    up.remember_tree()


def test_sigterm_stops_everything_it_started(up, tenant_key):
    tenant, key = tenant_key
    up.remember_tree()
    postgres = up.postgres_pid()
    assert postgres is not None and psutil.pid_exists(postgres)
    request_ids: list[str] = []
    worker = threading.Thread(target=_stream_to_the_end, args=(up, key, 600, request_ids))
    worker.start()
    deadline = time.monotonic() + 30
    while not request_ids and time.monotonic() < deadline:
        time.sleep(0.1)
    up.remember_tree()
    started = time.monotonic()
    up.process.send_signal(signal.SIGTERM)
    code = up.process.wait(STOP_TIMEOUT)
    took = time.monotonic() - started
    worker.join(60)
    assert code == 0, up.text()[-3000:]

    time.sleep(1)
    left = []
    for pid, created in up.tree.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(process.cmdline())[:120]}")
        except psutil.Error:
            pass
    assert not left, f"left running after SIGTERM ({took:.0f} s): {left}"
    assert not psutil.pid_exists(postgres) or psutil.Process(postgres).status() == psutil.STATUS_ZOMBIE, (
        "Postgres left running"
    )
    print(f"up stopped in {took:.1f} s")

    # The in-flight request was settled before the database went down, and a stale handle
    # from a crashed process does not keep a later stop from stopping the server.
    handles = up.data_dir / "postgres" / ".handle_pids.json"
    dead_pid = _dead_pid()
    handles.write_text(json.dumps([dead_pid]))
    server = EmbeddedPostgres(up.data_dir)
    server.start()
    try:
        rows = ledger(up, tenant)
    finally:
        server.stop()
    assert not (up.data_dir / "postgres" / "postmaster.pid").exists(), "a stale handle kept Postgres running"
    assert rows[-1]["open"] == 0
    ids = {r["request_id"] for r in rows if "request_id" in r}
    assert set(request_ids) <= ids, "the request in flight at SIGTERM has no ledger row"


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
