"""Output-stream coalescing (serving/rayserve/stream_batch.py): first chunk at once, later chunks grouped
per interval, order kept, end and errors passed on, the source closed however the consumer leaves.

The source is a fake async generator fed by the test, so what arrives when is under the test's
control; the timing checks use intervals far from the margins a loaded host needs.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from agencyllm.serving.config import DEFAULT_STREAM_COALESCE_MS, ModelSpec
from agencyllm.serving.ops.placeholder import write_placeholder_model
from agencyllm.serving.rayserve.engines import llm_config
from agencyllm.serving.rayserve.stream_batch import coalesce

_END = object()


class FakeSource:
    """An async generator the test feeds item by item (an exception instance is raised)."""

    def __init__(self) -> None:
        self.feed: asyncio.Queue = asyncio.Queue()
        self.started = False
        self.closed = False

    def put(self, *items) -> None:
        for item in items:
            self.feed.put_nowait(item)

    async def stream(self):
        self.started = True
        try:
            while (item := await self.feed.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.closed = True


async def next_within(stream, seconds: float):
    return await asyncio.wait_for(anext(stream), seconds)


async def test_first_chunk_leaves_at_once():
    source = FakeSource()
    stream = coalesce(source.stream(), interval_ms=10_000)
    source.put("a")
    assert await next_within(stream, 2) == ["a"]
    await stream.aclose()
    assert source.closed


async def test_later_chunks_within_the_interval_travel_together():
    source = FakeSource()
    stream = coalesce(source.stream(), interval_ms=300)
    source.put("a")
    sent_first = time.monotonic()
    assert await next_within(stream, 2) == ["a"]
    source.put("b", "c")
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    source.put("d")  # made while b and c wait for the interval: joins them
    assert await asyncio.wait_for(pending, 5) == ["b", "c", "d"]
    assert time.monotonic() - sent_first >= 0.25  # held for the rest of the interval, not sent per chunk
    source.put(_END)
    with pytest.raises(StopAsyncIteration):
        await next_within(stream, 2)
    assert source.closed


async def test_chunk_after_a_quiet_spell_is_not_held():
    source = FakeSource()
    stream = coalesce(source.stream(), interval_ms=1000)
    source.put("a")
    assert await next_within(stream, 2) == ["a"]
    await asyncio.sleep(1.2)  # longer than the interval: the next chunk owes no wait
    source.put("b")
    started = time.monotonic()
    assert await next_within(stream, 2) == ["b"]
    assert time.monotonic() - started < 0.8
    await stream.aclose()


async def test_end_of_stream_cuts_the_hold_short():
    source = FakeSource()
    stream = coalesce(source.stream(), interval_ms=10_000)
    source.put("a")
    assert await next_within(stream, 2) == ["a"]
    source.put("b", "[DONE]", _END)  # the last chunks never wait out the interval
    assert await next_within(stream, 2) == ["b", "[DONE]"]
    with pytest.raises(StopAsyncIteration):
        await next_within(stream, 2)


async def test_order_and_content_are_kept():
    async def source():
        for i in range(200):
            if i % 7 == 0:
                await asyncio.sleep(0.003)
            elif i % 3 == 0:
                await asyncio.sleep(0)
            yield f"data: {i}\n\n"

    batches = [batch async for batch in coalesce(source(), interval_ms=2)]
    assert [item for batch in batches for item in batch] == [f"data: {i}\n\n" for i in range(200)]
    assert all(batches)  # never an empty item
    assert len(batches) < 200  # something was grouped


async def test_source_error_reaches_the_consumer_after_its_chunks():
    source = FakeSource()
    stream = coalesce(source.stream(), interval_ms=10_000)
    source.put("a")
    assert await next_within(stream, 2) == ["a"]
    source.put("b", ValueError("engine died"))
    assert await next_within(stream, 2) == ["b"]
    with pytest.raises(ValueError, match="engine died"):
        await next_within(stream, 2)
    assert source.closed


async def test_error_before_any_chunk():
    source = FakeSource()
    stream = coalesce(source.stream(), interval_ms=5)
    source.put(RuntimeError("refused"))
    with pytest.raises(RuntimeError, match="refused"):
        await next_within(stream, 2)


async def test_empty_source_ends_without_an_item():
    async def source():
        return
        yield

    assert [batch async for batch in coalesce(source(), interval_ms=5)] == []


async def test_closing_the_consumer_closes_a_waiting_source():
    source = FakeSource()
    stream = coalesce(source.stream(), interval_ms=5)
    source.put("a")
    assert await next_within(stream, 2) == ["a"]
    await asyncio.sleep(0.05)  # the source now waits for the engine's next chunk
    assert not source.closed
    await stream.aclose()
    assert source.closed


async def test_cancelling_the_consumer_closes_the_source():
    source = FakeSource()
    stream = coalesce(source.stream(), interval_ms=5)
    source.put("a")
    assert await next_within(stream, 2) == ["a"]
    waiting = asyncio.ensure_future(anext(stream))  # a client gone while waiting for the next chunk
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await stream.aclose()
    assert source.closed


async def test_closing_while_a_batch_is_held_closes_the_source():
    source = FakeSource()
    stream = coalesce(source.stream(), interval_ms=10_000)
    source.put("a")
    assert await next_within(stream, 2) == ["a"]
    source.put("b")
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)  # "b" is held for the rest of the interval
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await stream.aclose()
    assert source.closed


@pytest.mark.parametrize("interval_ms", [0, -1])
async def test_no_interval_sends_every_chunk_on_its_own(interval_ms):
    source = FakeSource()
    stream = coalesce(source.stream(), interval_ms=interval_ms)
    source.put("a", "b", "c")
    assert [await next_within(stream, 2) for _ in range(3)] == [["a"], ["b"], ["c"]]
    await stream.aclose()
    assert source.closed


def test_the_interval_is_a_per_model_setting(tmp_path):
    model = write_placeholder_model(tmp_path / "m")
    default = ModelSpec(id="m", path=model)
    assert default.stream_coalesce_ms == DEFAULT_STREAM_COALESCE_MS > 0
    assert (
        llm_config(default, cpu=True).experimental_configs["stream_batching_interval_ms"] == DEFAULT_STREAM_COALESCE_MS
    )
    off = ModelSpec(id="m", path=model, stream_coalesce_ms=0)
    assert llm_config(off, cpu=False).experimental_configs["stream_batching_interval_ms"] == 0
    with pytest.raises(ValueError, match="stream_coalesce_ms"):
        ModelSpec(id="m", path=model, stream_coalesce_ms=-1)
