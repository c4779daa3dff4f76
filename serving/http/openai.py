"""The OpenAI and health routes, each one line into the `Gateway` (serving/gateway/pipeline.py).

`http_app(gateway)` is the whole HTTP application a replica serves: `create_app`'s error shape,
limits, admin and console routes, the gateway's services on `app.state` for the admin routes'
dependencies, and the routes below. Nothing here knows about Ray.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from agencyllm.serving.admin.schemas import documented_errors as _errors
from agencyllm.serving.gateway.pipeline import REQUEST_ID_HEADER, TRAFFIC_CLASS_HEADER, Gateway
from agencyllm.serving.http.app import create_app

__all__ = ["ENDPOINTS", "REQUEST_ID_HEADER", "TRAFFIC_CLASS_HEADER", "http_app", "mount", "router"]

_CALL_ERRORS = _errors(400, 401, 403, 404, 413, 429, 503)


def _body(*required: str, **properties: dict) -> dict:
    """The documented part of a request body (vLLM accepts more; unknown fields are ignored)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "object", "required": list(required), "properties": properties}}
            },
        }
    }


_SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "n": {"type": ["integer", "null"], "minimum": 1},
    "stream": {"type": ["boolean", "null"]},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "seed": {"type": ["integer", "null"]},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
}
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}},
}
_TEXTS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}

ENDPOINTS = {
    "chat": lambda app: app.post(
        "/v1/chat/completions",
        tags=["openai"],
        summary="Chat completion (OpenAI)",
        responses=_CALL_ERRORS,
        openapi_extra=_body("model", "messages", messages={"type": "array", "items": _MESSAGE}, **_SAMPLING),
    ),
    "completions": lambda app: app.post(
        "/v1/completions",
        tags=["openai"],
        summary="Text completion (OpenAI)",
        responses=_CALL_ERRORS,
        openapi_extra=_body("model", "prompt", prompt=_TEXTS, **_SAMPLING),
    ),
    "embeddings": lambda app: app.post(
        "/v1/embeddings",
        tags=["openai"],
        summary="Embeddings (OpenAI)",
        responses=_CALL_ERRORS,
        openapi_extra=_body("model", "input", model={"type": "string"}, input=_TEXTS),
    ),
    "models": lambda app: app.get(
        "/v1/models", tags=["openai"], summary="List models", responses=_errors(401, 403, 503)
    ),
    "model_data": lambda app: app.get(
        "/v1/models/{model:path}", tags=["openai"], summary="Read a model", responses=_errors(401, 403, 404, 503)
    ),
    "healthz": lambda app: app.get("/healthz", tags=["health"], summary="Liveness: the ingress answers"),
    "readyz": lambda app: app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: database and every engine answer",
        responses={503: {"description": "Not ready: `checks` says what is down"}},
    ),
}


router = APIRouter()


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


@ENDPOINTS["chat"](router)
async def chat(request: Request) -> Response:
    return await _gateway(request).chat(request)


@ENDPOINTS["completions"](router)
async def completions(request: Request) -> Response:
    return await _gateway(request).completions(request)


@ENDPOINTS["embeddings"](router)
async def embeddings(request: Request) -> Response:
    return await _gateway(request).embeddings(request)


@ENDPOINTS["models"](router)
async def models(request: Request) -> Response:
    return await _gateway(request).models(request)


@ENDPOINTS["model_data"](router)
async def model_data(model: str, request: Request) -> Response:
    return await _gateway(request).model_data(model, request)


@ENDPOINTS["healthz"](router)
async def healthz(request: Request) -> dict:
    return await _gateway(request).healthz()


@ENDPOINTS["readyz"](router)
async def readyz(request: Request) -> Response:
    return await _gateway(request).readyz()


def mount(app: FastAPI, gateway: Gateway) -> None:
    """Serve `gateway` from `app`: its services for the admin routes, and the OpenAI routes."""
    gateway.services.install(app)
    app.state.gateway = gateway
    app.include_router(router)


def http_app(gateway: Gateway) -> FastAPI:
    """The application one replica serves, from the gateway's settings."""
    settings = gateway.settings
    app = create_app(
        cors_origins=settings.cors_origins, max_request_bytes=settings.max_request_bytes, api_docs=settings.api_docs
    )
    mount(app, gateway)
    return app
