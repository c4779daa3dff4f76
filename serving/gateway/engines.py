"""The engine port: how the gateway reaches the model engines, and what their answers mean.

`Engines` is implemented by Ray Serve deployment handles in production (`serving/rayserve/ingress.py`)
and by a fake in the unit tests. The engine side also says which of its exceptions mean "the engine
went away" (`Engines.is_gone`) and which mean "the client's request is wrong"
(`RequestModels.client_errors`), so the gateway never names Ray's or vLLM's exception classes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, TypeAdapter

from agencyllm.serving.gateway.fairshare import Ticket
from agencyllm.serving.gateway.inputs import InvalidInput

log = logging.getLogger("agencyllm.ingress")


class EngineCall(Protocol):
    """One call to an engine: its output items (SSE strings, lists of them, or one complete
    response object), and a way to abort it."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    async def __anext__(self) -> Any: ...

    def cancel(self) -> None: ...


@dataclass(frozen=True)
class RequestModels:
    """The engines' OpenAI request models, which bodies are parsed into before they are sent, and
    the exceptions those models raise for a request the engine would refuse (a client's mistake)."""

    chat: TypeAdapter[Any]
    completions: TypeAdapter[Any]
    embeddings: TypeAdapter[Any]
    client_errors: tuple[type[Exception], ...] = ()

    @classmethod
    def of(
        cls, chat: Any, completions: Any, embeddings: Any, *, client_errors: tuple[type[Exception], ...] = ()
    ) -> RequestModels:
        return cls(TypeAdapter(chat), TypeAdapter(completions), TypeAdapter(embeddings), client_errors)


class Engines(Protocol):
    """How the gateway reaches the model engines, and the request models they take."""

    requests: RequestModels

    def open(self, model: str, method: str, body: Any, ticket: Ticket) -> EngineCall:
        """Start `method` (chat, completions, embeddings) on an engine of `model`."""
        ...

    async def check_health(self, model: str) -> None:
        """Return when an engine of `model` answers; raise otherwise."""

    async def has_running_replica(self, model: str) -> bool:
        """Whether `model` has an engine replica running at all (calls queue until one is)."""
        ...

    def is_gone(self, exc: BaseException) -> bool:
        """Whether `exc`, raised by a call, means its engine died or is unreachable (not: the
        request was refused)."""
        ...


def client_error(exc: Exception) -> InvalidInput:
    """A client error of the engine's request models as the gateway's own: 400 naming the
    parameter. The engine's models validate some fields themselves; never echo the value."""
    message = str(exc.args[0]) if exc.args else "Invalid request."
    parameter = getattr(exc, "parameter", None)
    return InvalidInput(message, param=parameter if isinstance(parameter, str) else None)


def cancel(upstream: EngineCall | None) -> None:
    """Abort the engine call; a call that already failed may raise again here, which must never
    keep its request from being settled."""
    if upstream is None:
        return
    try:
        upstream.cancel()
    except Exception as exc:
        log.debug("cancelling an engine call raised %s", type(exc).__name__)


def is_error(item: object) -> bool:
    """The engine's ErrorResponse (`{"error": {...}}`), whichever class carries it."""
    return isinstance(item, BaseModel) and isinstance(getattr(item, "error", None), BaseModel)


def is_complete(first: object) -> bool:
    """A whole answer: one response object, where a stream yields SSE text (or lists of it)."""
    return isinstance(first, BaseModel)


def status_of(error: Any) -> int:
    """The HTTP status an engine's ErrorResponse carries (500 when it names none that fits)."""
    try:
        code = int(error.error.code or 500)
    except (TypeError, ValueError):
        return 500
    return code if 400 <= code <= 599 else 500
