"""A scripted engine call for tests of the request path without Ray or vLLM."""

from __future__ import annotations

import asyncio


class FakeCall:
    """One engine call, as a Ray handle's response generator behaves: `items`, then `fail`
    raised, or a hang; counts `cancel()`s, which raise again when `cancel_raises` (Ray does so
    for a call that already failed)."""

    def __init__(
        self, items=(), *, fail: BaseException | None = None, hang: bool = False, cancel_raises: bool = False
    ) -> None:
        self.items = list(items)
        self.fail = fail
        self.hang = hang
        self.cancel_raises = cancel_raises
        self.cancelled = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.items:
            return self.items.pop(0)
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled += 1
        if self.cancel_raises:
            raise RuntimeError("the call already failed")
