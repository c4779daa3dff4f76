"""Every error leaves in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

This is the one place that turns exceptions into HTTP answers: domain errors (quota refusals,
store errors, bad input, engines or the database away) carry a reason, `as_openai_error` maps
them, and the handlers installed here serve the result on every route (OpenAI, admin, console),
so a client mistake is never a 500 and no stack trace or internal detail reaches the wire.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from agencyllm.quotas import db as quotas_db
from agencyllm.quotas.ledger import AdmissionRefused
from agencyllm.quotas.store import Conflict, Invalid, NotFound, StoreError
from agencyllm.serving.gateway.inputs import InvalidInput

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
        audit_reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}
        # Why a credential was refused, for the audit trail; the client sees one message for all.
        self.audit_reason = audit_reason

    def body(self) -> dict[str, dict[str, Any]]:
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
        503,
        message,
        type="service_unavailable",
        code="service_unavailable",
        headers={"Retry-After": str(quotas_db.RETRY_AFTER_SECONDS)},
    )


DATABASE_UNAVAILABLE_MESSAGE = "The service is temporarily unavailable (its database cannot be reached). Please retry."
ENGINE_UNAVAILABLE_MESSAGE = "The model is temporarily unavailable. Please retry."


# Quota refusals by reason: status and OpenAI error type. Limits reached are 429 (token budgets
# as `insufficient_quota`, like OpenAI's billing limit; request limits as `rate_limit_exceeded`).
_REFUSALS = {
    "tenant_not_found": (404, "invalid_request_error"),
    "tenant_suspended": (403, "permission_error"),
    "model_not_allowed": (403, "permission_error"),
    "max_tokens_over_limit": (400, "invalid_request_error"),
    "context_length_exceeded": (400, "invalid_request_error"),
    "tokens_per_day": (429, "insufficient_quota"),
    "tokens_per_month": (429, "insufficient_quota"),
}
_STORE_STATUS = {NotFound: 404, Conflict: 409, Invalid: 400}


def refusal(exc: AdmissionRefused) -> OpenAIError:
    status, kind = _REFUSALS.get(exc.reason, (429, "rate_limit_exceeded"))
    headers = dict(exc.headers)
    if exc.retry_after is not None:
        headers.setdefault("retry-after", str(max(1, math.ceil(exc.retry_after))))
    return OpenAIError(status, exc.message, type=kind, param=exc.param, code=exc.reason, headers=headers)


def as_openai_error(exc: BaseException) -> OpenAIError | None:
    """The one mapping of domain errors to HTTP answers; None for a fault of our own (500)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, AdmissionRefused):
        return refusal(exc)
    if isinstance(exc, StoreError):
        status = next((code for kind, code in _STORE_STATUS.items() if isinstance(exc, kind)), 400)
        return OpenAIError(status, exc.message, param=exc.param)
    if isinstance(exc, InvalidInput):
        return invalid_input(exc)
    if isinstance(exc, EngineUnavailable):
        return unavailable(ENGINE_UNAVAILABLE_MESSAGE)
    if quotas_db.database_unavailable(exc):
        quotas_db.availability.failed(exc)
        return unavailable(DATABASE_UNAVAILABLE_MESSAGE)
    return None


# Where FastAPI found a value (`query.group_by`), and the steps pydantic adds for unions and
# validators (`function-after[...]`, `tagged-union[...]`, member class names): not parameters.
_LOCATIONS = ("body", "query", "path", "header", "cookie")


def invalid_input(exc: InvalidInput) -> OpenAIError:
    return OpenAIError(400, exc.message, param=exc.param, code=exc.code)


def validation_error(errors: Sequence[Mapping[str, Any]], *, from_request: bool = False) -> OpenAIError:
    """The first of pydantic's validation errors as a 400 naming the parameter, whether FastAPI
    validated the request (`from_request`) or a route parsed its body itself."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return OpenAIError(400, "The request body is not valid JSON.", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ())]
    if from_request and loc and loc[0] in _LOCATIONS:
        loc = loc[1:]
    loc = [p for p in loc if not p.startswith(("function-", "tagged-union")) and not p[:1].isupper()]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return OpenAIError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    reason = str(first.get("msg", "invalid value")).removeprefix("Value error, ").rstrip(".")
    message = f"Invalid value for '{param}': {reason}." if param else f"Invalid request: {reason}."
    return OpenAIError(400, message, param=param, code="invalid_value" if param else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors(), from_request=True).response()

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
    for kind in (AdmissionRefused, StoreError, InvalidInput, EngineUnavailable, *quotas_db.UNAVAILABLE_ERRORS):
        app.add_exception_handler(kind, _domain)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return await _domain(request, exc)


def _server_error(request: Request, exc: BaseException) -> JSONResponse:
    # Full detail stays in the server log (no request body: it may hold prompts or secrets).
    log.error("unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
    return OpenAIError(500, "The server had an error while processing your request.", type="server_error").response()
