"""Natural batching of ledger calls: a call goes out at once when a batch slot is free; calls
arriving while `max_in_flight` batches are out wait and leave together in the next one. Idle
load pays nothing; under load one round trip and one commit serve many requests, and a hot
tenant's counter row is locked once per batch instead of once per request.

The work runs in the batch's own task, so a caller cancelled while waiting (client disconnect)
does not abort it: a result nobody waits for any more goes to `on_abandoned`. With
`drop_cancelled`, items whose caller left before they were sent are not sent at all.

With `partition`, items of different partitions (tenants) never share a batch and each partition
has its own `max_in_flight`: a batch waits for its slowest row lock and its commit, so one
tenant's flood, queued behind its own hot counter row, must not hold up another tenant's call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Lane:
    """One partition's waiting calls and batches out."""

    queue: list[Any] = field(default_factory=list)
    in_flight: int = 0
    flush_scheduled: bool = False


class Batcher(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[list[Item]], Awaitable[list[Result]]],
        run_one: Callable[[Item], Awaitable[Result]],
        *,
        max_in_flight: int,
        max_batch: int = 200,
        on_abandoned: Callable[[Result], None] | None = None,
        drop_cancelled: bool = False,
        partition: Callable[[Item], Hashable] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._run_one = run_one
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._on_abandoned = on_abandoned
        self._drop_cancelled = drop_cancelled
        self._partition = partition
        self._lanes: dict[Hashable, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        key = None if self._partition is None else self._partition(item)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        lane.queue.append((item, future))
        if not lane.flush_scheduled:
            # Let every call made in this loop iteration join the batch.
            lane.flush_scheduled = True
            loop.call_soon(self._flush, key)
        return await future

    def _flush(self, key: Hashable) -> None:
        lane = self._lanes[key]
        lane.flush_scheduled = False
        if self._drop_cancelled:  # items whose caller left before they were sent
            lane.queue = [entry for entry in lane.queue if not entry[1].cancelled()]
        while lane.queue and lane.in_flight < self._max_in_flight:
            batch = lane.queue[: self._max_batch]
            del lane.queue[: self._max_batch]
            lane.in_flight += 1
            task = asyncio.ensure_future(self._send(key, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not lane.queue and not lane.in_flight:
            del self._lanes[key]  # idle partitions cost nothing

    async def _send(self, key: Hashable, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            if len(batch) == 1:
                await self._send_one(*batch[0])
                return
            try:
                results = await self._run_batch([item for item, _ in batch])
            except Exception:
                # The batch's transaction rolled back as a whole: run each alone, so one bad
                # item (or a deadlock victim) fails only its own caller.
                await asyncio.gather(*(self._send_one(i, f) for i, f in batch))
                return
            for (_, future), result in zip(batch, results, strict=True):
                self._deliver(future, result)
        finally:
            for _, future in batch:  # only if this task itself was cancelled (loop shutdown)
                if not future.done():
                    future.cancel()
            lane = self._lanes[key]
            lane.in_flight -= 1
            if not lane.flush_scheduled:
                self._flush(key)

    async def _send_one(self, item: Item, future: asyncio.Future[Result]) -> None:
        try:
            result = await self._run_one(item)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            self._deliver(future, result)

    def _deliver(self, future: asyncio.Future[Result], result: Result) -> None:
        if not future.done():
            future.set_result(result)
        elif self._on_abandoned is not None:
            self._on_abandoned(result)
