"""The one module that puts the gateway on Ray Serve's request path.

`AgencyIngress` is the Serve ingress deployment class (`serving/rayserve/app.py` deploys it): each replica
builds a `Gateway` (serving/gateway/pipeline.py) in its constructor and hands Serve the FastAPI
application that serves it (`serving/http/openai.py`). Engines are reached through their Serve
deployment handles, wrapped as the gateway's `Engines` (which say, through `engine_errors`, what
Ray's and vLLM's exceptions mean); the ledger counts in Ray's metrics. Only public Ray APIs are used here:
`ray.serve` and `ray.serve.llm.openai_api_models`.

`EngineGateway` is the other way to put it there: one model's engine replica (`FairLLMServer`)
that serves the gateway over HTTP itself, so that model's chunks cross no process boundary
between the engine and the client. Other models are reached through their handles as above.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

from agencyllm.serving.config import ServingConfig
from agencyllm.serving.gateway.batch_worker import BatchWorker
from agencyllm.serving.gateway.engines import EngineCall, RequestModels
from agencyllm.serving.gateway.fairshare import Ticket
from agencyllm.serving.gateway.pipeline import Gateway
from agencyllm.serving.http.openai import http_app
from agencyllm.serving.rayserve.engine_errors import CLIENT_ERRORS, engine_gone
from agencyllm.serving.rayserve.engines import FairLLMServer
from agencyllm.serving.rayserve.heap import freeze_startup_heap
from agencyllm.serving.rayserve.metrics import ray_quota_metrics
from agencyllm.serving.rayserve.ray_env import wait_for_direct_port
from agencyllm.serving.settings import Settings

OPENAI_REQUESTS = RequestModels.of(
    ChatCompletionRequest, CompletionRequest, EmbeddingRequest, client_errors=CLIENT_ERRORS
)


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
        return any(
            str(getattr(state, "value", state)) == "RUNNING" and count > 0
            for state, count in deployment.replica_states.items()
        )

    def is_gone(self, exc: BaseException) -> bool:
        return engine_gone(exc)


class ServesGateway:
    """What every replica that serves the gateway over HTTP has: the application, built per
    replica (`__serve_build_asgi_app__`, after the constructor) so the one Serve runs holds this
    replica's services on `app.state`; the stop that ends its streams; its shutdown."""

    _gateway: Gateway

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = http_app(self._gateway)
        freeze_startup_heap()
        return app

    _batches: BatchWorker | None = None

    def _start_batches(self) -> None:
        """This replica's share of the batch work (lines leased from Postgres)."""
        self._batches = BatchWorker(self._gateway)
        self._batches.start()

    async def stop_serving(self) -> int:
        """Called before the application stops: end this replica's streams in band, settled, and
        hand its batch lines back (they run again elsewhere, charged once)."""
        if self._batches is not None:
            await self._batches.stop()
        return await self._gateway.stop_serving()

    async def _close_gateway(self) -> None:
        # Replica shutdown: write the ledger rows still being settled, then let go of connections.
        if self._batches is not None:
            await self._batches.stop()
        gateway = getattr(self, "_gateway", None)  # absent when the constructor failed
        if gateway is not None:
            await gateway.aclose()


@serve.ingress()
class AgencyIngress(ServesGateway):
    """A Serve ingress replica: the gateway, with the engines reached by handle."""

    async def __init__(
        self, engines: dict[str, DeploymentHandle], *, settings: Settings, serving: ServingConfig
    ) -> None:
        await wait_for_direct_port(settings.host)
        self._gateway = await Gateway.start(settings, serving, ServeEngines(engines), metrics=ray_quota_metrics())
        self._start_batches()

    async def __del__(self) -> None:
        await self._close_gateway()


class LocalCall:
    """An engine call inside this process: the `FairLLMServer` method's stream, started on the
    first item. `cancel` closes it, which aborts the engine's request."""

    def __init__(self, started: Awaitable[AsyncIterator]) -> None:
        self._started = started
        self._items = self._relay()
        self._began = False

    async def _relay(self) -> AsyncIterator:
        stream = await self._started
        try:
            async for item in stream:
                yield item
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def __aiter__(self) -> LocalCall:
        return self

    def __anext__(self) -> Awaitable:
        self._began = True
        return self._items.__anext__()

    def cancel(self) -> None:
        if not self._began:  # never started: nothing runs, only the coroutine to let go of
            self._began = True
            self._started.close()
            return
        asyncio.ensure_future(_close(self._items))


async def _close(items) -> None:
    # Already finished (or being closed by the task that runs it): nothing left to abort.
    with contextlib.suppress(RuntimeError, StopAsyncIteration):
        await items.aclose()


class ReplicaEngines:
    """The gateway's `Engines` in an engine replica: its own model in process, others by handle."""

    requests = OPENAI_REQUESTS

    def __init__(self, server: FairLLMServer, model: str, others: ServeEngines) -> None:
        self._server = server
        self._model = model
        self._others = others

    def open(self, model: str, method: str, body: Any, ticket: Ticket) -> EngineCall:
        if model != self._model:
            return self._others.open(model, method, body, ticket)
        return LocalCall(getattr(self._server, method)(body, None, ticket))

    async def check_health(self, model: str) -> None:
        if model != self._model:
            return await self._others.check_health(model)
        await self._server.check_health()

    async def has_running_replica(self, model: str) -> bool:
        return model == self._model or await self._others.has_running_replica(model)

    def is_gone(self, exc: BaseException) -> bool:
        return engine_gone(exc)


@serve.ingress()
class EngineGateway(ServesGateway, FairLLMServer):
    """One model's engine replica serving the gateway's HTTP application itself (before
    `FairLLMServer` in the MRO: LLMServer's own `__serve_build_asgi_app__` serves vLLM's routes)."""

    async def __init__(
        self,
        llm_config,
        *,
        fair_share: dict[str, Any],
        engines: dict[str, DeploymentHandle],
        settings: Settings,
        serving: ServingConfig,
        **kwargs: Any,
    ) -> None:
        # After the engine: its start blocks this event loop for long stretches, which would
        # time out the gateway's database connections if they were opened meanwhile.
        await super().__init__(llm_config, fair_share=fair_share, **kwargs)
        await wait_for_direct_port(settings.host)
        local = ReplicaEngines(self, llm_config.model_id, ServeEngines(engines))
        self._gateway = await Gateway.start(settings, serving, local, metrics=ray_quota_metrics())
        self._start_batches()

    async def __del__(self) -> None:
        await self._close_gateway()
        await super().__del__()
