"""The public ingress: one straight line per model call.

    authenticate → parse → count prompt → admit (reserve quota) → engine → settle usage

It reuses Ray Serve LLM's `OpenAiIngress` (deployment handles, model cards) and vLLM's OpenAI
protocol models; it adds identity, quotas, usage accounting and the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from fastapi import Request
from pydantic import TypeAdapter
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from ray.llm._internal.serve.core.ingress.utils import NON_STREAMING_RESPONSE_TYPES, _sanitize_chat_completion_request
from starlette.responses import JSONResponse, Response, StreamingResponse
from vllm.entrypoints.generate.base.protocol import StreamOptions

from agencyllm.auth.oidc import OIDCVerifier
from agencyllm.auth.principal import Principal
from agencyllm.quotas import admin as store
from agencyllm.quotas.db import Database, assert_schema_current
from agencyllm.quotas.models import TRAFFIC_CLASSES
from agencyllm.quotas.ledger import Ledger
from agencyllm.serving.config import ModelSpec, ServingConfig
from agencyllm.serving.engine_health import EngineHealth, engine_gone
from agencyllm.serving.admin.schemas import documented_errors as _errors
from agencyllm.serving.errors import EngineUnavailable, OpenAIError, unavailable
from agencyllm.serving.fairshare import TenantShares, Ticket, retry_after_seconds
from agencyllm.serving.governance import Governance, retention_job
from agencyllm.serving.http import parse_body
from agencyllm.serving.inputs import check_openai_params
from agencyllm.serving.identity import Authenticator
from agencyllm.serving.metering import Admitted, Metering
from agencyllm.serving.settings import Settings
from agencyllm.serving.streaming import StreamUsage, relay
from agencyllm.serving.tokens import PromptCounter

log = logging.getLogger("agencyllm.ingress")

_EMBEDDING_REQUEST = TypeAdapter(EmbeddingRequest)
_DONE = "data: [DONE]\n\n"
# Ray Serve already answers with its own `x-request-id`; this one names the usage-ledger row.
REQUEST_ID_HEADER = "x-agencyllm-request-id"
# A caller may run a request as batch work (docs/quotas.md, "Fair sharing"); so does OpenAI's
# `service_tier: "flex"`. Nothing lets a batch key's request run as interactive.
TRAFFIC_CLASS_HEADER = "x-agencyllm-traffic-class"




_CALL_ERRORS = _errors(400, 401, 403, 404, 413, 429, 503)


def _body(*required: str, **properties: dict) -> dict:
    """The documented part of a request body (vLLM accepts more; unknown fields are ignored)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "required": list(required), "properties": properties}}},
        }
    }


_SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "n": {"type": ["integer", "null"], "minimum": 1},
    "stream": {"type": ["boolean", "null"]},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "seed": {"type": ["integer", "null"]},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
}
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}},
}
_TEXTS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}

ENDPOINTS = {
    "chat": lambda app: app.post(
        "/v1/chat/completions", tags=["openai"], summary="Chat completion (OpenAI)", responses=_CALL_ERRORS,
        openapi_extra=_body("model", "messages", messages={"type": "array", "items": _MESSAGE}, **_SAMPLING),
    ),
    "completions": lambda app: app.post(
        "/v1/completions", tags=["openai"], summary="Text completion (OpenAI)", responses=_CALL_ERRORS,
        openapi_extra=_body("model", "prompt", prompt=_TEXTS, **_SAMPLING),
    ),
    "embeddings": lambda app: app.post(
        "/v1/embeddings", tags=["openai"], summary="Embeddings (OpenAI)", responses=_CALL_ERRORS,
        openapi_extra=_body("model", "input", model={"type": "string"}, input=_TEXTS),
    ),
    "models": lambda app: app.get("/v1/models", tags=["openai"], summary="List models", responses=_errors(401, 403, 503)),
    "model_data": lambda app: app.get(
        "/v1/models/{model:path}", tags=["openai"], summary="Read a model", responses=_errors(401, 403, 404, 503)
    ),
    "healthz": lambda app: app.get("/healthz", tags=["health"], summary="Liveness: the ingress answers"),
    "readyz": lambda app: app.get(
        "/readyz", tags=["health"], summary="Readiness: database and every engine answer",
        responses={503: {"description": "Not ready: `checks` says what is down"}},
    ),
}


class AgencyIngress(OpenAiIngress):
    async def __init__(self, llm_deployments, model_cards, *, settings: Settings, serving: ServingConfig) -> None:
        super().__init__(llm_deployments, model_cards)
        self._settings = settings
        self._specs: dict[str, ModelSpec] = {m.id: m for m in serving.models}
        self._counters = {m.id: PromptCounter(m.path, m.context_length()) for m in serving.models}
        self._database = Database(settings.database_url.get_secret_value())
        await assert_schema_current(self._database)
        ledger = Ledger(self._database, timezone=settings.quota_timezone, lease_seconds=settings.reservation_lease_seconds,
                        retention=retention_job(settings, self._database))
        self._ledger_audit = ledger.audit
        self._governance = await Governance.load(self._database)
        verifier = (
            OIDCVerifier(settings.oidc_issuer, settings.oidc_audience, leeway=settings.oidc_leeway_seconds)
            if settings.oidc_issuer
            else None
        )
        self._authenticator = Authenticator(settings, self._database, verifier)
        self._metering = Metering(ledger)
        self._metering.start()
        self._engines = EngineHealth(self._probe_engine, has_replica=self._has_running_replica)
        self._shares = TenantShares(self._fetch_shares)
        await self._shares.refresh()
        self._app_state = {"settings": settings, "database": self._database, "ledger": ledger, "authenticator": self._authenticator}

    def _set_asgi_app(self, app) -> None:
        # Serve hands the replica its own copy of the FastAPI app after __init__ (Ray 2.60,
        # ASGIAppReplicaWrapper): the admin routes' dependencies read their services from it.
        for name, value in self._app_state.items():
            setattr(app.state, name, value)
        super()._set_asgi_app(app)

    async def __del__(self) -> None:
        # Replica shutdown: write the ledger rows still being settled, then let go of connections.
        await self._metering.drain()
        await self._engines.aclose()
        await self._governance.drain()
        await self._ledger_audit.aclose()
        await self._authenticator.aclose()
        await self._database.dispose()

    # ---- OpenAI routes -------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        principal = await self._authenticate(request)
        body = await parse_body(request, ChatCompletionRequest, check=self._checks("chat"))
        spec = self._spec(body.model)
        self._require_engine(spec)
        ticket = self._ticket(principal, request, body)
        prompt_tokens = self._counters[spec.id].chat(body.messages)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        body = _sanitized(body)
        admitted, per_sequence = await self._admit(principal, spec, "chat", [prompt_tokens], requested, body.n or 1, "messages")
        body.model = spec.id
        body.max_completion_tokens, body.max_tokens = per_sequence, None
        client_wants_usage = _force_stream_usage(body)
        return await self._generate(body, "chat", admitted, client_wants_usage, ticket)

    async def completions(self, request: Request) -> Response:
        principal = await self._authenticate(request)
        body = await parse_body(request, CompletionRequest, check=self._checks("completions"))
        spec = self._spec(body.model)
        self._require_engine(spec)
        ticket = self._ticket(principal, request, body)
        prompt_tokens = self._counters[spec.id].prompts(body.prompt)
        n = body.n or 1
        admitted, body.max_tokens = await self._admit(principal, spec, "completions", prompt_tokens, body.max_tokens, n, "prompt")
        body.model = spec.id
        client_wants_usage = _force_stream_usage(body)
        return await self._generate(body, "completions", admitted, client_wants_usage, ticket)

    async def embeddings(self, request: Request) -> Response:
        principal = await self._authenticate(request)
        body = await parse_body(request, _EMBEDDING_REQUEST, check=self._checks("embeddings"))
        spec = self._spec(body.model)
        ticket = self._ticket(principal, request, body)
        if spec.task != "embed":
            raise OpenAIError(400, f"Model '{spec.id}' does not serve embeddings.", param="model", code="model_not_supported")
        self._require_engine(spec)
        counter = self._counters[spec.id]
        prompt_tokens = [counter.chat(body.messages)] if hasattr(body, "messages") else counter.prompts(body.input)
        admitted, _ = await self._admit(principal, spec, "embeddings", prompt_tokens, 0, 1, "input")
        body.model = spec.id
        return await self._generate(body, "embeddings", admitted, True, ticket)

    async def models(self, request: Request) -> Response:
        await self._authenticate(request)
        return JSONResponse((await super().models()).model_dump())

    async def model_data(self, model: str, request: Request) -> Response:
        await self._authenticate(request)
        card = await self.model(model)
        if card is None:
            raise OpenAIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return JSONResponse(card.model_dump())

    # ---- health --------------------------------------------------------------------------

    async def healthz(self) -> dict:
        return {"status": "ok"}

    async def readyz(self) -> Response:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self._database.ping(), timeout=5)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unavailable ({type(exc).__name__})"
        for model_id, handle in self._default_serve_handles.items():
            try:
                await asyncio.wait_for(handle.check_health.remote(), timeout=10)
                checks[f"model:{model_id}"] = "ok"
            except Exception as exc:
                checks[f"model:{model_id}"] = f"unavailable ({type(exc).__name__})"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503)

    # ---- the request path ----------------------------------------------------------------

    async def _authenticate(self, request: Request) -> Principal:
        principal = await self._authenticator.authenticate(request.headers.get("authorization"))
        if not principal.may_call_models:
            raise OpenAIError(403, "Your account lacks the role needed to call models.")
        return principal

    def _require_engine(self, spec: ModelSpec) -> None:
        if self._engines.is_down(spec.id):
            raise EngineUnavailable(spec.id)

    async def _probe_engine(self, model: str) -> None:
        # The unary handle: the configured one streams, and check_health is not a generator.
        await self._default_serve_handles[model].check_health.remote()

    async def _has_running_replica(self, model: str) -> bool:
        """Whether Serve's controller counts a RUNNING replica of the model's engine."""
        from ray import serve

        handle = self._default_serve_handles[model]
        status = await asyncio.to_thread(serve.status)
        deployment = status.applications[handle.app_name].deployments[handle.deployment_name]
        return any(str(getattr(state, "value", state)) == "RUNNING" and count > 0 for state, count in deployment.replica_states.items())

    def _checks(self, endpoint: str):
        settings = self._settings

        def check(data: dict) -> None:
            check_openai_params(
                data, endpoint=endpoint, max_choices=settings.max_choices, max_prompts=settings.max_prompts_per_request
            )

        return check

    async def _fetch_shares(self) -> dict[str, float]:
        return await store.tenant_shares(await self._database.pool())

    def _ticket(self, principal: Principal, request: Request, body: Any) -> Ticket:
        """Who the engine replica's fair queue should weigh this request against, and how."""
        asked = request.headers.get(TRAFFIC_CLASS_HEADER)
        if asked is not None and asked not in TRAFFIC_CLASSES:
            raise OpenAIError(400, f"'{TRAFFIC_CLASS_HEADER}' must be 'interactive' or 'batch'.", param=TRAFFIC_CLASS_HEADER, code="invalid_value")
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
        admitted = await self._metering.admit(
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
            await self._metering.settle(admitted, prompt_tokens=0, completion_tokens=0, status="client_error")
            raise OpenAIError(400, "Your per-request token cap leaves no room for this many completions.", param="n")
        return admitted, granted

    async def _generate(self, body: Any, method: str, admitted: Admitted, client_wants_usage: bool, ticket: Ticket) -> Response:
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
            upstream = getattr(self._get_configured_serve_handle(body.model), method).remote(body, None, ticket)
            first = await self._engines.first_item(body.model, upstream.__anext__())
        except asyncio.CancelledError:  # the client left while the engine worked on the prompt
            _cancel(upstream)
            self._metering.settle_later(admitted, status="cancelled", completion_tokens=0)
            raise
        except BaseException as exc:  # engine down, or the call never left (e.g. not serialisable)
            _cancel(upstream)
            if engine_gone(exc):
                self._engines.failed(body.model, exc)
            await self._metering.settle(admitted, prompt_tokens=0, completion_tokens=0, status="engine_error")
            log.error("engine call failed for request %s: %s", request_id, type(exc).__name__)
            raise EngineUnavailable(type(exc).__name__) from None
        item = first[0] if isinstance(first, list) and first else first

        if isinstance(item, ErrorResponse):
            _cancel(upstream)
            code = _status_of(item)
            status = "client_error" if code < 500 else "engine_error"
            await self._metering.settle(admitted, prompt_tokens=0, completion_tokens=0, status=status)
            if code >= 500:
                log.error("engine refused request %s with %d", request_id, code)
                raise EngineUnavailable(str(code))
            # 429: the replica's fair queue was full or the wait too long (nothing ran, nothing charged).
            retry = {"Retry-After": str(retry_after_seconds(self._specs[body.model].fair_share.max_wait_seconds))} if code == 429 else None
            raise OpenAIError(code, item.error.message, type=item.error.type, param=getattr(item.error, "param", None), headers=retry)

        if isinstance(item, (*NON_STREAMING_RESPONSE_TYPES, EmbeddingResponse)):
            usage = item.usage
            await self._metering.settle(
                admitted,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=(usage.completion_tokens or 0) if usage else None,
                status="ok",
            )
            self._governance.keep_response(request_id, tenant, body, item)
            return JSONResponse(item.model_dump(), headers=headers)

        async def chain():
            yield first
            async for more in upstream:
                yield more

        usage = StreamUsage()

        async def events():
            status = "ok"
            try:
                async for event in relay(chain(), usage, client_wants_usage=client_wants_usage, on_first_event=admitted.mark_first_token):
                    admitted.completion_tokens = usage.best_completion_tokens()
                    yield event
            except (asyncio.CancelledError, GeneratorExit):
                status = "cancelled"
                raise
            except Exception as exc:  # engine died mid-stream: tell the client in-band, then end
                status = "engine_error"
                if engine_gone(exc):
                    self._engines.failed(body.model, exc)
                log.error("stream for request %s failed: %s", request_id, type(exc).__name__)
                yield unavailable("The model stopped unexpectedly. Please retry.").sse()
                yield _DONE
            finally:
                _cancel(upstream)
                if status == "ok" and usage.failed:
                    status = "engine_error"
                self._metering.settle_later(
                    admitted,
                    prompt_tokens=usage.prompt_tokens if usage.reported else None,
                    completion_tokens=usage.best_completion_tokens(),
                    status=status,
                )

        return StreamingResponse(self._governance.tap(request_id, tenant, body, events()), media_type="text/event-stream", headers=headers)


def _cancel(upstream: Any) -> None:
    """Abort the engine call; a call that already failed may raise again here, which must never
    keep its request from being settled."""
    if upstream is None:
        return
    try:
        upstream.cancel()
    except Exception as exc:
        log.debug("cancelling an engine call raised %s", type(exc).__name__)


def _status_of(error: ErrorResponse) -> int:
    try:
        code = int(error.error.code or 500)
    except (TypeError, ValueError):
        return 500
    return code if 400 <= code <= 599 else 500


def _sanitized(body: ChatCompletionRequest) -> ChatCompletionRequest:
    """Ray's fix-up that makes message iterables picklable; its ValueError is the client's mistake."""
    try:
        return _sanitize_chat_completion_request(body)
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param="messages", code="invalid_value") from None


def _force_stream_usage(body: Any) -> bool:
    """Ask the engine for usage on every stream; return whether the client asked for it."""
    if not body.stream:
        return True
    options = body.stream_options
    client_wants_usage = bool(options and options.include_usage)
    if options is None:
        body.stream_options = StreamOptions(include_usage=True)
    else:
        options.include_usage = True
    return client_wants_usage
