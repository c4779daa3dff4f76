"""The admin REST API, mounted at /admin/v1 (see docs/admin-api.md)."""

from __future__ import annotations

from fastapi import APIRouter

from agencyllm.serving.admin import keys, me, quotas, tenants, usage
from agencyllm.serving.admin.schemas import ErrorBody

_ERRORS = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Invalid request",
        401: "Missing or invalid credentials",
        403: "Not allowed for this caller",
        404: "No such tenant or key",
        409: "Conflicts with existing data",
    }.items()
}

router = APIRouter(prefix="/admin/v1", responses=_ERRORS)
for module in (tenants, quotas, keys, me, usage):
    router.include_router(module.router)

__all__ = ["router"]
