"""The HTTP edge's guards: body size limit, input checks on every route, and parsing a JSON body
into a request model (OpenAI's error shape for all of them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from fastapi import Request
from pydantic import TypeAdapter, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agencyllm.serving.gateway.errors import OpenAIError, invalid_input, validation_error
from agencyllm.serving.gateway.inputs import InvalidInput, check_query, check_text, load_json

T = TypeVar("T")


class BodySizeLimit:
    """Refuse bodies over `limit` bytes with 413, before anything parses them; uploads to
    `upload_path` (POST) may be up to `upload_limit`."""

    def __init__(self, app: ASGIApp, limit: int, upload_path: str | None = None, upload_limit: int = 0) -> None:
        self.app = app
        self.default_limit = limit
        self.upload_path = upload_path
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope.get("method") == "POST" and scope.get("path") == self.upload_path
        limit = self.upload_limit if upload else self.default_limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            error = OpenAIError(400, "The Content-Length header is not a number.", code="invalid_request")
            return await error.response()(scope, _no_receive, send)
        if declared is not None and int(declared) > limit:
            return await self._refuse(send, limit)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._refuse(send, limit)

    async def _refuse(self, send: Send, limit: int) -> None:
        error = OpenAIError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")
        await error.response()({"type": "http"}, _no_receive, send)


class _TooLarge(Exception):
    pass


async def _no_receive() -> Message:  # pragma: no cover - JSONResponse never reads
    return {"type": "http.disconnect"}


_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
PARSED_BODY = "agencyllm.json_body"


class InputGuard:
    """Refuse what no route may see, in OpenAI's shape: NUL bytes in the path or query values, and
    JSON bodies that are not valid, too deep, or hold NUL bytes or lone surrogates. The parsed
    body is kept in the request state, so the OpenAI routes do not parse it twice."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            check_text(scope.get("path", ""), "path")
            query = scope.get("query_string", b"").decode("latin-1")
            check_query(parse_qsl(query, keep_blank_values=True, errors="replace"))
            if scope.get("method") in _BODY_METHODS and _json_or_untyped(scope):
                receive = await self._checked_body(scope, receive)
        except InvalidInput as exc:
            await invalid_input(exc).response()(scope, _no_receive, send)
            return
        await self.app(scope, receive, send)

    async def _checked_body(self, scope: Scope, receive: Receive) -> Receive:
        chunks: list[bytes] = []
        pending: list[Message] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client left while sending
                pending.append(message)
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        if raw.strip():
            scope.setdefault("state", {})[PARSED_BODY] = load_json(raw)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                if pending:
                    return pending.pop(0)
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        return replay


def _json_or_untyped(scope: Scope) -> bool:
    content_type = dict(scope.get("headers") or []).get(b"content-type", b"").lower()
    return not content_type or b"json" in content_type


async def parse_body(
    request: Request, model: type[T] | TypeAdapter[T], *, check: Callable[[dict[str, Any]], None] | None = None
) -> T:
    """The JSON body as `model`; `check` sees the raw object first (strict types, bounds)."""
    data = request.scope.get("state", {}).get(PARSED_BODY, _UNPARSED)
    if data is _UNPARSED:
        try:
            data = load_json(await request.body())
        except InvalidInput as exc:
            raise invalid_input(exc) from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    if check is not None:
        check(data)
    adapter: TypeAdapter[T] = model if isinstance(model, TypeAdapter) else TypeAdapter(model)
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False, include_input=False)) from None


_UNPARSED: Any = object()
