"""Which models have a live engine, as this ingress replica sees it.

A model is marked down when a call to its engine fails because the engine itself went away (its
replica died or is restarting: `EngineGone`, or what the engine port's `is_gone` says of its own
exceptions). While it is down, new requests for it are refused at once with
503 and `Retry-After` instead of queueing behind a replica that is not there, and a probe asks the
engine for its health every `interval` seconds; the first answer marks the model up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger("agencyllm.engines")

PROBE_INTERVAL_SECONDS = 1.0
PROBE_TIMEOUT_SECONDS = 5.0
# A request still waiting for its first item after this asks whether its model has a running
# replica at all: Ray queues calls for a deployment without one until a replica is back.
STALL_CHECK_SECONDS = 2.0

T = TypeVar("T")


class EngineGone(RuntimeError):
    """The model has no running engine replica."""


class EngineHealth:
    def __init__(
        self,
        probe: Callable[[str], Awaitable[object]],
        *,
        has_replica: Callable[[str], Awaitable[bool]] | None = None,
        is_gone: Callable[[BaseException], bool] | None = None,
        interval: float = PROBE_INTERVAL_SECONDS,
        timeout: float = PROBE_TIMEOUT_SECONDS,
        stall_check: float = STALL_CHECK_SECONDS,
    ) -> None:
        self._probe = probe
        self._has_replica = has_replica
        self._is_gone = is_gone
        self._interval = interval
        self._timeout = timeout
        self._stall_check = stall_check
        self._down_since: dict[str, float] = {}
        self._checks: dict[str, tuple[float, asyncio.Future[bool]]] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._down_events: dict[str, asyncio.Event] = {}

    def is_down(self, model: str) -> bool:
        return model in self._down_since

    def is_gone(self, exc: BaseException) -> bool:
        """Whether a call's failure means its engine went away (not: the request was refused)."""
        return isinstance(exc, EngineGone) or (self._is_gone is not None and self._is_gone(exc))

    def call_failed(self, model: str, exc: BaseException) -> None:
        """A call to `model`'s engine raised `exc`: mark the model down if its engine is gone."""
        if self.is_gone(exc):
            self.failed(model, exc)

    async def first_item(self, model: str, next_item: Awaitable[T]) -> T:
        """Await `next_item`; raise EngineGone as soon as the model is marked down meanwhile (a
        request waiting in Ray's queue for a replica on a host that died would otherwise wait
        until Ray notices), and, while it takes long, when the model has no running replica."""
        task = asyncio.ensure_future(next_item)
        down = asyncio.ensure_future(self._went_down(model).wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {task, down}, timeout=self._stall_check, return_when=asyncio.FIRST_COMPLETED
                )
                if task in done:
                    return task.result()
                if down in done or (self._has_replica is not None and not await self._replica_check(model)):
                    task.cancel()
                    gone = EngineGone(model)
                    self.failed(model, gone)
                    raise gone
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            down.cancel()

    def _went_down(self, model: str) -> asyncio.Event:
        """Set when `model` is marked down (a new one for each time it is down)."""
        return self._down_events.setdefault(model, asyncio.Event())

    async def _replica_check(self, model: str) -> bool:
        """One controller call per model per stall period, shared by every stalled request."""
        checked_at, answer = self._checks.get(model, (0.0, None))
        if answer is None or time.monotonic() - checked_at >= self._stall_check:
            answer = asyncio.ensure_future(self._ask_controller(model))
            self._checks[model] = (time.monotonic(), answer)
        return await asyncio.shield(answer)

    async def _ask_controller(self, model: str) -> bool:
        if self._has_replica is None:
            return True
        try:
            return await asyncio.wait_for(self._has_replica(model), self._timeout)
        except Exception:  # the controller is busy or restarting: assume the replica is there
            return True

    def failed(self, model: str, exc: BaseException) -> None:
        if model in self._down_since:
            return
        self._down_since[model] = time.monotonic()
        self._went_down(model).set()
        log.error("engine for model %s is gone (%s): new requests get 503 until it is back", model, type(exc).__name__)
        self._probes[model] = asyncio.get_running_loop().create_task(self._until_back(model))

    async def _until_back(self, model: str) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await asyncio.wait_for(self._probe(model), self._timeout)
            except asyncio.CancelledError:
                raise
            except Exception:
                continue
            since = self._down_since.pop(model, time.monotonic())
            self._down_events.pop(model, None)
            self._probes.pop(model, None)
            log.warning("engine for model %s answers again after %.1f s", model, time.monotonic() - since)
            return

    async def aclose(self) -> None:
        for task in self._probes.values():
            task.cancel()
        for task in list(self._probes.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._probes.clear()
