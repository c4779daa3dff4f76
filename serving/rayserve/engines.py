"""One Ray Serve LLM engine deployment per configured model: vLLM in Ray's `LLMServer`, with our
fair admission queue (`serving/gateway/fairshare.py`) in front of each replica's engine."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ray.serve.llm import LLMConfig, ModelLoadingConfig, build_llm_deployment
from ray.serve.llm.openai_api_models import ErrorResponse
from ray.util import metrics

from agencyllm.serving.config import ENGINE_PREFIX, ConfigError, ModelSpec
from agencyllm.serving.gateway.fairshare import ENGINE_PRIORITY, FairQueue, QueueRefused, TenantLoad, Ticket
from agencyllm.serving.rayserve.heap import freeze_startup_heap
from agencyllm.serving.rayserve.hooks import CoalescingLLMServer, skip_node_download
from agencyllm.serving.rayserve.offline import OFFLINE_ENV  # engine processes must never reach out

# vLLM on CPU: fp32 kernels, no CUDA graphs, a bounded KV cache (GiB) instead of a share of GPU memory.
_CPU_ENGINE_DEFAULTS = {"dtype": "float32", "enforce_eager": True}
CPU_KV_CACHE_GIB = "1"


def llm_config(spec: ModelSpec, *, cpu: bool) -> LLMConfig:
    engine_kwargs: dict[str, Any] = {"max_model_len": spec.context_length(), **spec.engine_args}
    # The engine runs exactly the requests our fair queue lets in, and agrees on who goes first.
    engine_kwargs["max_num_seqs"] = spec.engine_slots() + spec.burst()
    if spec.task == "embed":
        engine_kwargs.setdefault("runner", "pooling")
    else:
        engine_kwargs.setdefault("scheduling_policy", "priority")
    engine_kwargs.update(tool_and_template_args(spec))
    env = dict(OFFLINE_ENV)
    if cpu:
        engine_kwargs = {**_CPU_ENGINE_DEFAULTS, **engine_kwargs}
        env["VLLM_CPU_KVCACHE_SPACE"] = CPU_KV_CACHE_GIB
        bundles = [{"CPU": spec.accelerator.cpus, "GPU": 0}]
    else:
        gpus_per_engine = max(spec.accelerator.gpus, 1)
        bundles = [{"CPU": 1, "GPU": 1} for _ in range(gpus_per_engine)]
        engine_kwargs.setdefault("tensor_parallel_size", gpus_per_engine)
    # Custom resources pin the replica to the nodes that offer them; Ray Serve LLM places the
    # replica actor in the first bundle, so the whole replica lands there.
    bundles[0] = {**bundles[0], **spec.accelerator.resources}

    autoscaling = {
        "min_replicas": spec.replicas.min,
        "initial_replicas": max(spec.replicas.min, 1),
        "max_replicas": spec.replicas.max,
        "target_ongoing_requests": spec.replicas.target_ongoing_requests,
    }
    return LLMConfig(
        model_loading_config=ModelLoadingConfig(model_id=spec.id, model_source=str(spec.path)),
        engine_kwargs=engine_kwargs,
        accelerator_type=None if cpu else spec.accelerator.type,
        placement_group_config={"bundles": bundles, "strategy": spec.accelerator.strategy},
        deployment_config={"autoscaling_config": autoscaling, "max_ongoing_requests": spec.max_ongoing_requests},
        runtime_env={"env_vars": env},
        # FairLLMServer reads this as its coalescing interval (first chunk at once, see
        # `hooks.CoalescingLLMServer`); Ray's own batcher would add the whole interval to TTFT.
        experimental_configs={"stream_batching_interval_ms": spec.stream_coalesce_ms},
        log_engine_metrics=True,
    )


GUIDED_ONLY_TOOL_PARSER = "pythonic"


def tool_and_template_args(spec: ModelSpec) -> dict[str, Any]:
    """vLLM's arguments for the model's tool calling, reasoning output and chat template. vLLM
    builds a tool parser only with auto tool choice on, and needs the parser for `required` and
    named choices too; so auto stays on in vLLM, and the gateway refuses `auto` where the model's
    `auto_tool_choice` is off (serving/gateway/tools.py)."""
    # A model without a parser still gets one that needs nothing of its tokenizer: `required` and
    # named choices are then enforced by guided decoding and their JSON read back directly, while
    # the gateway refuses `auto`, which only the model's own format could express.
    parser = spec.tool_call_parser or GUIDED_ONLY_TOOL_PARSER
    args: dict[str, Any] = {"enable_auto_tool_choice": True, "tool_call_parser": parser}
    if spec.reasoning_parser is not None:
        args["reasoning_parser"] = spec.reasoning_parser
    if spec.chat_template is not None:
        args["chat_template"] = str(spec.chat_template)
    return args


def check_parsers(spec: ModelSpec) -> None:
    """Refuse parser names this vLLM does not have, before any engine starts (ConfigError)."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    for setting, name, lookup in (
        ("tool_call_parser", spec.tool_call_parser, ToolParserManager.get_tool_parser),
        ("reasoning_parser", spec.reasoning_parser, ReasoningParserManager.get_reasoning_parser),
    ):
        if name is None:
            continue
        try:
            lookup(name)
        except KeyError as exc:
            raise ConfigError(f"model {spec.id}: {setting} {name!r}: {exc.args[0] if exc.args else exc}") from None


def engine_deployment(
    spec: ModelSpec,
    *,
    cpu: bool,
    logging_config: dict[str, Any] | None = None,
    server_cls: type[FairLLMServer] | None = None,
    bind_kwargs: dict[str, Any] | None = None,
    serve_options: dict[str, Any] | None = None,
):
    """The bound engine deployment for one model (deployment names stay `LLMServer:<model>`);
    `logging_config` is Ray Serve's for its replicas (e.g. access log off). `server_cls` (a
    `FairLLMServer` subclass), its `bind_kwargs` and `serve_options` make it serve more."""
    fair_share = {
        "slots": spec.engine_slots(),
        "interactive_reserve": spec.interactive_reserve(),
        "burst": spec.burst(),
        "max_wait_seconds": spec.fair_share.max_wait_seconds,
        "max_queued_per_tenant": spec.fair_share.max_queued_per_tenant,
    }
    options = dict(serve_options or {})
    if logging_config is not None:
        options["logging_config"] = logging_config
    return build_llm_deployment(
        llm_config(spec, cpu=cpu),
        deployment_cls=server_cls or FairLLMServer,
        name_prefix=ENGINE_PREFIX,
        bind_kwargs={"fair_share": fair_share, **(bind_kwargs or {})},
        override_serve_options=options or None,
    )


class FairLLMServer(CoalescingLLMServer):
    """`LLMServer` whose OpenAI methods take a slot from the replica's fair queue first.

    The ingress passes a `Ticket` (tenant, share, class) as a third argument after admitting the
    request; calls without one (health checks, Ray's own callers) go straight to the engine.
    """

    async def __init__(self, llm_config: LLMConfig, *, fair_share: dict[str, Any], **kwargs: Any) -> None:
        self._model = llm_config.model_id
        self._admission = FairAdmission(self._model, fair_share)
        skip_node_download(llm_config)
        await super().__init__(llm_config, **kwargs)
        await warm_up(self, self._model, embed=llm_config.engine_kwargs.get("runner") == "pooling")
        freeze_startup_heap()

    async def chat(self, request, raw_request_info=None, ticket: Ticket | None = None):
        return await self._admission.run(super().chat, request, raw_request_info, ticket)

    async def completions(self, request, raw_request_info=None, ticket: Ticket | None = None):
        return await self._admission.run(super().completions, request, raw_request_info, ticket)

    async def embeddings(self, request, raw_request_info=None, ticket: Ticket | None = None):
        return await self._admission.run(super().embeddings, request, raw_request_info, ticket)


class FairAdmission:
    """One replica's fair queue in front of its engine methods, with its metrics."""

    def __init__(self, model: str, fair_share: dict[str, Any], metrics: _FairQueueMetrics | None = None) -> None:
        self.model = model
        self.metrics = metrics or _FairQueueMetrics()
        self.queue = FairQueue(**fair_share, on_change=lambda load: self.metrics.load(self.model, load))

    async def run(
        self,
        method: Callable[..., Awaitable[AsyncIterator]],
        request: Any,
        raw_request_info: Any,
        ticket: Ticket | None,
    ) -> AsyncIterator:
        """The engine's answer to `request`, once the ticket's turn came (at once without one);
        the slot is held until the answer's stream ends or is closed."""
        if ticket is None:
            return await method(request, raw_request_info)
        try:
            slot = await self.queue.acquire(ticket)
        except QueueRefused as refused:
            self.metrics.refused(self.model, ticket, refused.reason)
            return _one(_too_busy(refused))
        self.metrics.waited(self.model, ticket, slot.waited)
        if hasattr(request, "priority"):
            request.priority = ENGINE_PRIORITY[ticket.traffic_class]
        try:
            stream = await method(request, raw_request_info)
        except BaseException:
            slot.release()
            raise
        return _holding(stream, slot)


# ---- warm-up (FairLLMServer's start) -------------------------------------------------------

# A tiny model on CPU answers in seconds, a large one on a GPU well within this.
WARM_UP_TIMEOUT_SECONDS = 120.0
WARM_UP_PROMPT = "Hello"
_log = logging.getLogger("ray.serve")  # Serve writes this logger to the replica's log file


class WarmUpFailed(RuntimeError):
    """The engine started but could not answer its warm-up request: the replica fails to start."""


async def warm_up(server: Any, model: str, *, embed: bool) -> None:
    """One real request through the engine before the replica counts as running, so the first
    staff request after `Ready:` does not pay for cold kernels and templates."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(warm_request(server, model, embed=embed), timeout=WARM_UP_TIMEOUT_SECONDS)
    except TimeoutError:
        raise WarmUpFailed(f"model {model}: the warm-up request took over {WARM_UP_TIMEOUT_SECONDS:.0f} s") from None
    _log.info("model %s answered its warm-up request in %.2f s", model, time.monotonic() - started)


async def warm_request(server: Any, model: str, *, embed: bool) -> None:
    """Embedding models embed one input; generate models stream one two-token chat answer, or a
    completion when the model has no chat template (vLLM refuses its chat with a 400)."""
    from pydantic import TypeAdapter
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

    if embed:
        # EmbeddingRequest is a union (plain input or chat messages): let pydantic pick.
        request = TypeAdapter(EmbeddingRequest).validate_python({"model": model, "input": WARM_UP_PROMPT})
        await _answer(await server.embeddings(request), model)
        return
    chat = ChatCompletionRequest(
        model=model, messages=[{"role": "user", "content": WARM_UP_PROMPT}], max_tokens=2, stream=True
    )
    error = await _answer(await server.chat(chat), model, tolerate_bad_request=True)
    if error is not None:
        _log.info("model %s: chat warm-up refused (%s); warming up with a completion", model, error)
        completion = CompletionRequest(model=model, prompt=WARM_UP_PROMPT, max_tokens=2, stream=True)
        await _answer(await server.completions(completion), model)


async def _answer(stream: AsyncIterator, model: str, *, tolerate_bad_request: bool = False) -> str | None:
    """Drain one engine answer. An error raises WarmUpFailed, except a 400 when tolerated (its
    message is returned)."""
    error: tuple[int, str] | None = None
    async for item in stream:
        for part in item if isinstance(item, list) else [item]:
            error = error or _error_in(part)
    if error is None:
        return None
    code, message = error
    if tolerate_bad_request and code == 400:
        return message
    raise WarmUpFailed(f"model {model}: the warm-up request failed ({code}): {message}")


def _error_in(part: Any) -> tuple[int, str] | None:
    if isinstance(part, ErrorResponse):
        return int(part.error.code or 500), part.error.message
    if isinstance(part, str):  # SSE: "data: {...}\n\n"; an error chunk is {"error": {...}}
        for line in part.splitlines():
            payload = line.removeprefix("data: ").strip()
            if payload.startswith("{") and '"error"' in payload:
                body = json.loads(payload).get("error")
                if isinstance(body, dict):
                    return int(body.get("code") or 500), str(body.get("message"))
    return None


async def _holding(stream: AsyncIterator, slot) -> AsyncIterator:
    """Relay the engine's output; the slot is free again the moment the stream ends or is cancelled."""
    try:
        async for item in stream:
            yield item
    finally:
        slot.release()
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def _one(item: Any) -> AsyncIterator:
    yield item


def _too_busy(refused: QueueRefused) -> ErrorResponse:
    return ErrorResponse.model_validate(
        {"error": {"message": refused.message, "type": "rate_limit_exceeded", "param": None, "code": 429}}
    )


class _FairQueueMetrics:
    """Per tenant and model: waiting and running requests, time waited, refusals (docs/quotas.md)."""

    def __init__(self) -> None:
        tags = ("tenant", "model")
        self._waiting = metrics.Gauge(
            "agencyllm_fair_queue_waiting", "Requests waiting for an engine slot", tag_keys=tags
        )
        self._running = metrics.Gauge("agencyllm_fair_queue_running", "Requests holding an engine slot", tag_keys=tags)
        self._wait = metrics.Histogram(
            "agencyllm_fair_queue_wait_seconds",
            "Time a request waited for an engine slot",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
            tag_keys=(*tags, "traffic_class"),
        )
        self._refused = metrics.Counter(
            "agencyllm_fair_queue_refused_total", "Requests refused by the fair queue", tag_keys=(*tags, "reason")
        )

    def load(self, model: str, load: TenantLoad) -> None:
        tags = {"tenant": load.tenant, "model": model}
        self._waiting.set(load.waiting, tags=tags)
        self._running.set(load.running, tags=tags)

    def waited(self, model: str, ticket: Ticket, seconds: float) -> None:
        self._wait.observe(
            seconds, tags={"tenant": ticket.tenant, "model": model, "traffic_class": ticket.traffic_class}
        )

    def refused(self, model: str, ticket: Ticket, reason: str) -> None:
        self._refused.inc(1, tags={"tenant": ticket.tenant, "model": model, "reason": reason})
