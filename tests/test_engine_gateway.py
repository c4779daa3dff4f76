"""The engine replica that serves the gateway itself (serving/rayserve/ingress.py `EngineGateway`):
which model's replica hosts it, and how the gateway reaches that model's engine in process.
The real replica serves `agencyllm up` in tests/test_fault_up.py (its engine-gateway run)."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest

from agencyllm.serving.config import ModelSpec, ServingConfig
from agencyllm.serving.gateway.fairshare import Ticket
from agencyllm.serving.ops.placeholder import write_placeholder_model
from agencyllm.serving.rayserve.app import INGRESS_NAME, gateway_engine, ingress_name
from agencyllm.serving.rayserve.ingress import LocalCall, ReplicaEngines

TICKET = Ticket(tenant="t", share=1.0, traffic_class="interactive")


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    weights = write_placeholder_model(tmp_path_factory.mktemp("weights") / "placeholder")
    return lambda model, **fields: ModelSpec(id=model, path=weights, **fields)


@pytest.mark.parametrize(
    ("models", "host"),
    [
        ([("chat", {}), ("embed", {"task": "embed"})], "chat"),
        ([("embed", {"task": "embed"}), ("chat", {}), ("other", {})], "chat"),  # the first generate model
        ([("embed", {"task": "embed"})], None),  # embeddings are unary: no stream to save a hop on
        ([("chat", {"replicas": {"min": 1, "max": 2}})], None),  # only one replica can own the port
    ],
)
def test_the_first_generate_model_with_one_replica_hosts_the_gateway(spec, models, host):
    serving = ServingConfig(models=[spec(model, **fields) for model, fields in models])
    chosen = gateway_engine(serving, engine_http=True)
    assert (chosen.id if chosen else None) == host
    assert ingress_name(serving, engine_http=True) == (f"LLMServer:{host}" if host else INGRESS_NAME)


def test_without_engine_http_the_ingress_deployment_serves_it(spec):
    serving = ServingConfig(models=[spec("chat")])
    assert gateway_engine(serving, engine_http=False) is None
    assert ingress_name(serving, engine_http=False) == INGRESS_NAME


class Server:
    """Stands in for FairLLMServer: its OpenAI methods return the engine's stream after the
    fair queue's turn, and `aclose` of that stream is how vLLM aborts the request."""

    def __init__(self, items: list[str], *, fail_after: int | None = None) -> None:
        self.items = items
        self.fail_after = fail_after
        self.calls: list[tuple] = []
        self.closed = asyncio.Event()
        self.healthy = True

    async def chat(self, body, raw_request_info, ticket):
        self.calls.append((body, raw_request_info, ticket))
        return self._stream()

    async def _stream(self):
        try:
            for i, item in enumerate(self.items):
                if i == self.fail_after:
                    raise RuntimeError("EngineDeadError")
                yield item
                await asyncio.sleep(0)
        finally:
            self.closed.set()

    async def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("engine dead")


class Others:
    def __init__(self) -> None:
        self.opened: list[str] = []

    def open(self, model, method, body, ticket):
        self.opened.append(f"{model}.{method}")
        return "by handle"

    async def check_health(self, model: str) -> None:
        raise ConnectionError(model)

    async def has_running_replica(self, model: str) -> bool:
        return False


async def test_own_model_runs_in_process_and_others_by_handle():
    server, others = Server(["a", "b"]), Others()
    engines = ReplicaEngines(server, "chat", others)
    call = engines.open("chat", "chat", {"body": 1}, TICKET)
    assert [item async for item in call] == ["a", "b"]
    assert server.calls == [({"body": 1}, None, TICKET)]
    assert server.closed.is_set()
    assert engines.open("embed", "embeddings", {}, TICKET) == "by handle" and others.opened == ["embed.embeddings"]
    assert await engines.has_running_replica("chat") and not await engines.has_running_replica("embed")
    await engines.check_health("chat")
    server.healthy = False
    with pytest.raises(RuntimeError):
        await engines.check_health("chat")
    with pytest.raises(ConnectionError):
        await engines.check_health("embed")


async def test_cancel_mid_stream_closes_the_engine_stream():
    server = Server(["a", "b", "c"])
    call = LocalCall(server.chat({}, None, TICKET))
    assert await call.__anext__() == "a"
    call.cancel()
    await asyncio.wait_for(server.closed.wait(), 5)
    with pytest.raises(StopAsyncIteration):
        await call.__anext__()


async def test_a_client_that_leaves_while_waiting_aborts_the_call():
    """The gateway's task is cancelled while it awaits the first item (the fair queue's turn or
    the prompt): the cancel reaches the engine stream, and a later `cancel` is harmless."""
    started = asyncio.Event()

    async def slow_turn():
        started.set()
        await asyncio.sleep(3600)

    call = LocalCall(slow_turn())
    waiting = asyncio.ensure_future(call.__anext__())
    await started.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    call.cancel()
    await asyncio.sleep(0)


async def test_cancel_before_the_first_item_leaves_nothing_running():
    server = Server(["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would be a leak
        call = LocalCall(server.chat({}, None, TICKET))
        call.cancel()
        del call
        gc.collect()
    assert server.calls == []  # the engine was never asked


async def test_an_engine_failure_mid_stream_reaches_the_gateway():
    server = Server(["a", "b"], fail_after=1)
    call = LocalCall(server.chat({}, None, TICKET))
    assert await call.__anext__() == "a"
    with pytest.raises(RuntimeError, match="EngineDeadError"):
        await call.__anext__()
    assert server.closed.is_set()
    call.cancel()  # the gateway always cancels once it ends: nothing left to close
