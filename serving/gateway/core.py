"""The gateway's machinery, shared by its routes (serving/gateway/pipeline.py), the Responses API
and the batch worker: services, authentication, the model's spec and prompt counter, admission,
the engine call and its settlement (`generate`), and the stop that ends streams in band."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Protocol, Self

from fastapi import Request
from pydantic import TypeAdapter, ValidationError
from starlette.responses import JSONResponse, Response

from agencyllm.auth.principal import Principal
from agencyllm.quotas import store
from agencyllm.quotas.ledger.metrics import QuotaMetrics
from agencyllm.serving.config import ModelSpec, ServingConfig
from agencyllm.serving.gateway.bodies import model_card
from agencyllm.serving.gateway.engine_health import EngineHealth
from agencyllm.serving.gateway.engines import (
    EngineCall,
    Engines,
    cancel,
    client_error,
    is_complete,
    is_error,
    status_of,
)
from agencyllm.serving.gateway.errors import EngineUnavailable, OpenAIError, unavailable, validation_error
from agencyllm.serving.gateway.fairshare import (
    TRAFFIC_CLASS_HEADER,
    TenantShares,
    Ticket,
    requested_class,
    retry_after_seconds,
)
from agencyllm.serving.gateway.guards import parse_body
from agencyllm.serving.gateway.metering import Admitted, Metering
from agencyllm.serving.gateway.services import Services
from agencyllm.serving.gateway.streaming import OpenStreams, StreamUsage, relay
from agencyllm.serving.gateway.tokens import PromptCounter
from agencyllm.serving.settings import Settings

log = logging.getLogger("agencyllm.ingress")


class AnswerShape(Protocol):
    """Another API's answer made from the engine's chat answer (whole, or its SSE events)."""

    async def whole(self, chat: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, events: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]: ...


_DONE = "data: [DONE]\n\n"
# Ray Serve already answers with its own `x-request-id`; this one names the usage-ledger row.
REQUEST_ID_HEADER = "x-agencyllm-request-id"
STOPPING_MESSAGE = "The service is restarting. Please retry."
# `stop_serving` waits at most this for the streams to end, and as long again for their rows.
STOP_SECONDS = 10.0


class GatewayCore:
    def __init__(self, services: Services, serving: ServingConfig, engines: Engines) -> None:
        self.services = services
        self.settings = services.settings
        self.serving = serving
        self._engines = engines
        self._requests = engines.requests
        self._specs: dict[str, ModelSpec] = {m.id: m for m in serving.models}
        self._counters = {m.id: PromptCounter(m.path, m.context_length(), m.chat_template) for m in serving.models}
        self._cards = {m.id: model_card(m) for m in serving.models}
        self._governance = services.governance
        self.metering = Metering(services.ledger)
        self.health = EngineHealth(
            engines.check_health, has_replica=engines.has_running_replica, is_gone=engines.is_gone
        )
        self._shares = TenantShares(self._fetch_shares)
        self._streams = OpenStreams(farewell=[unavailable(STOPPING_MESSAGE).sse(), _DONE])

    @classmethod
    async def start(
        cls, settings: Settings, serving: ServingConfig, engines: Engines, *, metrics: QuotaMetrics | None = None
    ) -> Self:
        """Build the services and the pipeline; `metrics` is where the quota ledger counts."""
        services = await Services.start(settings, metrics=metrics)
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

    # ---- the request path ----------------------------------------------------------------

    async def authenticate(self, request: Request) -> Principal:
        principal = await self.services.authenticator.authenticate(
            request.headers.get("authorization"), request.headers
        )
        if not principal.may_call_models:
            raise OpenAIError(403, "Your account lacks the role needed to call models.")
        return principal

    def require_engine(self, spec: ModelSpec) -> None:
        if self._streams.stopping:
            raise unavailable(STOPPING_MESSAGE)
        if self.health.is_down(spec.id):
            raise EngineUnavailable(spec.id)

    async def answer_uncharged(self, body: Any, method: str, ticket: Ticket) -> dict[str, Any]:
        """The engine's whole answer to a batch line whose interrupted attempt was charged already
        (its one ledger row is that attempt's): neither admitted nor settled again."""
        body.model = self.spec(body.model).id
        self._governance.salt(body, ticket.tenant)
        upstream: EngineCall | None = None
        try:
            upstream = self._engines.open(body.model, method, body, ticket)
            first = await self.health.first_item(body.model, upstream.__anext__())
        except BaseException as exc:
            cancel(upstream)
            self.health.call_failed(body.model, exc)
            raise EngineUnavailable(type(exc).__name__) from None
        item = first[0] if isinstance(first, list) and first else first
        if is_error(item) or not is_complete(first):
            cancel(upstream)
            code = status_of(item) if is_error(item) else 503
            raise OpenAIError(code, item.error.message if is_error(item) else "The engine did not answer whole.")
        payload: dict[str, Any] = first.model_dump()
        return payload

    def counter(self, model: str) -> PromptCounter:
        return self._counters[model]

    def batch_ticket(self, tenant: str) -> Ticket:
        """A batch line's ticket: the batch traffic class, behind interactive requests."""
        return Ticket(tenant=tenant, share=self._shares.share(tenant), traffic_class="batch")

    def chat_request(self, data: dict[str, Any], endpoint: str = "chat") -> Any:
        """A body built here (the Responses API's) or read from a batch line, as the engine's
        request model for `endpoint` (chat or embeddings)."""
        try:
            return getattr(self._requests, endpoint).validate_python(data)
        except self._requests.client_errors as exc:
            raise client_error(exc) from None
        except ValidationError as exc:
            raise validation_error(exc.errors(include_url=False, include_input=False)) from None

    async def _parse(self, request: Request, model: TypeAdapter[Any], check: Callable[[dict[str, Any]], None]) -> Any:
        """The body as the engine's request `model`; a client error its validators raise is a 400."""
        try:
            return await parse_body(request, model, check=check)
        except self._requests.client_errors as exc:
            raise client_error(exc) from None
        except (TypeError, KeyError, AttributeError, IndexError):
            # The engine's request models pre-process the raw JSON before validating it, and some of
            # that code trips over shapes it does not expect: still the client's body, never a 500.
            raise OpenAIError(
                400, "The request body does not have the shape this endpoint expects.", code="invalid_request_body"
            ) from None

    async def _fetch_shares(self) -> dict[str, float]:
        return await store.tenant_shares(await self.services.database.pool())

    def ticket(self, principal: Principal, request: Request, body: Any) -> Ticket:
        """Who the engine replica's fair queue should weigh this request against, and how."""
        traffic_class = requested_class(request.headers.get(TRAFFIC_CLASS_HEADER), body, principal.traffic_class)
        tenant = principal.tenant or ""  # a caller without a tenant is refused at admission
        return Ticket(tenant=tenant, share=self._shares.share(tenant), traffic_class=traffic_class)

    def spec(self, model: str | None) -> ModelSpec:
        if model is None and len(self._specs) == 1:
            return next(iter(self._specs.values()))
        spec = self._specs.get(model or "")
        if spec is None:
            raise OpenAIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return spec

    async def admit(
        self,
        principal: Principal,
        spec: ModelSpec,
        endpoint: str,
        prompt_tokens: list[int],
        max_tokens: int | None,
        n: int,
        prompt_param: str,
        request_id: str | None = None,
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
            request_id=request_id or uuid.uuid4().hex,
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

    async def generate(
        self,
        body: Any,
        method: str,
        admitted: Admitted,
        client_wants_usage: bool,
        ticket: Ticket,
        shape: AnswerShape | None = None,
    ) -> Response:
        """Engine call and settlement. Every way out settles `admitted` exactly once: a request
        the engine never took is charged nothing; one it worked on, the tokens it read and made.
        `shape` turns the engine's answer into another API's (the Responses API)."""
        request_id = admitted.reservation.request_id
        tenant = admitted.reservation.tenant
        if hasattr(body, "request_id"):
            body.request_id = request_id
        self._governance.salt(body, tenant)
        headers = {REQUEST_ID_HEADER: request_id, **admitted.reservation.headers}
        upstream: EngineCall | None = None
        try:
            upstream = self._engines.open(body.model, method, body, ticket)
            first = await self.health.first_item(body.model, upstream.__anext__())
        except asyncio.CancelledError:  # the client left while the engine worked on the prompt
            cancel(upstream)
            self.metering.settle_later(admitted, status="cancelled", completion_tokens=0)
            raise
        except BaseException as exc:  # engine down, or the call never left (e.g. not serialisable)
            cancel(upstream)
            self.health.call_failed(body.model, exc)
            await self.metering.settle(admitted, prompt_tokens=0, completion_tokens=0, status="engine_error")
            log.error("engine call failed for request %s: %s", request_id, type(exc).__name__)
            raise EngineUnavailable(type(exc).__name__) from None
        item = first[0] if isinstance(first, list) and first else first

        if is_error(item):
            cancel(upstream)
            code = status_of(item)
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

        if is_complete(first):  # a whole (non-streamed) answer
            usage = getattr(first, "usage", None)
            await self.metering.settle(
                admitted,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=(usage.completion_tokens or 0) if usage else None,
                status="ok",
            )
            self._governance.keep_response(request_id, tenant, body, first)
            payload = first.model_dump() if shape is None else await shape.whole(first.model_dump())
            return JSONResponse(payload, headers=headers)

        async def chain(call: EngineCall) -> AsyncIterator[Any]:
            yield first
            async for more in call:
                yield more

        items = chain(upstream)

        usage = StreamUsage()
        ended = False

        def end(status: str) -> None:
            """Once, however the stream ends: abort the engine call, settle what it did."""
            nonlocal ended
            if ended:
                return
            ended = True
            cancel(upstream)
            if status == "ok" and usage.failed:
                status = "engine_error"
            self.metering.settle_later(
                admitted,
                prompt_tokens=usage.prompt_tokens if usage.reported else None,
                completion_tokens=usage.best_completion_tokens(),
                status=status,
            )

        def finished_or_cancelled() -> str:
            # A client that leaves once it has [DONE] (the SDKs close at once) had the whole answer.
            return "ok" if usage.done else "cancelled"

        async def events() -> AsyncGenerator[str, None]:
            status = "ok"
            try:
                async for event in relay(
                    items, usage, client_wants_usage=client_wants_usage, on_first_event=admitted.mark_first_token
                ):
                    admitted.completion_tokens = usage.best_completion_tokens()
                    yield event
            except (asyncio.CancelledError, GeneratorExit):  # the client left, or a stop (OpenStreams)
                status = finished_or_cancelled()
                raise
            except Exception as exc:  # engine died mid-stream: tell the client in-band, then end
                status = "engine_error"
                self.health.call_failed(body.model, exc)
                log.error("stream for request %s failed: %s", request_id, type(exc).__name__)
                yield unavailable("The model stopped unexpectedly. Please retry.").sse()
                yield _DONE
            finally:
                end(status)

        stream = self._governance.tap(request_id, tenant, body, events())
        if shape is not None:
            stream = shape.stream(stream)
        # The client may leave before the first event: the response, not the stream, ends it then.
        return self._streams.response(stream, on_close=lambda: end(finished_or_cancelled()), headers=headers)
