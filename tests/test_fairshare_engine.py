"""The engine deployment's side of fair sharing, without an engine: `FairAdmission.run` (what
FairLLMServer's OpenAI methods go through) in front of a stand-in for LLMServer's own method
(the real engine runs in the stack tests)."""

from __future__ import annotations

import asyncio

from ray.serve.llm.openai_api_models import ChatCompletionRequest, ErrorResponse

from agencyllm.serving.gateway.fairshare import FairQueue, Ticket
from agencyllm.serving.rayserve.engines import FairAdmission


def server(queue: FairQueue) -> FairAdmission:
    admission = FairAdmission("m", {"slots": 1})
    admission.queue = queue
    return admission


def request() -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)


class Engine:
    def __init__(self) -> None:
        self.seen: list[int] = []
        self.release = asyncio.Event()

    async def chat(self, body, raw_request_info):
        self.seen.append(body.priority)

        async def stream():
            yield "data: one\n\n"
            await self.release.wait()
            yield "data: two\n\n"

        return stream()


async def test_a_slot_is_held_for_the_whole_stream_and_freed_after():
    queue, engine = FairQueue(1), Engine()
    replica = server(queue)
    stream = await replica.run(engine.chat, request(), None, Ticket("t", traffic_class="batch"))
    assert await stream.__anext__() == "data: one\n\n"
    assert queue.running == 1 and engine.seen == [10]  # batch runs at vLLM priority 10
    engine.release.set()
    assert [item async for item in stream] == ["data: two\n\n"]
    assert queue.running == 0


async def test_a_cancelled_stream_frees_its_slot():
    queue, engine = FairQueue(1), Engine()
    stream = await server(queue).run(engine.chat, request(), None, Ticket("t"))
    await stream.__anext__()
    await stream.aclose()
    assert queue.running == 0 and engine.seen == [0]


async def test_a_request_past_its_wait_gets_a_429_error_item():
    queue, engine = FairQueue(1, max_wait_seconds=0.05), Engine()
    replica = server(queue)
    holder = await replica.run(engine.chat, request(), None, Ticket("a"))
    await holder.__anext__()
    refused = await replica.run(engine.chat, request(), None, Ticket("b"))
    item = await refused.__anext__()
    assert isinstance(item, ErrorResponse) and item.error.code == 429
    assert queue.waiting == 0 and engine.seen == [0]  # the refused request never reached the engine
    await holder.aclose()


async def test_calls_without_a_ticket_go_straight_to_the_engine():
    queue, engine = FairQueue(1), Engine()
    stream = await server(queue).run(engine.chat, request(), None, None)
    assert await stream.__anext__() == "data: one\n\n"
    assert queue.running == 0
