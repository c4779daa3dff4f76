"""The ledger's natural batching (quotas/ledger/batching.py): calls made together share a batch, and
with a partition one tenant's stuck batch never holds up another tenant's call."""

from __future__ import annotations

import asyncio

from agencyllm.quotas.ledger.batching import Batcher


class Recorder:
    """Runs batches; a batch holding a blocked item waits until that item is released."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release: dict[str, asyncio.Event] = {}

    async def run_batch(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        for item in items:
            if item in self.release:
                await self.release[item].wait()
        return [f"done {item}" for item in items]

    async def run_one(self, item: str) -> str:
        return (await self.run_batch([item]))[0]


async def test_calls_made_together_share_one_batch():
    recorder = Recorder()
    batcher = Batcher(recorder.run_batch, recorder.run_one, max_in_flight=1)
    results = await asyncio.gather(*(batcher.submit(x) for x in ("a1", "b1", "b2")))
    assert results == ["done a1", "done b1", "done b2"]
    assert recorder.batches == [["a1", "b1", "b2"]]


async def test_a_tenant_stuck_on_its_own_rows_does_not_hold_up_another():
    recorder = Recorder()
    recorder.release["b1"] = asyncio.Event()
    batcher = Batcher(recorder.run_batch, recorder.run_one, max_in_flight=1, partition=lambda item: item[0])
    stuck = asyncio.ensure_future(batcher.submit("b1"))
    await asyncio.sleep(0)
    waiting = asyncio.ensure_future(batcher.submit("b2"))  # b's one batch slot is taken: b2 waits
    assert await asyncio.wait_for(batcher.submit("a1"), 1) == "done a1"
    assert not stuck.done() and not waiting.done()
    recorder.release["b1"].set()
    assert await asyncio.gather(stuck, waiting) == ["done b1", "done b2"]
    assert recorder.batches == [["b1"], ["a1"], ["b2"]]
    assert not batcher._lanes  # noqa: SLF001 (the project's own object, white-box)


async def test_without_a_partition_every_call_waits_for_the_batch_slot():
    recorder = Recorder()
    recorder.release["b1"] = asyncio.Event()
    batcher = Batcher(recorder.run_batch, recorder.run_one, max_in_flight=1)
    stuck = asyncio.ensure_future(batcher.submit("b1"))
    await asyncio.sleep(0)
    other = asyncio.ensure_future(batcher.submit("a1"))
    await asyncio.sleep(0.05)
    assert not other.done()
    recorder.release["b1"].set()
    assert await asyncio.gather(stuck, other) == ["done b1", "done a1"]
    assert not batcher._lanes  # nothing left behind once idle  # noqa: SLF001 (the project's own object, white-box)
