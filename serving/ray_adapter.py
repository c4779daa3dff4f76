"""The one module that puts the gateway on Ray Serve's request path.

`AgencyIngress` is the Serve ingress deployment class (`serving/app.py` deploys it): each replica
builds a `Gateway` (serving/gateway.py) in its constructor and hands Serve the FastAPI
application that serves it (`serving/ingress.py`). Engines are reached through their Serve
deployment handles, wrapped as the gateway's `Engines`. Only public Ray APIs are used here:
`ray.serve` and `ray.serve.llm.openai_api_models`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

from agencyllm.serving.config import ServingConfig
from agencyllm.serving.fairshare import Ticket
from agencyllm.serving.gateway import EngineCall, Gateway, RequestModels
from agencyllm.serving.ingress import http_app
from agencyllm.serving.settings import Settings

OPENAI_REQUESTS = RequestModels.of(ChatCompletionRequest, CompletionRequest, EmbeddingRequest)


class ServeEngines:
    """The gateway's `Engines` over the engines' Serve deployment handles (one per model)."""

    requests = OPENAI_REQUESTS

    def __init__(self, handles: dict[str, DeploymentHandle]) -> None:
        self._unary = dict(handles)
        # One streaming handle per model, made once: each `.options()` call makes a new handle
        # with its own metrics pusher and long-poll to the controller.
        self._streaming = {model: handle.options(stream=True) for model, handle in handles.items()}

    def open(self, model: str, method: str, body: Any, ticket: Ticket) -> EngineCall:
        # The engine (`FairLLMServer`) takes the request, Ray's raw-request info (none), the ticket.
        return getattr(self._streaming[model], method).remote(body, None, ticket)

    async def check_health(self, model: str) -> None:
        # The unary handle: the streaming one would expect a generator, and check_health is none.
        await self._unary[model].check_health.remote()

    async def has_running_replica(self, model: str) -> bool:
        """Whether Serve's controller counts a RUNNING replica of the model's engine."""
        handle = self._unary[model]
        status = await asyncio.to_thread(serve.status)
        deployment = status.applications[handle.app_name].deployments[handle.deployment_name]
        return any(str(getattr(state, "value", state)) == "RUNNING" and count > 0 for state, count in deployment.replica_states.items())


@serve.ingress()
class AgencyIngress:
    """A Serve ingress replica: the gateway, and the HTTP application that serves it.

    The application is built per replica (`__serve_build_asgi_app__`, after the constructor), so
    the one Serve runs is the one holding this replica's services on `app.state`.
    """

    async def __init__(self, engines: dict[str, DeploymentHandle], *, settings: Settings, serving: ServingConfig) -> None:
        self._gateway = await Gateway.start(settings, serving, ServeEngines(engines))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return http_app(self._gateway)

    async def __del__(self) -> None:
        # Replica shutdown: write the ledger rows still being settled, then let go of connections.
        await self._gateway.aclose()

