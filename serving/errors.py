"""Every error leaves in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

The handlers installed here are the only place that turns exceptions into responses, so a client
mistake is never a 500 and no stack trace or internal detail reaches the wire.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from agencyllm.quotas import db as quotas_db
from agencyllm.serving.inputs import InvalidInput

log = logging.getLogger("agencyllm.errors")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The same error as one server-sent event, for failures after a stream has started."""
        return f"data: {json.dumps(self.body())}\n\n"


class EngineUnavailable(RuntimeError):
    """No engine replica could take or finish the request (crashed, restarting, overloaded)."""


def unavailable(message: str) -> OpenAIError:
    return OpenAIError(
        503, message, type="service_unavailable", code="service_unavailable",
        headers={"Retry-After": str(quotas_db.RETRY_AFTER_SECONDS)},
    )


DATABASE_UNAVAILABLE_MESSAGE = "The service is temporarily unavailable (its database cannot be reached). Please retry."
ENGINE_UNAVAILABLE_MESSAGE = "The model is temporarily unavailable. Please retry."


def as_openai_error(exc: BaseException) -> OpenAIError | None:
    """The one mapping of domain errors to HTTP answers; None for a fault of our own (500)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, InvalidInput):
        return OpenAIError(400, exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, EngineUnavailable):
        return unavailable(ENGINE_UNAVAILABLE_MESSAGE)
    engine_errors = sys.modules.get("vllm.exceptions")  # imported where engines' models are used
    if engine_errors is not None and isinstance(exc, engine_errors.VLLMClientError):
        # The engine's request models validate some fields themselves; never echo the value.
        message = str(exc.args[0]) if exc.args else "Invalid request."
        return OpenAIError(400, message, param=getattr(exc, "parameter", None), code="invalid_value")
    if quotas_db.database_unavailable(exc):
        quotas_db.availability.failed(exc)
        return unavailable(DATABASE_UNAVAILABLE_MESSAGE)
    return None


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return OpenAIError(400, "The request body is not valid JSON.", code="invalid_json")
    # FastAPI prefixes where a value came from (`query.group_by`); OpenAI names the parameter.
    loc = list(first.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    loc = [str(p) for p in loc]
    param = ".".join(loc) or None
    reason = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {reason}." if param else f"Invalid request: {reason}."
    return OpenAIError(400, message, param=param, code="invalid_value" if param else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 404 and message == "Not Found":
            message = "Unknown route."
        return OpenAIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        error = as_openai_error(exc)
        return error.response() if error is not None else _server_error(request, exc)

    # Registered by class, so Starlette's ExceptionMiddleware answers them (no traceback per
    # request in the log while the database is down); anything else reaches `_unexpected`.
    for kind in (InvalidInput, EngineUnavailable, *quotas_db.UNAVAILABLE_ERRORS):
        app.add_exception_handler(kind, _domain)
    with contextlib.suppress(ImportError):
        from vllm.exceptions import VLLMClientError

        app.add_exception_handler(VLLMClientError, _domain)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return await _domain(request, exc)


def _server_error(request: Request, exc: BaseException) -> JSONResponse:
    # Full detail stays in the server log (no request body: it may hold prompts or secrets).
    log.error("unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
    return OpenAIError(500, "The server had an error while processing your request.", type="server_error").response()
