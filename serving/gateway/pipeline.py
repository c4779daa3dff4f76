"""The request pipeline, built once, as plain Python: no Ray here.

    authenticate → parse/check → count prompt → admit (reserve quota) → engine → settle usage

`Gateway.start(settings, serving, engines)` builds every service the pipeline needs (database,
ledger and metering, authenticator, governance, fair-share weights, prompt counters) from the
settings once; `aclose()` settles what is in flight and lets go of them. The engines are reached
through `Engines`, a small port: Ray Serve deployment handles in production
(`serving/rayserve/ingress.py`), a fake in the unit tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from pydantic import BaseModel, TypeAdapter
from starlette.responses import JSONResponse, Response

from agencyllm.auth.principal import Principal
from agencyllm.quotas import store
from agencyllm.quotas.db import Database, assert_schema_current
from agencyllm.quotas.ledger import Ledger
from agencyllm.quotas.models import TRAFFIC_CLASSES
from agencyllm.serving.config import ModelSpec, ServingConfig
from agencyllm.serving.gateway.engine_health import EngineHealth, engine_gone
from agencyllm.serving.gateway.errors import EngineUnavailable, OpenAIError, unavailable
from agencyllm.serving.gateway.fairshare import TenantShares, Ticket, retry_after_seconds
from agencyllm.serving.gateway.governance import Governance, retention_job
from agencyllm.serving.gateway.guards import parse_body
from agencyllm.serving.gateway.identity import Authenticator
from agencyllm.serving.gateway.inputs import check_openai_params
from agencyllm.serving.gateway.metering import Admitted, Metering
from agencyllm.serving.gateway.streaming import OpenStreams, StreamUsage, relay
from agencyllm.serving.gateway.tokens import PromptCounter
from agencyllm.serving.settings import Settings

log = logging.getLogger("agencyllm.ingress")

_DONE = "data: [DONE]\n\n"
# Ray Serve already answers with its own `x-request-id`; this one names the usage-ledger row.
REQUEST_ID_HEADER = "x-agencyllm-request-id"
# A caller may run a request as batch work (docs/quotas.md, "Fair sharing"); so does OpenAI's
# `service_tier: "flex"`. Nothing lets a batch key's request run as interactive.
TRAFFIC_CLASS_HEADER = "x-agencyllm-traffic-class"
# Who owns the models in /v1/models (OpenAI's `owned_by`).
MODEL_OWNER = "organization-owner"
STOPPING_MESSAGE = "The service is restarting. Please retry."
# `stop_serving` waits at most this for the streams to end, and as long again for their rows.
STOP_SECONDS = 10.0


class EngineCall(Protocol):
    """One call to an engine: its output items (SSE strings, lists of them, or one complete
    response object), and a way to abort it."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    async def __anext__(self) -> Any: ...

    def cancel(self) -> None: ...


@dataclass(frozen=True)
class RequestModels:
    """The engines' OpenAI request models, which bodies are parsed into before they are sent."""

    chat: TypeAdapter
    completions: TypeAdapter
    embeddings: TypeAdapter

    @classmethod
    def of(cls, chat: Any, completions: Any, embeddings: Any) -> RequestModels:
        return cls(TypeAdapter(chat), TypeAdapter(completions), TypeAdapter(embeddings))


class Engines(Protocol):
    """How the gateway reaches the model engines, and the request models they take."""

    requests: RequestModels

    def open(self, model: str, method: str, body: Any, ticket: Ticket) -> EngineCall:
        """Start `method` (chat, completions, embeddings) on an engine of `model`."""

    async def check_health(self, model: str) -> None:
        """Return when an engine of `model` answers; raise otherwise."""

    async def has_running_replica(self, model: str) -> bool:
        """Whether `model` has an engine replica running at all (calls queue until one is)."""


@dataclass
class Services:
    """What the admin routes and the pipeline share, built from the settings once."""

    settings: Settings
    database: Database
    ledger: Ledger
    authenticator: Authenticator
    governance: Governance

    @classmethod
    async def start(cls, settings: Settings) -> Services:
        if settings.database_url is None:
            raise ValueError("the gateway needs settings.database_url")
        database = Database(settings.database_url.get_secret_value())
        try:
            await assert_schema_current(database)
            ledger = Ledger(
                database,
                timezone=settings.quota_timezone,
                lease_seconds=settings.reservation_lease_seconds,
                retention=retention_job(settings, database),
            )
            governance = await Governance.load(database)
            authenticator = Authenticator.from_settings(settings, database)
        except BaseException:
            await database.dispose()
            raise
        return cls(settings, database, ledger, authenticator, governance)

    def install(self, app: FastAPI) -> None:
        """Put the services where the admin routes' dependencies (`serving/gateway/deps.py`) find them."""
        app.state.settings = self.settings
        app.state.database = self.database
        app.state.ledger = self.ledger
        app.state.authenticator = self.authenticator

    async def aclose(self) -> None:
        await self.governance.drain()
        await self.ledger.audit.aclose()
        await self.authenticator.aclose()
        await self.database.dispose()


class Gateway:
    def __init__(self, services: Services, serving: ServingConfig, engines: Engines) -> None:
        self.services = services
        self.settings = services.settings
        self._engines = engines
        self._requests = engines.requests
        self._specs: dict[str, ModelSpec] = {m.id: m for m in serving.models}
        self._counters = {m.id: PromptCounter(m.path, m.context_length()) for m in serving.models}
        self._cards = {m.id: model_card(m) for m in serving.models}
        self._governance = services.governance
        self.metering = Metering(services.ledger)
        self.health = EngineHealth(engines.check_health, has_replica=engines.has_running_replica)
        self._shares = TenantShares(self._fetch_shares)
        self._streams = OpenStreams(farewell=[unavailable(STOPPING_MESSAGE).sse(), _DONE])

    @classmethod
    async def start(cls, settings: Settings, serving: ServingConfig, engines: Engines) -> Gateway:
        services = await Services.start(settings)
        try:
            gateway = cls(services, serving, engines)
        except BaseException:
            await services.aclose()
            raise
        await gateway._shares.refresh()
        await gateway._warm()
        gateway.metering.start()
        return gateway

    async def _warm(self) -> None:
        """What the first request would otherwise pay for: each model's tokenizer and chat
        template, and the key-lookup connections (a database outage is not a start failure)."""
        for spec in self._specs.values():
            self._counters[spec.id].warm(chat=spec.task != "embed")
        try:
            await self.services.database.lookup_pool()
        except Exception as exc:
            log.warning("key-lookup connections not opened at start: %s", type(exc).__name__)

    async def stop_serving(self, timeout: float = STOP_SECONDS) -> int:
        """Before the replica stops: new model calls get 503, each stream in flight ends with an
        in-band error event, and their ledger rows are written; returns how many streams ended.

        Without this, a replica serving HTTP itself is held open for its streams until Ray kills
        it, and a killed replica settles nothing (the reaper later charges those in full)."""
        ended = await self._streams.end_all(timeout)
        await self.metering.drain(timeout)
        return ended

    async def aclose(self) -> None:
        """Shutdown: write the ledger rows still being settled, then let go of connections."""
        await self.metering.drain()
        await self.health.aclose()
        await self.services.aclose()

    # ---- OpenAI routes -------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        principal = await self._authenticate(request)
        wants_usage: list[bool] = []
        body = await parse_body(request, self._requests.chat, check=self._checks("chat", wants_usage))
        spec = self._spec(body.model)
        self._require_engine(spec)
        ticket = self._ticket(principal, request, body)
        prompt_tokens = self._counters[spec.id].chat(body.messages)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        _materialize_messages(body)
        admitted, per_sequence = await self._admit(
            principal, spec, "chat", [prompt_tokens], requested, body.n or 1, "messages"
        )
        body.model = spec.id
        body.max_completion_tokens, body.max_tokens = per_sequence, None
        return await self._generate(body, "chat", admitted, _usage_wanted(body, wants_usage), ticket)

    async def completions(self, request: Request) -> Response:
        principal = await self._authenticate(request)
        wants_usage: list[bool] = []
        body = await parse_body(request, self._requests.completions, check=self._checks("completions", wants_usage))
        spec = self._spec(body.model)
        self._require_engine(spec)
        ticket = self._ticket(principal, request, body)
        prompt_tokens = self._counters[spec.id].prompts(body.prompt)
        n = body.n or 1
        admitted, body.max_tokens = await self._admit(
            principal, spec, "completions", prompt_tokens, body.max_tokens, n, "prompt"
        )
        body.model = spec.id
        return await self._generate(body, "completions", admitted, _usage_wanted(body, wants_usage), ticket)

    async def embeddings(self, request: Request) -> Response:
        principal = await self._authenticate(request)
        body = await parse_body(request, self._requests.embeddings, check=self._checks("embeddings"))
        spec = self._spec(body.model)
        ticket = self._ticket(principal, request, body)
        if spec.task != "embed":
            raise OpenAIError(
                400, f"Model '{spec.id}' does not serve embeddings.", param="model", code="model_not_supported"
            )
        self._require_engine(spec)
        counter = self._counters[spec.id]
        prompt_tokens = [counter.chat(body.messages)] if hasattr(body, "messages") else counter.prompts(body.input)
        admitted, _ = await self._admit(principal, spec, "embeddings", prompt_tokens, 0, 1, "input")
        body.model = spec.id
        return await self._generate(body, "embeddings", admitted, True, ticket)

    async def models(self, request: Request) -> Response:
        await self._authenticate(request)
        return JSONResponse({"object": "list", "data": list(self._cards.values())})

    async def model_data(self, model: str, request: Request) -> Response:
        await self._authenticate(request)
        card = self._cards.get(model)
        if card is None:
            raise OpenAIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return JSONResponse(card)

    # ---- health --------------------------------------------------------------------------

    async def healthz(self) -> dict:
        return {"status": "ok"}

    async def readyz(self) -> Response:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.services.database.ping(), timeout=5)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unavailable ({type(exc).__name__})"
        for model_id in self._specs:
            try:
                await asyncio.wait_for(self._engines.check_health(model_id), timeout=10)
                checks[f"model:{model_id}"] = "ok"
            except Exception as exc:
                checks[f"model:{model_id}"] = f"unavailable ({type(exc).__name__})"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
        )

    # ---- the request path ----------------------------------------------------------------

    async def _authenticate(self, request: Request) -> Principal:
        principal = await self.services.authenticator.authenticate(request.headers.get("authorization"))
        if not principal.may_call_models:
            raise OpenAIError(403, "Your account lacks the role needed to call models.")
        return principal

    def _require_engine(self, spec: ModelSpec) -> None:
        if self._streams.stopping:
            raise unavailable(STOPPING_MESSAGE)
        if self.health.is_down(spec.id):
            raise EngineUnavailable(spec.id)

    def _checks(self, endpoint: str, wants_usage: list[bool] | None = None):
        settings = self.settings

        def check(data: dict) -> None:
            check_openai_params(
                data, endpoint=endpoint, max_choices=settings.max_choices, max_prompts=settings.max_prompts_per_request
            )
            if wants_usage is not None:
                _ask_for_stream_usage(data, wants_usage)

        return check

    async def _fetch_shares(self) -> dict[str, float]:
        return await store.tenant_shares(await self.services.database.pool())

    def _ticket(self, principal: Principal, request: Request, body: Any) -> Ticket:
        """Who the engine replica's fair queue should weigh this request against, and how."""
        asked = request.headers.get(TRAFFIC_CLASS_HEADER)
        if asked is not None and asked not in TRAFFIC_CLASSES:
            raise OpenAIError(
                400,
                f"'{TRAFFIC_CLASS_HEADER}' must be 'interactive' or 'batch'.",
                param=TRAFFIC_CLASS_HEADER,
                code="invalid_value",
            )
        if getattr(body, "service_tier", None) == "flex":
            asked = "batch"
        if hasattr(body, "service_tier"):
            body.service_tier = None
        traffic_class = "batch" if "batch" in (asked, principal.traffic_class) else "interactive"
        return Ticket(tenant=principal.tenant, share=self._shares.share(principal.tenant), traffic_class=traffic_class)

    def _spec(self, model: str | None) -> ModelSpec:
        if model is None and len(self._specs) == 1:
            return next(iter(self._specs.values()))
        spec = self._specs.get(model or "")
        if spec is None:
            raise OpenAIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return spec

    async def _admit(
        self,
        principal: Principal,
        spec: ModelSpec,
        endpoint: str,
        prompt_tokens: list[int],
        max_tokens: int | None,
        n: int,
        prompt_param: str,
    ) -> tuple[Admitted, int]:
        """Reserve quota for every sequence the request can generate (prompts × n choices);
        return the admission and the completion tokens each sequence may make."""
        counter = self._counters[spec.id]
        for count in prompt_tokens:
            counter.check_fits(count, prompt_param)
        if endpoint != "embeddings" and max_tokens is not None and max_tokens < 1:
            raise OpenAIError(400, "'max_tokens' must be at least 1.", param="max_tokens", code="invalid_value")
        sequences = len(prompt_tokens) * n
        room = min(counter.context_length - count for count in prompt_tokens)
        per_sequence = room if max_tokens is None else min(max_tokens, room)
        total_prompt = sum(prompt_tokens)
        admitted = await self.metering.admit(
            principal,
            request_id=uuid.uuid4().hex,
            model=spec.id,
            endpoint=endpoint,
            prompt_tokens=total_prompt,
            max_tokens=per_sequence * sequences,
            context_length=total_prompt + room * sequences,
        )
        granted = admitted.max_tokens // sequences
        if endpoint != "embeddings" and granted < 1:
            await self.metering.settle(admitted, prompt_tokens=0, completion_tokens=0, status="client_error")
            raise OpenAIError(400, "Your per-request token cap leaves no room for this many completions.", param="n")
        return admitted, granted

    async def _generate(
        self, body: Any, method: str, admitted: Admitted, client_wants_usage: bool, ticket: Ticket
    ) -> Response:
        """Engine call and settlement. Every way out settles `admitted` exactly once: a request
        the engine never took is charged nothing; one it worked on, the tokens it read and made."""
        request_id = admitted.reservation.request_id
        tenant = admitted.reservation.tenant
        if hasattr(body, "request_id"):
            body.request_id = request_id
        self._governance.salt(body, tenant)
        headers = {REQUEST_ID_HEADER: request_id, **admitted.reservation.headers}
        upstream = None
        try:
            upstream = self._engines.open(body.model, method, body, ticket)
            first = await self.health.first_item(body.model, upstream.__anext__())
        except asyncio.CancelledError:  # the client left while the engine worked on the prompt
            _cancel(upstream)
            self.metering.settle_later(admitted, status="cancelled", completion_tokens=0)
            raise
        except BaseException as exc:  # engine down, or the call never left (e.g. not serialisable)
            _cancel(upstream)
            if engine_gone(exc):
                self.health.failed(body.model, exc)
            await self.metering.settle(admitted, prompt_tokens=0, completion_tokens=0, status="engine_error")
            log.error("engine call failed for request %s: %s", request_id, type(exc).__name__)
            raise EngineUnavailable(type(exc).__name__) from None
        item = first[0] if isinstance(first, list) and first else first

        if _is_error(item):
            _cancel(upstream)
            code = _status_of(item)
            status = "client_error" if code < 500 else "engine_error"
            await self.metering.settle(admitted, prompt_tokens=0, completion_tokens=0, status=status)
            if code >= 500:
                log.error("engine refused request %s with %d", request_id, code)
                raise EngineUnavailable(str(code))
            # 429: the replica's fair queue was full or the wait too long (nothing ran, nothing charged).
            retry = (
                {"Retry-After": str(retry_after_seconds(self._specs[body.model].fair_share.max_wait_seconds))}
                if code == 429
                else None
            )
            raise OpenAIError(
                code, item.error.message, type=item.error.type, param=getattr(item.error, "param", None), headers=retry
            )

        if _is_complete(first):  # a whole (non-streamed) answer
            usage = getattr(first, "usage", None)
            await self.metering.settle(
                admitted,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=(usage.completion_tokens or 0) if usage else None,
                status="ok",
            )
            self._governance.keep_response(request_id, tenant, body, first)
            return JSONResponse(first.model_dump(), headers=headers)

        async def chain():
            yield first
            async for more in upstream:
                yield more

        usage = StreamUsage()
        ended = False

        def end(status: str) -> None:
            """Once, however the stream ends: abort the engine call, settle what it did."""
            nonlocal ended
            if ended:
                return
            ended = True
            _cancel(upstream)
            if status == "ok" and usage.failed:
                status = "engine_error"
            self.metering.settle_later(
                admitted,
                prompt_tokens=usage.prompt_tokens if usage.reported else None,
                completion_tokens=usage.best_completion_tokens(),
                status=status,
            )

        async def events():
            status = "ok"
            try:
                async for event in relay(
                    chain(), usage, client_wants_usage=client_wants_usage, on_first_event=admitted.mark_first_token
                ):
                    admitted.completion_tokens = usage.best_completion_tokens()
                    yield event
            except (asyncio.CancelledError, GeneratorExit):  # the client left, or a stop (OpenStreams)
                status = "cancelled"
                raise
            except Exception as exc:  # engine died mid-stream: tell the client in-band, then end
                status = "engine_error"
                if engine_gone(exc):
                    self.health.failed(body.model, exc)
                log.error("stream for request %s failed: %s", request_id, type(exc).__name__)
                yield unavailable("The model stopped unexpectedly. Please retry.").sse()
                yield _DONE
            finally:
                end(status)

        stream = self._governance.tap(request_id, tenant, body, events())
        # The client may leave before the first event: the response, not the stream, ends it then.
        return self._streams.response(stream, on_close=lambda: end("cancelled"), headers=headers)


def model_card(spec: ModelSpec) -> dict[str, Any]:
    """A model as OpenAI's /v1/models lists it, plus what a client needs to size its requests."""
    return {
        "id": spec.id,
        "object": "model",
        "created": _created(spec),
        "owned_by": MODEL_OWNER,
        "permission": [],
        "metadata": {
            "model_id": spec.id,
            "input_modality": "text",
            "max_request_context_length": spec.context_length(),
        },
    }


def _created(spec: ModelSpec) -> int:
    """When the model's files were written: the same on every replica and node."""
    try:
        return int((spec.path / "config.json").stat().st_mtime)
    except OSError:
        return int(time.time())


def _cancel(upstream: EngineCall | None) -> None:
    """Abort the engine call; a call that already failed may raise again here, which must never
    keep its request from being settled."""
    if upstream is None:
        return
    try:
        upstream.cancel()
    except Exception as exc:
        log.debug("cancelling an engine call raised %s", type(exc).__name__)


def _is_error(item: Any) -> bool:
    """The engine's ErrorResponse (`{"error": {...}}`), whichever class carries it."""
    return isinstance(item, BaseModel) and isinstance(getattr(item, "error", None), BaseModel)


def _is_complete(first: Any) -> bool:
    """A whole answer: one response object, where a stream yields SSE text (or lists of it)."""
    return isinstance(first, BaseModel)


def _status_of(error: Any) -> int:
    try:
        code = int(error.error.code or 500)
    except (TypeError, ValueError):
        return 500
    return code if 400 <= code <= 599 else 500


def _materialize_messages(body: Any) -> None:
    """Messages whose `content` (or an assistant's `tool_calls`) came as an iterable are held by
    pydantic as one-shot iterators, which can be neither pickled nor read twice: make them lists.
    A value that cannot be iterated is the client's mistake."""
    for i, message in enumerate(body.messages):
        if not isinstance(message, dict):
            body.messages[i] = message = message.model_dump()
        fields = ("content", "tool_calls") if message.get("role") == "assistant" else ("content",)
        for name in fields:
            value = message.get(name)
            if value is None or isinstance(value, str | list):
                continue
            try:
                message[name] = list(value)
            except (TypeError, ValueError):
                what = "a string, null or a list of content parts" if name == "content" else "a list of tool calls"
                raise OpenAIError(
                    400,
                    f"Validating messages' `{name}` failed: it must be {what}.",
                    param="messages",
                    code="invalid_value",
                ) from None


def _ask_for_stream_usage(data: dict, wants_usage: list[bool]) -> None:
    """On the raw body, before it is parsed: ask the engine for a final usage chunk on every
    stream. `wants_usage` gets False when the client sent no stream options (so the usage chunk
    is not passed on); a client's own options are left for parsing and read by `_usage_wanted`."""
    if data.get("stream") and data.get("stream_options") is None:
        data["stream_options"] = {"include_usage": True}
        wants_usage.append(False)


def _usage_wanted(body: Any, wants_usage: list[bool]) -> bool:
    """Whether the client asked for usage (always true without a stream); the engine is asked
    for it on every stream."""
    if not body.stream:
        return True
    if wants_usage:
        return wants_usage[0]
    options = body.stream_options
    client_wants_usage = bool(options.include_usage)
    options.include_usage = True
    return client_wants_usage
