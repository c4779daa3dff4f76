"""The FastAPI application every replica serves: error shape, body limit, input guard, CORS, the
admin, feedback and metrics routes and the console (the OpenAI routes are added by `openai`)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from agencyllm.serving.admin import router as admin_router
from agencyllm.serving.admin.feedback import router as feedback_router
from agencyllm.serving.console import mount as mount_console
from agencyllm.serving.gateway.errors import install_error_handlers
from agencyllm.serving.gateway.governance import RequestSource
from agencyllm.serving.gateway.guards import BodySizeLimit, InputGuard
from agencyllm.serving.http.metrics import router as metrics_router


def create_app(
    *, cors_origins: list[str], max_request_bytes: int, api_docs: bool = False, max_upload_bytes: int = 0
) -> FastAPI:
    docs = {} if api_docs else {"openapi_url": None, "docs_url": None, "redoc_url": None}
    app = FastAPI(
        title="agencyllm",
        summary="OpenAI-compatible API and administration for the agency's private models.",
        version="0.1.0",
        # `/v1/models/` would otherwise answer an unauthenticated 307 that echoes the Host header.
        redirect_slashes=False,
        **docs,
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
    app.add_middleware(InputGuard)
    app.add_middleware(RequestSource)  # the caller's address, for audit records
    # Outermost: before anything reads. File uploads (multipart) may be larger than JSON bodies.
    upload_limit = max(max_upload_bytes, max_request_bytes)
    app.add_middleware(BodySizeLimit, limit=max_request_bytes, upload_path="/v1/files", upload_limit=upload_limit)
    app.include_router(admin_router)
    app.include_router(feedback_router)
    app.include_router(metrics_router)
    mount_console(app)
    return app
