"""The FastAPI application the ingress serves: error shape, body limit, CORS, admin routes."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from pydantic import TypeAdapter, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agencyllm.serving.admin import router as admin_router
from agencyllm.serving.errors import OpenAIError, install_error_handlers
from agencyllm.serving.feedback import router as feedback_router
from agencyllm.serving.governance import RequestSource
from agencyllm.serving.metrics_route import router as metrics_router

T = TypeVar("T")


class BodySizeLimit:
    """Refuse bodies over `limit` bytes with 413, before anything parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        error = OpenAIError(413, f"Request body exceeds the limit of {self.limit} bytes.", code="request_too_large")
        await error.response()({"type": "http"}, _no_receive, send)


class _TooLarge(Exception):
    pass


async def _no_receive() -> Message:  # pragma: no cover - JSONResponse never reads
    return {"type": "http.disconnect"}


async def parse_body(request: Request, model: type[T] | TypeAdapter) -> T:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise OpenAIError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    adapter = model if isinstance(model, TypeAdapter) else TypeAdapter(model)
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> OpenAIError:
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "tagged-union"))]
    # Union members appear in `loc` as class names; the parameter is what follows them.
    loc = [p for p in loc if not p[:1].isupper()]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return OpenAIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    reason = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    message = f"Invalid value for '{param}': {reason}" if param else reason
    return OpenAIError(400, message, param=param, code="invalid_value")


def create_app(*, cors_origins: list[str], max_request_bytes: int) -> FastAPI:
    app = FastAPI(
        title="agencyllm",
        summary="OpenAI-compatible API and administration for the agency's private models.",
        version="0.1.0",
    )
    install_error_handlers(app)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["authorization", "content-type"],
        )
    app.add_middleware(BodySizeLimit, limit=max_request_bytes)
    app.add_middleware(RequestSource)  # the caller's address, for audit records
    app.include_router(admin_router)
    app.include_router(feedback_router)
    app.include_router(metrics_router)
    return app
