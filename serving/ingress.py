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
from agencyllm.quotas.db import Database, assert_schema_current
from agencyllm.quotas.ledger import Ledger
from agencyllm.serving.config import ModelSpec, ServingConfig
from agencyllm.serving.errors import OpenAIError
from agencyllm.serving.governance import Governance, retention_job
from agencyllm.serving.http import parse_body
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

ENDPOINTS = {
    "chat": lambda app: app.post("/v1/chat/completions", tags=["openai"]),
    "completions": lambda app: app.post("/v1/completions", tags=["openai"]),
    "embeddings": lambda app: app.post("/v1/embeddings", tags=["openai"]),
    "models": lambda app: app.get("/v1/models", tags=["openai"]),
    "model_data": lambda app: app.get("/v1/models/{model:path}", tags=["openai"]),
    "healthz": lambda app: app.get("/healthz", tags=["health"]),
    "readyz": lambda app: app.get("/readyz", tags=["health"]),
}


class AgencyIngress(OpenAiIngress):
    async def __init__(self, llm_deployments, model_cards, *, settings: Settings, serving: ServingConfig) -> None:
        super().__init__(llm_deployments, model_cards)
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
        await self._governance.drain()
        await self._ledger_audit.aclose()
        await self._authenticator.aclose()
        await self._database.dispose()

    # ---- OpenAI routes -------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        principal = await self._authenticate(request)
        body = await parse_body(request, ChatCompletionRequest)
        spec = self._spec(body.model)
        prompt_tokens = self._counters[spec.id].chat(body.messages)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        body = _sanitized(body)
        admitted, per_sequence = await self._admit(principal, spec, "chat", [prompt_tokens], requested, body.n or 1, "messages")
        body.model = spec.id
        body.max_completion_tokens, body.max_tokens = per_sequence, None
        client_wants_usage = _force_stream_usage(body)
        return await self._generate(body, "chat", admitted, client_wants_usage)

    async def completions(self, request: Request) -> Response:
        principal = await self._authenticate(request)
        body = await parse_body(request, CompletionRequest)
        spec = self._spec(body.model)
        prompt_tokens = self._counters[spec.id].prompts(body.prompt)
        n = body.n or 1
        admitted, body.max_tokens = await self._admit(principal, spec, "completions", prompt_tokens, body.max_tokens, n, "prompt")
        body.model = spec.id
        client_wants_usage = _force_stream_usage(body)
        return await self._generate(body, "completions", admitted, client_wants_usage)

    async def embeddings(self, request: Request) -> Response:
        principal = await self._authenticate(request)
        body = await parse_body(request, _EMBEDDING_REQUEST)
        spec = self._spec(body.model)
        if spec.task != "embed":
            raise OpenAIError(400, f"Model '{spec.id}' does not serve embeddings.", param="model", code="model_not_supported")
        counter = self._counters[spec.id]
        prompt_tokens = [counter.chat(body.messages)] if hasattr(body, "messages") else counter.prompts(body.input)
        admitted, _ = await self._admit(principal, spec, "embeddings", prompt_tokens, 0, 1, "input")
        body.model = spec.id
        return await self._generate(body, "embeddings", admitted, client_wants_usage=True)

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

    async def _generate(self, body: Any, method: str, admitted: Admitted, client_wants_usage: bool) -> Response:
        request_id = admitted.reservation.request_id
        tenant = admitted.reservation.tenant
        if hasattr(body, "request_id"):
            body.request_id = request_id
        self._governance.salt(body, tenant)
        headers = {REQUEST_ID_HEADER: request_id, **admitted.reservation.headers}
        upstream = None
        try:
            upstream = getattr(self._get_configured_serve_handle(body.model), method).remote(body, None)
            first = await upstream.__anext__()
        except BaseException as exc:
            if upstream is not None:
                upstream.cancel()
            status = "cancelled" if isinstance(exc, asyncio.CancelledError) else "engine_error"
            await self._metering.settle(admitted, prompt_tokens=0, completion_tokens=0, status=status)
            if status == "cancelled":
                raise
            log.error("engine call failed for request %s: %s", request_id, type(exc).__name__)
            raise OpenAIError(503, "The model is temporarily unavailable. Please retry.", type="service_unavailable") from None
        item = first[0] if isinstance(first, list) and first else first

        if isinstance(item, ErrorResponse):
            upstream.cancel()
            code = int(item.error.code or 500)
            await self._metering.settle(admitted, prompt_tokens=0, completion_tokens=0, status="client_error" if code < 500 else "engine_error")
            raise OpenAIError(code if code < 500 else 503, item.error.message, type=item.error.type, param=getattr(item.error, "param", None))

        if isinstance(item, (*NON_STREAMING_RESPONSE_TYPES, EmbeddingResponse)):
            usage = item.usage
            await self._metering.settle(
                admitted,
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=(usage.completion_tokens or 0) if usage else 0,
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
                    yield event
            except (asyncio.CancelledError, GeneratorExit):
                status = "cancelled"
                raise
            except Exception as exc:  # engine died mid-stream: tell the client in-band, then end
                status = "engine_error"
                log.error("stream for request %s failed: %s", request_id, type(exc).__name__)
                yield OpenAIError(503, "The model stopped unexpectedly. Please retry.", type="service_unavailable").sse()
                yield _DONE
            finally:
                upstream.cancel()
                if status == "ok" and usage.failed:
                    status = "engine_error"
                self._metering.settle_later(
                    admitted,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.best_completion_tokens(),
                    status=status,
                )

        return StreamingResponse(self._governance.tap(request_id, tenant, body, events()), media_type="text/event-stream", headers=headers)


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
