"""The gateway's request pipeline against a fake engine: no Ray, no vLLM engine, real Postgres.
One file over 400 lines: every test shares one gateway, its fake engine and its ledger fixtures.

Every test admits through the real ledger and reads the usage-ledger row the request left, so
"settled exactly once, charged what the engine did" is checked on the row itself."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fake_engine import FakeCall
from pydantic import BeforeValidator, SecretStr, TypeAdapter
from ray.serve.llm.openai_api_models import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
)
from starlette.requests import Request
from vllm.exceptions import VLLMClientError

from agencyllm.quotas import store
from agencyllm.serving.config import ModelSpec, ServingConfig
from agencyllm.serving.gateway.core import REQUEST_ID_HEADER
from agencyllm.serving.gateway.engines import RequestModels
from agencyllm.serving.gateway.errors import EngineUnavailable, OpenAIError
from agencyllm.serving.gateway.pipeline import Gateway
from agencyllm.serving.gateway.tokens import PromptCounter
from agencyllm.serving.http.openai import http_app
from agencyllm.serving.ops.placeholder import write_placeholder_model
from agencyllm.serving.settings import Settings

MODEL = "placeholder"
EMBED = "embedder"
HELLO = [{"role": "user", "content": "Write the annual report."}]
ROOT = Path(__file__).resolve().parents[1]


class FakeEngines:
    """The gateway's `Engines`: records what it was sent and answers with the next scripted call."""

    requests = RequestModels.of(
        ChatCompletionRequest, CompletionRequest, EmbeddingRequest, client_errors=(VLLMClientError,)
    )

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any, Any]] = []
        self.next: FakeCall | None = None
        self.healthy = True
        self.gone: tuple[type[BaseException], ...] = ()  # what means "the engine went away"

    def answer(self, call: FakeCall) -> FakeCall:
        self.next = call
        return call

    def open(self, model, method, body, ticket):
        self.calls.append((model, method, body, ticket))
        call, self.next = self.next, None
        assert call is not None, "the engine was called without a scripted answer"
        return call

    async def check_health(self, model: str) -> None:
        if not self.healthy:
            raise ConnectionError("engine away")

    async def has_running_replica(self, model: str) -> bool:
        return True

    def is_gone(self, exc: BaseException) -> bool:
        return isinstance(exc, self.gone)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> ServingConfig:
    directory = write_placeholder_model(tmp_path_factory.mktemp("models") / MODEL)
    return ServingConfig(
        models=[ModelSpec(id=MODEL, path=directory), ModelSpec(id=EMBED, path=directory, task="embed")]
    )


@pytest.fixture(scope="module")
async def gateway(pg_url, models, tmp_path_factory):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data"), database_url=SecretStr(pg_url), reservation_lease_seconds=30
    )
    engines = FakeEngines()
    gateway = await Gateway.start(settings, models, engines)
    gateway.engines = engines  # the tests script it
    yield gateway
    await gateway.aclose()


@pytest.fixture
async def caller(pg_db, make_tenant):
    """A fresh tenant (one concurrent request) and an API key of it."""

    async def make(**policy) -> tuple[str, str]:
        tenant = await make_tenant(**{"max_concurrent_requests": 1, **policy})
        async with pg_db.sessions() as session:
            key = await store.create_key(
                session,
                store.SystemActor(),
                tenant_name=tenant,
                kind="personal",
                name="k",
                owner_subject=f"u-{uuid.uuid4().hex[:6]}",
                owner_username="u",
            )
        return tenant, key.secret

    return make


def request(path: str, body: dict, key: str, **headers: str) -> Request:
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            *((k.encode(), v.encode()) for k, v in headers.items()),
        ],
    }
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request(scope, receive)


async def ledger_rows(pg_db, tenant: str, count: int = 1, timeout: float = 10) -> list[dict]:
    pool = await pg_db.pool()
    deadline = time.monotonic() + timeout
    while True:
        rows = await pool.fetch(
            "SELECT u.request_id, u.prompt_tokens, u.completion_tokens, u.status FROM usage_ledger u"
            " JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1",
            tenant,
        )
        if len(rows) >= count or time.monotonic() > deadline:
            await asyncio.sleep(0.2)  # a second row would show up now
            rows = await pool.fetch(
                "SELECT u.request_id, u.prompt_tokens, u.completion_tokens, u.status FROM usage_ledger u"
                " JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1",
                tenant,
            )
            return [dict(r) for r in rows]
        await asyncio.sleep(0.05)


async def nothing_held(pg_db, tenant: str) -> bool:
    pool = await pg_db.pool()
    held = await pool.fetchval(
        "SELECT count(*) FROM quota_reservations r JOIN tenants t ON t.id = r.tenant_id WHERE t.name = $1", tenant
    )
    return held == 0


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chunk(text: str) -> str:
    return sse(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": text}}],
        }
    )


def usage_chunk(prompt: int, completion: int) -> str:
    return sse(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": MODEL,
            "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
    )


def error_response(code: int, message: str = "refused") -> ErrorResponse:
    return ErrorResponse.model_validate({"error": {"message": message, "type": "BadRequestError", "code": code}})


def counted_prompt(models: ServingConfig) -> int:
    spec = models.model(MODEL)
    return PromptCounter(spec.path, spec.context_length()).chat(HELLO)


async def read_all(response) -> list[str]:
    return [event async for event in response.body_iterator]


# ---- streams -------------------------------------------------------------------------------


async def test_stream_is_admitted_relayed_and_settled_once_with_the_engines_usage(gateway, caller, pg_db):
    tenant, key = await caller()
    gateway.engines.answer(FakeCall([[chunk("a"), chunk("b")], [chunk("c"), usage_chunk(9, 3)], [sse("[DONE]")]]))
    response = await gateway.chat(
        request("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "stream": True, "max_tokens": 5}, key)
    )
    events = await read_all(response)
    # The client did not ask for usage: the engine's usage chunk is used, not passed on.
    assert events == [chunk("a"), chunk("b"), chunk("c"), sse("[DONE]")]
    model, method, body, ticket = gateway.engines.calls[-1]
    assert (model, method, ticket.tenant) == (MODEL, "chat", tenant)
    assert body.stream_options.include_usage is True
    assert body.max_completion_tokens == 5 and body.max_tokens is None
    assert body.cache_salt and body.request_id == response.headers[REQUEST_ID_HEADER]
    rows = await ledger_rows(pg_db, tenant)
    assert [(r["request_id"], r["prompt_tokens"], r["completion_tokens"], r["status"]) for r in rows] == [
        (response.headers[REQUEST_ID_HEADER], 9, 3, "ok")
    ]
    assert await nothing_held(pg_db, tenant)


async def test_stream_usage_chunk_reaches_a_client_that_asked(gateway, caller, pg_db):
    tenant, key = await caller()
    gateway.engines.answer(FakeCall([[chunk("a"), usage_chunk(9, 1), sse("[DONE]")]]))
    body = {"model": MODEL, "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    events = await read_all(await gateway.chat(request("/v1/chat/completions", body, key)))
    assert events == [chunk("a"), usage_chunk(9, 1), sse("[DONE]")]
    assert [r["status"] for r in await ledger_rows(pg_db, tenant)] == ["ok"]


async def test_stream_options_without_usage_are_forced_upstream_and_not_shown(gateway, caller, pg_db):
    tenant, key = await caller()
    gateway.engines.answer(FakeCall([[chunk("a"), usage_chunk(9, 1), sse("[DONE]")]]))
    body = {"model": MODEL, "messages": HELLO, "stream": True, "stream_options": {"include_usage": False}}
    events = await read_all(await gateway.chat(request("/v1/chat/completions", body, key)))
    assert events == [chunk("a"), sse("[DONE]")]
    assert gateway.engines.calls[-1][2].stream_options.include_usage is True
    assert [(r["completion_tokens"], r["status"]) for r in await ledger_rows(pg_db, tenant)] == [(1, "ok")]


def asgi_server(
    response,
    *,
    spec_version: str,
    stall_at: int | None = None,
    slow_at: int | None = None,
    stall_after: int | None = None,
):
    """Serve `response` as an ASGI server does, collecting the events sent. Message number
    `stall_at` (0 is the headers) is never sent: the client stopped reading; message number
    `slow_at` takes a second (a client reading slowly); message number `stall_after` reaches the
    client, whose leaving is then noticed before the next. No disconnect message ever comes: the
    server cancels the task instead, as Ray does. Returns (task, events, stalled)."""
    events: list[str] = []
    stalled = asyncio.Event()
    sent = 0

    async def send(message: dict) -> None:
        nonlocal sent
        if sent == stall_at:
            stalled.set()
            await asyncio.sleep(3600)
        if sent == slow_at:
            await asyncio.sleep(1)
        sent += 1
        if message.get("body"):
            events.append(message["body"].decode())
        if sent - 1 == stall_after:
            stalled.set()
            await asyncio.sleep(3600)

    async def receive() -> dict:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    task = asyncio.ensure_future(response({"type": "http", "asgi": {"spec_version": spec_version}}, receive, send))
    return task, events, stalled


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
async def test_client_that_leaves_right_after_done_had_the_whole_answer(gateway, caller, pg_db, spec_version):
    """The SDKs close the connection as soon as they read [DONE]: that is a finished request."""
    tenant, key = await caller()
    gateway.engines.answer(FakeCall([[chunk("a")], [usage_chunk(9, 1), sse("[DONE]")]]))
    response = await gateway.chat(
        request("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "stream": True}, key)
    )
    serving, events, stalled = asgi_server(response, spec_version=spec_version, stall_after=2)  # [DONE] is message 2
    await asyncio.wait_for(stalled.wait(), 5)
    assert events[-1] == sse("[DONE]")
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert [(r["completion_tokens"], r["status"]) for r in await ledger_rows(pg_db, tenant)] == [(1, "ok")]


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])  # Starlette's two ways of streaming
@pytest.mark.parametrize(("stalled_send", "chunks_made"), [(3, 3), (0, 0)])  # the third chunk; the headers
async def test_client_that_leaves_mid_stream_is_charged_prompt_and_streamed_chunks(
    gateway, caller, pg_db, models, spec_version, stalled_send, chunks_made
):
    """The engine call is aborted and the row written when the client leaves, not when the
    garbage collector finds the stream (collection is off here), even before the first chunk."""
    tenant, key = await caller()
    call = gateway.engines.answer(FakeCall([[chunk("x")]] * 5, hang=True))
    response = await gateway.chat(
        request("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "stream": True}, key)
    )
    gc.disable()
    try:
        serving, _, stalled = asgi_server(response, spec_version=spec_version, stall_at=stalled_send)
        await asyncio.wait_for(stalled.wait(), 5)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert call.cancelled >= 1
    finally:
        gc.enable()
    rows = await ledger_rows(pg_db, tenant)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["status"]) for r in rows] == [
        (counted_prompt(models), chunks_made, "cancelled")
    ]
    assert await nothing_held(pg_db, tenant)


async def test_client_that_leaves_before_the_first_item_is_charged_its_prompt(gateway, caller, pg_db, models):
    tenant, key = await caller()
    call = gateway.engines.answer(FakeCall(hang=True))
    pending = asyncio.ensure_future(
        gateway.chat(request("/v1/chat/completions", {"model": MODEL, "messages": HELLO}, key))
    )
    await asyncio.sleep(0.3)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    rows = await ledger_rows(pg_db, tenant)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["status"]) for r in rows] == [
        (counted_prompt(models), 0, "cancelled")
    ]
    assert call.cancelled == 1


async def test_stream_that_dies_midway_ends_with_an_error_event(gateway, caller, pg_db, models):
    tenant, key = await caller()
    gateway.engines.answer(FakeCall([[chunk("x")], [chunk("y")]], fail=ConnectionError("replica died")))
    events = await read_all(
        await gateway.chat(request("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "stream": True}, key))
    )
    assert events[:2] == [chunk("x"), chunk("y")]
    assert json.loads(events[2][6:])["error"]["code"] == "service_unavailable" and events[3] == "data: [DONE]\n\n"
    rows = await ledger_rows(pg_db, tenant)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["status"]) for r in rows] == [
        (counted_prompt(models), 2, "engine_error")
    ]


async def test_stream_whose_engine_stream_stops_without_done_ends_with_an_error_event(gateway, caller, pg_db, models):
    """A replica that goes away may end its stream quietly; the client must still learn it was cut."""
    tenant, key = await caller()
    gateway.engines.answer(FakeCall([[chunk("x")], [chunk("y")]]))
    events = await read_all(
        await gateway.chat(request("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "stream": True}, key))
    )
    assert events[:2] == [chunk("x"), chunk("y")]
    assert json.loads(events[2][6:])["error"]["code"] == "service_unavailable" and events[3:] == ["data: [DONE]\n\n"]
    rows = await ledger_rows(pg_db, tenant)
    assert [(r["completion_tokens"], r["status"]) for r in rows] == [(2, "engine_error")]


@pytest.fixture
async def fresh_gateway(pg_url, models, tmp_path):
    """A gateway of the test's own (one the test stops, or whose start it checks)."""
    settings = Settings(data_dir=tmp_path, database_url=SecretStr(pg_url), reservation_lease_seconds=30)
    engines = FakeEngines()
    gateway = await Gateway.start(settings, models, engines)
    gateway.engines = engines  # the test scripts it
    yield gateway
    await gateway.aclose()


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
@pytest.mark.parametrize("stop_while", ["waiting for the engine", "sending a chunk"])
async def test_stopping_replica_ends_its_streams_in_band_and_settles_them(
    fresh_gateway, caller, pg_db, models, spec_version, stop_while
):
    stopping = fresh_gateway
    tenant, key = await caller(max_concurrent_requests=2)
    stopping.engines.answer(FakeCall([[chunk("x")], [chunk("y")], [chunk("z")]], hang=True))
    response = await stopping.chat(
        request("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "stream": True}, key)
    )
    sending_z = 3 if stop_while == "sending a chunk" else None  # after the headers, x and y
    relaying, received, _ = asgi_server(response, spec_version=spec_version, slow_at=sending_z)
    while len(received) < 2:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the stream is now in the engine's wait, or in z's slow send
    assert await stopping.stop_serving(timeout=10) == 1
    await asyncio.wait_for(relaying, 5)  # ended, not cancelled
    assert received[:2] == [chunk("x"), chunk("y")]
    rest = received[2:]
    if stop_while == "waiting for the engine":  # z was sent: the engine's wait is after it
        assert rest[0] == chunk("z")
        rest = rest[1:]
    error = json.loads(rest[0].removeprefix("data: "))["error"]
    assert (error["code"], rest[1:]) == ("service_unavailable", ["data: [DONE]\n\n"])
    rows = await ledger_rows(pg_db, tenant)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["status"]) for r in rows] == [
        (counted_prompt(models), 3, "cancelled")
    ]
    assert await nothing_held(pg_db, tenant)

    with pytest.raises(OpenAIError) as refused:  # nothing new starts on a stopping replica
        await stopping.chat(request("/v1/chat/completions", {"model": MODEL, "messages": HELLO}, key))
    assert refused.value.status == 503 and "retry-after" in {k.lower() for k in refused.value.headers}
    assert len(stopping.engines.calls) == 1


async def test_stream_that_starts_after_the_stop_sends_only_the_farewell(fresh_gateway, caller, pg_db):
    tenant, key = await caller()
    call = fresh_gateway.engines.answer(FakeCall([[chunk("x")]], hang=True))
    response = await fresh_gateway.chat(
        request("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "stream": True}, key)
    )
    assert await fresh_gateway.stop_serving(timeout=10) == 0  # admitted, not yet sending
    relaying, received, _ = asgi_server(response, spec_version="2.3")
    await asyncio.wait_for(relaying, 5)
    assert json.loads(received[0].removeprefix("data: "))["error"]["code"] == "service_unavailable"
    assert received[1:] == ["data: [DONE]\n\n"] and call.cancelled >= 1
    rows = await ledger_rows(pg_db, tenant)
    assert [(r["completion_tokens"], r["status"]) for r in rows] == [(0, "cancelled")]
    assert await nothing_held(pg_db, tenant)


# ---- failures before the first item ------------------------------------------------------


async def test_engine_call_that_fails_before_the_first_item_charges_nothing(gateway, caller, pg_db):
    tenant, key = await caller()
    call = gateway.engines.answer(FakeCall(fail=RecursionError("maximum recursion depth exceeded while pickling")))
    with pytest.raises(EngineUnavailable):
        await gateway.chat(request("/v1/chat/completions", {"model": MODEL, "messages": HELLO}, key))
    assert call.cancelled == 1
    rows = await ledger_rows(pg_db, tenant)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["status"]) for r in rows] == [(0, 0, "engine_error")]
    assert await nothing_held(pg_db, tenant)


async def test_an_engine_that_went_away_takes_its_model_down_until_it_answers(fresh_gateway, caller, pg_db):
    tenant, key = await caller()
    engines = fresh_gateway.engines
    engines.gone = (ConnectionError,)
    engines.healthy = False
    engines.answer(FakeCall(fail=ConnectionError("replica died")))
    with pytest.raises(EngineUnavailable):
        await fresh_gateway.chat(request("/v1/chat/completions", {"model": MODEL, "messages": HELLO}, key))
    assert fresh_gateway.health.is_down(MODEL)
    async with client_of(fresh_gateway) as client:
        refused = await client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": HELLO}, headers={"authorization": f"Bearer {key}"}
        )
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "service_unavailable"
    assert len(engines.calls) == 1, "a request for a model that is down reached the engine"
    engines.healthy = True
    deadline = time.monotonic() + 10
    while fresh_gateway.health.is_down(MODEL) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not fresh_gateway.health.is_down(MODEL)
    rows = await ledger_rows(pg_db, tenant)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["status"]) for r in rows] == [(0, 0, "engine_error")]


async def test_a_failure_the_engine_port_does_not_call_gone_leaves_the_model_up(gateway, caller):
    _, key = await caller()
    gateway.engines.answer(FakeCall(fail=RuntimeError("not serialisable")))
    with pytest.raises(EngineUnavailable):
        await gateway.chat(request("/v1/chat/completions", {"model": MODEL, "messages": HELLO}, key))
    assert not gateway.health.is_down(MODEL)


async def test_a_body_the_engines_request_model_refuses_is_a_400_naming_the_parameter(gateway, caller, pg_db):
    tenant, key = await caller()
    body = {"model": MODEL, "messages": HELLO, "logprobs": False, "top_logprobs": 3}
    calls = len(gateway.engines.calls)
    async with client_of(gateway) as client:
        response = await client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "top_logprobs", "invalid_value")
    assert "`logprobs` must be set to true" in error["message"]
    assert len(gateway.engines.calls) == calls
    assert await ledger_rows(pg_db, tenant, timeout=0.5) == []


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "assistant", "content": "", "tool_calls": True}, "messages[0].tool_calls"),
        ({"role": "assistant", "content": "", "tool_calls": 7}, "messages[0].tool_calls"),
        ("hello", "messages[0]"),
    ],
)
async def test_a_message_of_the_wrong_shape_is_a_400_naming_it(gateway, caller, pg_db, message, param):
    """vLLM's own pre-processing of `tool_calls` raised a TypeError on these (a 500 before)."""
    tenant, key = await caller()
    async with client_of(gateway) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [message]},
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert await ledger_rows(pg_db, tenant, timeout=0.5) == []


async def test_a_shape_the_engines_request_model_trips_over_is_a_400(gateway, caller, pg_db):
    """Past the edge's checks, an error a request model's own pre-processing raises is still the
    client's body: a 400 in OpenAI's shape, never a 500."""
    tenant, key = await caller()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi", "tool_calls": None}]}
    original = gateway._requests  # noqa: SLF001 (the project's own object, white-box)

    def trips(data: object) -> object:
        raise TypeError("'bool' object is not iterable")  # as vLLM's `_normalize_messages_before` did

    tripping = TypeAdapter(Annotated[dict[str, Any], BeforeValidator(trips)])
    gateway._requests = dataclasses.replace(original, chat=tripping)  # noqa: SLF001 (own object, white-box)
    try:
        async with client_of(gateway) as client:
            response = await client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
    finally:
        gateway._requests = original  # noqa: SLF001 (the project's own object, white-box)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_request_body"
    assert await ledger_rows(pg_db, tenant, timeout=0.5) == []


@pytest.mark.parametrize(
    ("code", "status", "row_status"),
    [(400, 400, "client_error"), (429, 429, "client_error"), (500, 503, "engine_error")],
)
async def test_engine_error_response_is_its_status_and_charges_nothing(
    gateway, caller, pg_db, code, status, row_status
):
    tenant, key = await caller()
    gateway.engines.answer(FakeCall([[error_response(code, "temperature is out of range")]]))
    async with client_of(gateway) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": HELLO, "stream": True},
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if status == 503:
        assert error["code"] == "service_unavailable" and "temperature" not in error["message"]
    else:
        assert error["message"] == "temperature is out of range"
    if status in (429, 503):
        assert int(response.headers["retry-after"]) >= 1
    rows = await ledger_rows(pg_db, tenant)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["status"]) for r in rows] == [(0, 0, row_status)]
    assert await nothing_held(pg_db, tenant)


async def test_quota_refusal_never_reaches_the_engine(gateway, caller, pg_db):
    tenant, key = await caller(tokens_per_day=5)
    calls = len(gateway.engines.calls)
    async with client_of(gateway) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": HELLO, "max_tokens": 4},
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "tokens_per_day"
    assert int(response.headers["retry-after"]) >= 1
    assert len(gateway.engines.calls) == calls
    assert await ledger_rows(pg_db, tenant, timeout=0.5) == []
    assert await nothing_held(pg_db, tenant)


async def test_unknown_model_is_404_and_never_admitted(gateway, caller, pg_db):
    tenant, key = await caller()
    async with client_of(gateway) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "nope", "messages": HELLO},
            headers={"authorization": f"Bearer {key}"},
        )
        card = await client.get("/v1/models/nope", headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert card.status_code == 404 and card.json()["error"]["param"] == "model"
    assert await ledger_rows(pg_db, tenant, timeout=0.5) == []


async def test_missing_credentials_are_401(gateway):
    async with client_of(gateway) as client:
        response = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


# ---- whole answers --------------------------------------------------------------------------


async def test_non_streaming_answer_is_returned_and_charged_its_usage(gateway, caller, pg_db):
    tenant, key = await caller()
    answer = ChatCompletionResponse.model_validate(
        {
            "id": "r",
            "object": "chat.completion",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Done."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
        }
    )
    gateway.engines.answer(FakeCall([answer]))
    async with client_of(gateway) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": HELLO, "max_tokens": 4},
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Done."
    rows = await ledger_rows(pg_db, tenant)
    assert [(r["request_id"], r["prompt_tokens"], r["completion_tokens"], r["status"]) for r in rows] == [
        (response.headers[REQUEST_ID_HEADER], 12, 2, "ok")
    ]


async def test_embeddings_are_charged_their_input(gateway, caller, pg_db):
    tenant, key = await caller()
    answer = EmbeddingResponse.model_validate(
        {
            "id": "e",
            "object": "list",
            "created": 1,
            "model": EMBED,
            "data": [{"index": 0, "object": "embedding", "embedding": [0.1, 0.2]}],
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        }
    )
    gateway.engines.answer(FakeCall([answer]))
    async with client_of(gateway) as client:
        response = await client.post(
            "/v1/embeddings",
            json={"model": EMBED, "input": "annual report"},
            headers={"authorization": f"Bearer {key}"},
        )
        wrong = await client.post(
            "/v1/embeddings",
            json={"model": MODEL, "input": "annual report"},
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.status_code == 200 and response.json()["data"][0]["embedding"] == [0.1, 0.2]
    assert gateway.engines.calls[-1][:2] == (EMBED, "embeddings")
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "model_not_supported"
    rows = await ledger_rows(pg_db, tenant)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["status"]) for r in rows] == [(4, 0, "ok")]


# ---- models and health ----------------------------------------------------------------------


async def test_model_cards_have_the_openai_shape(gateway, caller):
    _, key = await caller()
    async with client_of(gateway) as client:
        listed = (await client.get("/v1/models", headers={"authorization": f"Bearer {key}"})).json()
        one = (await client.get(f"/v1/models/{MODEL}", headers={"authorization": f"Bearer {key}"})).json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [MODEL, EMBED]
    assert {"id", "object", "created", "owned_by"} <= set(one) and one["object"] == "model"
    assert isinstance(one["created"], int) and one["metadata"]["max_request_context_length"] > 0


async def test_the_first_request_finds_tokenizers_and_key_lookups_ready(fresh_gateway):
    for model in (MODEL, EMBED):
        assert "_tokenizer" in vars(fresh_gateway._counters[model]), f"{model}'s tokenizer loads in the first request"  # noqa: SLF001 (the project's own object, white-box)
    assert fresh_gateway.services.database._lookup_pool is not None  # noqa: SLF001 (the project's own object, white-box)


async def test_readiness_names_what_is_down(gateway):
    async with client_of(gateway) as client:
        assert (await client.get("/readyz")).json()["status"] == "ready"
        gateway.engines.healthy = False
        try:
            response = await client.get("/readyz")
        finally:
            gateway.engines.healthy = True
    assert response.status_code == 503
    assert response.json()["checks"][f"model:{MODEL}"].startswith("unavailable")


def client_of(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(http_app(gateway)), base_url="http://gateway.test")


# ---- boundaries -----------------------------------------------------------------------------


def test_the_gateway_imports_without_ray_or_vllm(tmp_path):
    code = (
        "import sys; import agencyllm.serving.gateway.pipeline, agencyllm.serving.http.openai; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm')))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


PRIVATE_RAY = "ray.llm." + "_internal"  # spelled apart, so this file does not name it


@pytest.mark.parametrize("package", ["serving", "auth", "quotas", "migrations", "bench", "tests"])
def test_no_module_imports_rays_private_packages(package):
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / package).rglob("*.py")
        if PRIVATE_RAY in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize("choice", [None, "auto"], ids=["default-auto", "auto"])
async def test_auto_tool_choice_on_a_model_without_a_tool_call_parser_is_a_400_naming_the_setting(
    gateway, caller, pg_db, choice
):
    tenant, key = await caller()
    body = {"model": MODEL, "messages": HELLO, "tools": [WEATHER_TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    calls = len(gateway.engines.calls)
    async with client_of(gateway) as client:
        response = await client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "tool_choice",
        "tool_choice_unsupported",
    )
    assert "tool_call_parser" in error["message"] and MODEL in error["message"]
    assert len(gateway.engines.calls) == calls
    assert await ledger_rows(pg_db, tenant, timeout=0.5) == []


@pytest.mark.parametrize(
    "choice", ["none", "required", {"type": "function", "function": {"name": "get_weather"}}], ids=str
)
async def test_other_choices_need_no_parser_and_the_definitions_are_counted(gateway, caller, pg_db, choice):
    """The tools reach the engine (whose chat template renders them; `required` and named choices
    are guided decoding, which every model serves), and admission counts them."""
    _, key = await caller()
    counter = gateway.counter(MODEL)
    bare = counter.chat(HELLO)
    assert counter.chat(HELLO, tools=[WEATHER_TOOL]) > bare + 20
    body = {"model": MODEL, "messages": HELLO, "tools": [WEATHER_TOOL], "tool_choice": choice, "stream": True}
    gateway.engines.answer(FakeCall([[chunk("a"), usage_chunk(9, 1), sse("[DONE]")]]))
    async with client_of(gateway) as client:
        response = await client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    _, _, sent, _ = gateway.engines.calls[-1]
    assert [tool.function.name for tool in sent.tools] == ["get_weather"]
