"""Feedback and content-retention routes:

- `POST /v1/feedback`: staff rate a response (its `x-agencyllm-request-id`), say what was wrong
  (inaccurate, harmful, biased, …) in free text; stored under their tenant.
- `GET /admin/v1/feedback`: admins list or export it (JSON, JSON lines, CSV).
- `GET|PUT /admin/v1/tenants/{name}/retention`: a tenant's content-retention opt-in.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Annotated, Literal

from fastapi import APIRouter, Query, status
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from agencyllm.quotas import store
from agencyllm.quotas.compliance import feedback as feedback_store
from agencyllm.quotas.compliance.governance import MAX_RETENTION_DAYS, set_content_retention
from agencyllm.quotas.models import FeedbackCategory
from agencyllm.serving.admin.access import PlatformAdmin, TenantAdmin
from agencyllm.serving.admin.schemas import documented_errors
from agencyllm.serving.admin.usage import parse_bound, scoped_tenant
from agencyllm.serving.gateway.deps import CurrentPrincipal, DbSession, SettingsDep
from agencyllm.serving.gateway.errors import OpenAIError

COLUMNS = ("id", "created_at", "tenant", "request_id", "subject", "username", "rating", "category", "comment")


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(default=None, max_length=200, description="The response's `x-agencyllm-request-id`.")
    rating: StrictInt | None = Field(default=None, ge=1, le=5, description="1 (bad) to 5 (good).")
    category: FeedbackCategory = FeedbackCategory.OTHER
    comment: str | None = Field(default=None, max_length=feedback_store.MAX_COMMENT_CHARS)


class FeedbackOut(BaseModel):
    id: int
    tenant: str
    request_id: str | None
    subject: str
    username: str | None
    rating: int | None
    category: str
    comment: str | None
    created_at: str


class RetentionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content_retention_days: StrictInt | None = Field(
        ge=1,
        le=MAX_RETENTION_DAYS,
        description="Keep prompts and outputs this many days; null keeps none (the default).",
    )


class RetentionOut(BaseModel):
    tenant: str
    content_retention_days: int | None


router = APIRouter()


@router.post(
    "/v1/feedback",
    status_code=status.HTTP_201_CREATED,
    tags=["feedback"],
    summary="Rate a response or report a problem with it",
    responses=documented_errors(400, 401, 403, 404, 413, 503),
)
async def submit(body: FeedbackIn, principal: CurrentPrincipal, session: DbSession) -> FeedbackOut:
    if principal.tenant is None:
        raise OpenAIError(403, "Your account belongs to no tenant, so it cannot send feedback.")
    item = await feedback_store.submit_feedback(
        session,
        tenant_name=principal.tenant,
        subject=principal.subject,
        username=principal.username,
        request_id=body.request_id,
        rating=body.rating,
        category=body.category,
        comment=body.comment,
    )
    return FeedbackOut(**item)


@router.get(
    "/admin/v1/feedback",
    tags=["feedback"],
    summary="List or export feedback (platform admin: all tenants; tenant admin: their own)",
    responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}},
)
async def list_feedback(
    principal: CurrentPrincipal,
    session: DbSession,
    settings: SettingsDep,
    tenant: str | None = None,
    category: FeedbackCategory | None = None,
    from_: Annotated[str | None, Query(alias="from", description="Date or date-time, inclusive")] = None,
    to: Annotated[str | None, Query(description="Date (inclusive) or date-time (exclusive)")] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    format: Literal["json", "jsonl", "csv"] = "json",
):
    tenant = scoped_tenant(principal, tenant)
    zone = settings.quota_timezone
    rows = await feedback_store.list_feedback(
        session,
        tenant_names=None if tenant is None else [tenant],
        since=parse_bound(from_, "from", zone, end=False),
        until=parse_bound(to, "to", zone, end=True),
        category=category,
        limit=limit,
    )
    if format == "jsonl":
        return Response("".join(json.dumps(r) + "\n" for r in rows), media_type="application/x-ndjson")
    if format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8")
    return rows


@router.get("/admin/v1/tenants/{name}/retention", tags=["tenants"], summary="A tenant's content-retention setting")
async def get_retention(name: str, principal: TenantAdmin, session: DbSession) -> RetentionOut:
    tenant = await store.get_tenant(session, name)
    return RetentionOut(tenant=name, content_retention_days=tenant.content_retention_days)


@router.put(
    "/admin/v1/tenants/{name}/retention",
    tags=["tenants"],
    summary="Opt a tenant in to (or out of) keeping prompts and outputs (platform admin)",
)
async def put_retention(name: str, body: RetentionIn, principal: PlatformAdmin, session: DbSession) -> RetentionOut:
    days = await set_content_retention(session, principal, name, body.content_retention_days)
    return RetentionOut(tenant=name, content_retention_days=days)
