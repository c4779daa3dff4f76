"""What the engines' failures mean, in Ray's and vLLM's terms, for the gateway's engine port:
which exceptions say an engine went away (`engine_gone`, behind `Engines.is_gone`), and which say
the client's request is wrong (`CLIENT_ERRORS`, the request models' `client_errors`)."""

from __future__ import annotations

from collections.abc import Iterator

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from vllm.exceptions import VLLMClientError

# Raised by the engines' OpenAI request models while a body is parsed: answered with 400.
CLIENT_ERRORS: tuple[type[Exception], ...] = (VLLMClientError,)


def engine_gone(exc: BaseException) -> bool:
    """The engine behind a call died or is unreachable (not: the request was refused)."""
    if isinstance(exc, RayActorError | ActorDiedError | ActorUnavailableError):
        return True
    # vLLM's engine core process died under a live replica; through a handle it arrives wrapped
    # in Ray's task error, so it is found by name along the chain of causes.
    return any(type(e).__name__ == "EngineDeadError" for e in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
