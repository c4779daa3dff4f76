"""Grouping an engine's output chunks into deployment-handle items: first chunk at once, then at
most one item per interval.

Every handle item costs the same Python CPU in Ray Serve however much it carries, so chunks the
engine makes close together should travel together. Ray's own batcher waits a whole interval
before its first item, which adds the interval to the time to first token; this one is a
leading-edge throttle instead: an item leaves as soon as it exists unless one left less than
`interval` ago, in which case it waits for the rest of that interval and takes everything made
meanwhile. No chunk waits longer than one interval, and a chunk after a quiet spell (the first
one, or any after a pause longer than the interval) is not delayed at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def coalesce(source: AsyncIterator[T], interval_ms: float) -> AsyncIterator[list[T]]:
    """Relay `source` as lists of its items, in order. The source's end and its errors reach the
    consumer after the items made before them; closing or cancelling the consumer closes the source."""
    if interval_ms <= 0:
        try:
            async for item in source:
                yield [item]
        finally:
            await _close(source)
        return

    loop = asyncio.get_running_loop()
    interval = interval_ms / 1000
    buffer: list[T] = []
    arrived: asyncio.Future | None = None

    async def read() -> None:
        try:
            async for item in source:
                buffer.append(item)
                if arrived is not None and not arrived.done():
                    arrived.set_result(None)
        finally:
            if arrived is not None and not arrived.done():
                arrived.set_result(None)

    reader = loop.create_task(read())
    last_sent = -math.inf
    try:
        while True:
            if not buffer:
                if reader.done():
                    break
                arrived = loop.create_future()
                await arrived
                arrived = None
                continue
            hold = last_sent + interval - loop.time()
            if hold > 0 and not reader.done():
                # The reader keeps filling the buffer meanwhile; its end cuts the wait short.
                await asyncio.wait((reader,), timeout=hold)
            batch = buffer[:]
            buffer.clear()
            last_sent = loop.time()
            yield batch
        reader.result()  # the source's own error, after everything it made before failing
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        elif not reader.cancelled():
            reader.exception()  # retrieved: the consumer left before it could be raised
        await _close(source)


async def _close(source: AsyncIterator) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()
