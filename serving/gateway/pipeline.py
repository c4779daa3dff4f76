"""The request pipeline, built once, as plain Python: no Ray here.

    authenticate → parse/check → count prompt → admit (reserve quota) → engine → settle usage

`Gateway.start(settings, serving, engines)` builds the services (`services.Services`: database,
ledger, metering, authenticator, governance, fair shares, prompt counters) once; `aclose()` settles
what is in flight. Engines are reached through the `engines.Engines` port: Ray Serve deployment
handles in production (`serving/rayserve/ingress.py`), a fake in the unit tests."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from agencyllm.auth.principal import Principal
from agencyllm.serving.gateway.bodies import body_checks, materialize_messages, usage_wanted
from agencyllm.serving.gateway.core import AnswerShape, GatewayCore
from agencyllm.serving.gateway.errors import OpenAIError
from agencyllm.serving.gateway.fairshare import Ticket
from agencyllm.serving.gateway.tools import tool_definitions


class Gateway(GatewayCore):
    """The OpenAI routes and health checks, each a straight line through `GatewayCore`."""

    async def chat(self, request: Request) -> Response:
        principal = await self.authenticate(request)
        wants_usage: list[bool] = []
        body = await self._parse(request, self._requests.chat, body_checks(self.settings, "chat", wants_usage))
        ticket = self.ticket(principal, request, body)
        return await self.run_chat(principal, body, ticket, usage_wanted(body, wants_usage))

    async def run_chat(
        self,
        principal: Principal,
        body: Any,
        ticket: Ticket,
        wants_usage: bool,
        *,
        endpoint: str = "chat",
        prompt_param: str = "messages",
        request_id: str | None = None,
        shape: AnswerShape | None = None,
    ) -> Response:
        """A parsed chat request, admitted for `principal` (as `endpoint` in the ledger, under
        `request_id` if given: a batch line's), answered by the engine and settled."""
        spec = self.spec(body.model)
        self.require_engine(spec)
        prompt_tokens = self._counters[spec.id].chat(body.messages, tools=tool_definitions(spec, body))
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        materialize_messages(body)
        admitted, per_sequence = await self.admit(
            principal, spec, endpoint, [prompt_tokens], requested, body.n or 1, prompt_param, request_id=request_id
        )
        body.model = spec.id
        body.max_completion_tokens, body.max_tokens = per_sequence, None
        return await self.generate(body, "chat", admitted, wants_usage, ticket, shape)

    async def completions(self, request: Request) -> Response:
        principal = await self.authenticate(request)
        wants_usage: list[bool] = []
        body = await self._parse(
            request, self._requests.completions, body_checks(self.settings, "completions", wants_usage)
        )
        spec = self.spec(body.model)
        self.require_engine(spec)
        ticket = self.ticket(principal, request, body)
        prompt_tokens = self._counters[spec.id].prompts(body.prompt)
        n = body.n or 1
        admitted, body.max_tokens = await self.admit(
            principal, spec, "completions", prompt_tokens, body.max_tokens, n, "prompt"
        )
        body.model = spec.id
        return await self.generate(body, "completions", admitted, usage_wanted(body, wants_usage), ticket)

    async def embeddings(self, request: Request) -> Response:
        principal = await self.authenticate(request)
        body = await self._parse(request, self._requests.embeddings, body_checks(self.settings, "embeddings"))
        return await self.run_embeddings(principal, body, self.ticket(principal, request, body))

    async def run_embeddings(
        self, principal: Principal, body: Any, ticket: Ticket, *, request_id: str | None = None
    ) -> Response:
        spec = self.spec(body.model)
        if spec.task != "embed":
            raise OpenAIError(
                400, f"Model '{spec.id}' does not serve embeddings.", param="model", code="model_not_supported"
            )
        self.require_engine(spec)
        counter = self._counters[spec.id]
        prompt_tokens = [counter.chat(body.messages)] if hasattr(body, "messages") else counter.prompts(body.input)
        admitted, _ = await self.admit(
            principal, spec, "embeddings", prompt_tokens, 0, 1, "input", request_id=request_id
        )
        body.model = spec.id
        return await self.generate(body, "embeddings", admitted, True, ticket)

    async def models(self, request: Request) -> Response:
        await self.authenticate(request)
        return JSONResponse({"object": "list", "data": list(self._cards.values())})

    async def model_data(self, model: str, request: Request) -> Response:
        await self.authenticate(request)
        card = self._cards.get(model)
        if card is None:
            raise OpenAIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return JSONResponse(card)

    # ---- health --------------------------------------------------------------------------

    async def healthz(self) -> dict[str, str]:
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
