"""Which models have a live engine, as this ingress replica sees it.

A model is marked down when a call to its engine fails because the engine itself went away (its
replica died or is restarting). While it is down, new requests for it are refused at once with
503 and `Retry-After` instead of queueing behind a replica that is not there, and a probe asks the
engine for its health every `interval` seconds; the first answer marks the model up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("agencyllm.engines")

PROBE_INTERVAL_SECONDS = 1.0
PROBE_TIMEOUT_SECONDS = 5.0


def engine_gone(exc: BaseException) -> bool:
    """The engine behind a call died or is unreachable (not: the request was refused)."""
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    except ImportError:  # pragma: no cover - the ingress always runs inside Ray
        return False
    if isinstance(exc, RayActorError | ActorDiedError | ActorUnavailableError):
        return True
    # vLLM's engine core process died under a live replica.
    return any(type(e).__name__ == "EngineDeadError" for e in _chain(exc))


def _chain(exc: BaseException):
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__


class EngineHealth:
    def __init__(
        self,
        probe: Callable[[str], Awaitable[object]],
        *,
        interval: float = PROBE_INTERVAL_SECONDS,
        timeout: float = PROBE_TIMEOUT_SECONDS,
    ) -> None:
        self._probe = probe
        self._interval = interval
        self._timeout = timeout
        self._down_since: dict[str, float] = {}
        self._probes: dict[str, asyncio.Task] = {}

    def is_down(self, model: str) -> bool:
        return model in self._down_since

    def failed(self, model: str, exc: BaseException) -> None:
        if model in self._down_since:
            return
        self._down_since[model] = time.monotonic()
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
