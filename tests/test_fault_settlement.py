"""Every admitted request is settled exactly once, on every path, and charged what its engine did.

The first group drives the gateway's request path against real Postgres with engine calls that
fail the ways Ray's handles do (before the first item, mid-stream, a `cancel()` that raises
again); the second group drives the real stack (engine refusals, cancelled generations)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import httpx
import pytest
from fake_engine import FakeCall
from ray.serve.llm.openai_api_models import ErrorResponse

from agencyllm.auth.principal import Principal, Role
from agencyllm.quotas.db import Database
from agencyllm.quotas.ledger import Ledger
from agencyllm.serving.config import ServingConfig
from agencyllm.serving.gateway.engine_health import EngineHealth
from agencyllm.serving.gateway.errors import EngineUnavailable, OpenAIError
from agencyllm.serving.gateway.fairshare import Ticket
from agencyllm.serving.gateway.governance import Governance
from agencyllm.serving.gateway.metering import Metering
from agencyllm.serving.gateway.pipeline import Gateway
from agencyllm.serving.gateway.services import Services
from agencyllm.serving.ops.stack import PLACEHOLDER_ID
from agencyllm.serving.settings import Settings

PROMPT_TOKENS = 11
TICKET = Ticket(tenant="t")


def FakeUpstream(items=(), **how) -> FakeCall:
    """A call whose cancel() raises again, as Ray's does once the call has failed."""
    return FakeCall(items, cancel_raises=True, **how)


class Body:
    model = PLACEHOLDER_ID
    request_id = None


class Engines:
    """The gateway's engine port, answering every call with `upstream`."""

    requests = None  # the request path below starts after parsing

    def __init__(self, upstream: FakeCall) -> None:
        self.upstream = upstream

    def open(self, model, method, body, ticket):
        return self.upstream

    async def check_health(self, model):
        pass

    async def has_running_replica(self, model):
        return True

    def is_gone(self, exc):
        return False


def gateway_with(upstream: FakeCall, metered, db: Database) -> Gateway:
    """The gateway's request path over `metered`'s metering: the engine call and settlement only."""
    metering, ledger = metered[0], metered[1]
    services = Services(Settings(), db, ledger, None, Governance(db, b"fault-tests"))
    gateway = Gateway(services, ServingConfig.model_construct(models=[]), Engines(upstream))
    gateway.metering = metering
    return gateway


@pytest.fixture
async def metered(pg_db, make_tenant):
    tenant = await make_tenant(max_concurrent_requests=1)
    ledger = Ledger(pg_db, lease_seconds=30)
    metering = Metering(ledger)
    principal = Principal(
        subject=f"user-{uuid.uuid4().hex[:6]}",
        username="u",
        client_id=None,
        tenant=tenant,
        roles=frozenset({Role.USER}),
        auth_method="api_key",
    )

    async def admit():
        return await metering.admit(
            principal,
            request_id=uuid.uuid4().hex,
            model=PLACEHOLDER_ID,
            endpoint="chat",
            prompt_tokens=PROMPT_TOKENS,
            max_tokens=64,
            context_length=512,
        )

    yield metering, ledger, tenant, admit
    await metering.drain()


async def ledger_row(pg_db, request_id: str, timeout: float = 10) -> dict:
    pool = await pg_db.pool()
    deadline = time.monotonic() + timeout
    while True:
        row = await pool.fetchrow(
            "SELECT prompt_tokens, completion_tokens, status FROM usage_ledger WHERE request_id = $1", request_id
        )
        if row is not None or time.monotonic() > deadline:
            return dict(row) if row else {}
        await asyncio.sleep(0.05)


async def open_reservations(pg_db, tenant: str) -> int:
    pool = await pg_db.pool()
    return await pool.fetchval(
        "SELECT count(*) FROM quota_reservations r JOIN tenants t ON t.id = r.tenant_id WHERE t.name = $1", tenant
    )


async def assert_settled(pg_db, metered, admitted, *, status: str, prompt: int, completion: int) -> None:
    metering, ledger, tenant, admit = metered
    row = await ledger_row(pg_db, admitted.reservation.request_id)
    assert row == {"prompt_tokens": prompt, "completion_tokens": completion, "status": status}
    assert await open_reservations(pg_db, tenant) == 0
    assert ledger.open_reservations == []  # no lease left to renew
    # The tenant's only concurrency slot is free again.
    again = await admit()
    metering.settle_later(again, status="cancelled", completion_tokens=0)


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


CHUNK = sse('{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"x"}}]}')


async def test_call_that_fails_before_the_first_item_charges_nothing(pg_db, metered):
    """Ray could not send the body (pickling recursion) and its cancel() raises again."""
    _, _, _, admit = metered
    admitted = await admit()
    upstream = FakeUpstream(fail=RecursionError("maximum recursion depth exceeded while pickling"))
    with pytest.raises(EngineUnavailable):
        await gateway_with(upstream, metered, pg_db).generate(Body(), "chat", admitted, True, TICKET)
    assert upstream.cancelled == 1
    await assert_settled(pg_db, metered, admitted, status="engine_error", prompt=0, completion=0)


async def test_engine_refusal_settles_at_zero(pg_db, metered):
    _, _, _, admit = metered
    admitted = await admit()
    refusal = ErrorResponse.model_validate(
        {"error": {"message": "temperature must be >= 0", "type": "BadRequestError", "code": 400}}
    )
    with pytest.raises(OpenAIError) as err:
        await gateway_with(FakeUpstream([refusal]), metered, pg_db).generate(Body(), "chat", admitted, True, TICKET)
    assert err.value.status == 400
    await assert_settled(pg_db, metered, admitted, status="client_error", prompt=0, completion=0)


async def test_engine_5xx_is_503_and_settles_at_zero(pg_db, metered):
    _, _, _, admit = metered
    admitted = await admit()
    failure = ErrorResponse.model_validate(
        {"error": {"message": "engine dead", "type": "InternalServerError", "code": 500}}
    )
    with pytest.raises(EngineUnavailable):
        await gateway_with(FakeUpstream([failure]), metered, pg_db).generate(Body(), "chat", admitted, True, TICKET)
    await assert_settled(pg_db, metered, admitted, status="engine_error", prompt=0, completion=0)


async def test_client_gone_before_the_first_item_is_charged_its_prompt(pg_db, metered):
    _, _, _, admit = metered
    admitted = await admit()
    upstream = FakeUpstream(hang=True)
    call = asyncio.ensure_future(
        gateway_with(upstream, metered, pg_db).generate(Body(), "chat", admitted, True, TICKET)
    )
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await assert_settled(pg_db, metered, admitted, status="cancelled", prompt=PROMPT_TOKENS, completion=0)


async def test_stream_that_dies_midway_gets_an_error_event_and_is_charged_what_it_made(pg_db, metered):
    _, _, _, admit = metered
    admitted = await admit()
    upstream = FakeUpstream([CHUNK, CHUNK, CHUNK], fail=ConnectionError("replica died"))
    response = await gateway_with(upstream, metered, pg_db).generate(Body(), "chat", admitted, False, TICKET)
    events = [event async for event in response.body_iterator]
    assert '"service_unavailable"' in events[-2] and events[-1] == "data: [DONE]\n\n"
    # No usage chunk arrived: the prompt counted at admission, one token per chunk of text.
    await assert_settled(pg_db, metered, admitted, status="engine_error", prompt=PROMPT_TOKENS, completion=3)


async def test_stream_the_client_left_is_charged_its_real_tokens(pg_db, metered):
    _, _, _, admit = metered
    admitted = await admit()
    upstream = FakeUpstream([CHUNK] * 5, hang=True)
    response = await gateway_with(upstream, metered, pg_db).generate(Body(), "chat", admitted, False, TICKET)
    stream = response.body_iterator
    for _ in range(4):
        await stream.__anext__()
    await stream.aclose()  # what Starlette does when the client disconnects
    await assert_settled(pg_db, metered, admitted, status="cancelled", prompt=PROMPT_TOKENS, completion=4)


async def test_replica_shutdown_settles_what_is_in_flight(pg_db, metered):
    metering, _, _, admit = metered
    admitted = await admit()
    admitted.completion_tokens = 7
    await metering.drain()
    await assert_settled(pg_db, metered, admitted, status="cancelled", prompt=PROMPT_TOKENS, completion=7)


async def test_settling_twice_writes_one_row(pg_db, metered):
    metering, _, _, admit = metered
    admitted = await admit()
    await metering.settle(admitted, status="ok", completion_tokens=3)
    await metering.settle(admitted, status="engine_error")
    await assert_settled(pg_db, metered, admitted, status="ok", prompt=PROMPT_TOKENS, completion=3)


# ---- through the real stack ---------------------------------------------------------------


def stack_tenant(stack, **quota) -> tuple[str, str]:
    from test_serving_quotas import new_tenant

    return new_tenant(stack, **quota)


def rows_of(pg_url: str, tenant: str) -> list[dict]:
    from test_serving_quotas import ledger_rows

    return asyncio.run(ledger_rows(pg_url, tenant))


def wait_rows(pg_url: str, tenant: str, count: int, timeout: float = 15) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = rows_of(pg_url, tenant)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def open_on_stack(pg_url: str, tenant: str) -> int:
    from agencyllm.quotas.db import Database

    async def count() -> int:
        database = Database(pg_url)
        try:
            return await open_reservations(database, tenant)
        finally:
            await database.dispose()

    return asyncio.run(count())


def chat_body(**extra) -> dict:
    return {"model": PLACEHOLDER_ID, "messages": [{"role": "user", "content": "Write the annual report."}], **extra}


@pytest.mark.stack
@pytest.mark.parametrize("refused", [{"temperature": -5}, {"messages": []}], ids=["temperature", "no-messages"])
def test_engine_refusal_through_the_stack_settles_at_zero(stack, pg_url, refused):
    tenant, key = stack_tenant(stack, max_concurrent_requests=1)
    with httpx.Client(base_url=stack.url, timeout=60, headers={"authorization": f"Bearer {key}"}) as client:
        response = client.post("/v1/chat/completions", json={**chat_body(max_tokens=4), **refused})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] != "server_error"
        assert client.post("/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200
    rows = wait_rows(pg_url, tenant, 2)
    assert sorted(r["status"] for r in rows) == ["client_error", "ok"]
    assert [r["total_tokens"] for r in rows if r["status"] == "client_error"] == [0]
    assert open_on_stack(pg_url, tenant) == 0


@pytest.mark.stack
def test_cancelled_stream_is_charged_its_real_tokens(stack, pg_url):
    tenant, key = stack_tenant(stack)
    body = chat_body(max_tokens=900, ignore_eos=True, stream=True)
    with httpx.Client(base_url=stack.url, timeout=60, headers={"authorization": f"Bearer {key}"}) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            request_id = response.headers["x-agencyllm-request-id"]
            for i, _ in enumerate(response.iter_lines()):
                if i >= 40:
                    break
    rows = {r["request_id"]: r for r in wait_rows(pg_url, tenant, 1)}
    row = rows[request_id]
    assert row["status"] == "cancelled"
    assert row["prompt_tokens"] > 0, "the prompt the engine read was not charged"
    assert 15 <= row["completion_tokens"] < 900
    assert open_on_stack(pg_url, tenant) == 0


@pytest.mark.stack
def test_cancelled_non_streaming_request_is_charged_its_prompt(stack, pg_url):
    tenant, key = stack_tenant(stack, max_concurrent_requests=1)
    body = chat_body(max_tokens=900, ignore_eos=True)
    with httpx.Client(base_url=stack.url, timeout=1.5, headers={"authorization": f"Bearer {key}"}) as client:
        with contextlib.suppress(httpx.TimeoutException):
            client.post("/v1/chat/completions", json=body)
    rows = wait_rows(pg_url, tenant, 1)
    assert [r["status"] for r in rows] == ["cancelled"]
    assert rows[0]["prompt_tokens"] > 0
    # The slot is free for the next request at once.
    with httpx.Client(base_url=stack.url, timeout=60, headers={"authorization": f"Bearer {key}"}) as client:
        assert client.post("/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200
    assert open_on_stack(pg_url, tenant) == 0


async def test_a_call_queued_for_an_engine_with_no_replica_fails_fast_and_the_model_recovers():
    from agencyllm.serving.gateway.engine_health import EngineGone

    replica = {"running": False}

    async def probe(model):
        if not replica["running"]:
            raise ConnectionError("no replica")

    async def has_replica(model):
        return replica["running"]

    health = EngineHealth(probe, has_replica=has_replica, interval=0.05, stall_check=0.1)
    started = time.monotonic()
    with pytest.raises(EngineGone) as gone:
        await health.first_item(PLACEHOLDER_ID, asyncio.sleep(3600))
    assert time.monotonic() - started < 2 and health.is_gone(gone.value)
    assert health.is_down(PLACEHOLDER_ID)
    replica["running"] = True
    deadline = time.monotonic() + 5
    while health.is_down(PLACEHOLDER_ID) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not health.is_down(PLACEHOLDER_ID)
    assert await health.first_item(PLACEHOLDER_ID, asyncio.sleep(0.3, result="first")) == "first"
    await health.aclose()


async def test_a_call_queued_when_another_finds_the_engine_gone_fails_at_once():
    """A host with the only replica dies: the controller still lists the replica for a while, so
    the replica check says it runs; a stream on it failing marks the model down, and the calls
    queued behind it end then, not when Ray notices."""
    from agencyllm.serving.gateway.engine_health import EngineGone

    async def probe(model):
        raise ConnectionError("no replica")

    async def has_replica(model):
        return True  # the controller has not noticed yet

    health = EngineHealth(probe, has_replica=has_replica, interval=0.05, stall_check=30)
    queued = asyncio.ensure_future(health.first_item(PLACEHOLDER_ID, asyncio.sleep(3600)))
    await asyncio.sleep(0.2)
    assert not queued.done()
    marked = time.monotonic()
    health.call_failed(PLACEHOLDER_ID, EngineGone(PLACEHOLDER_ID))
    with pytest.raises(EngineGone):
        await asyncio.wait_for(queued, 5)
    assert time.monotonic() - marked < 1
    await health.aclose()
