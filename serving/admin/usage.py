"""/admin/v1/usage: ledger totals grouped by day, user, model or tenant, as JSON or CSV."""

from __future__ import annotations

import csv
import io
from datetime import date, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from agencyllm.auth.principal import Principal
from agencyllm.quotas import store
from agencyllm.serving.admin.access import forbidden, require_tenant_admin
from agencyllm.serving.admin.schemas import UsageReport
from agencyllm.serving.gateway.deps import CurrentPrincipal, DbSession, SettingsDep
from agencyllm.serving.gateway.errors import OpenAIError
from agencyllm.serving.gateway.inputs import as_utc, check_date_range

router = APIRouter(tags=["usage"])

TOTALS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


def parse_bound(value: str | None, param: str, time_zone: str, *, end: bool) -> datetime | None:
    """A date (whole calendar day in the quota time zone; `to` includes it) or an ISO datetime."""
    if value is None:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        day = None
    if day is not None:
        check_date_range(day, param)
        since, until = store.day_bounds(day, day, time_zone)
        return until if end else since
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise OpenAIError(
            400, f"'{param}' must be a date (YYYY-MM-DD) or an ISO 8601 date-time.", param=param
        ) from None
    return as_utc(moment, param)


def scoped_tenant(principal: Principal, tenant: str | None) -> str | None:
    if principal.is_platform_admin:
        return tenant
    if tenant is None:
        tenant = principal.tenant
    if tenant is None:
        raise forbidden("Usage reports need an administrator role.")
    require_tenant_admin(principal, tenant)
    return tenant


def as_csv(group_by: str, rows: list[dict]) -> str:
    columns = [group_by, *(["username"] if group_by == "user" else []), *TOTALS]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


@router.get(
    "/usage",
    summary="Usage totals (platform admin: all tenants; tenant admin: their own)",
    response_model=UsageReport,
    response_model_exclude_none=True,
    responses={200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"}},
)
async def usage(
    principal: CurrentPrincipal,
    session: DbSession,
    settings: SettingsDep,
    tenant: str | None = None,
    user: Annotated[str | None, Query(description="User subject or username")] = None,
    model: str | None = None,
    from_: Annotated[str | None, Query(alias="from", description="Date or date-time, inclusive")] = None,
    to: Annotated[str | None, Query(description="Date (inclusive) or date-time (exclusive)")] = None,
    group_by: Literal["day", "user", "model", "tenant"] = "day",
    format: Literal["json", "csv"] = "json",
):
    tenant = scoped_tenant(principal, tenant)
    time_zone = settings.quota_timezone
    rows = await store.usage_report(
        session,
        tenant_name=tenant,
        user=user,
        model=model,
        since=parse_bound(from_, "from", time_zone, end=False),
        until=parse_bound(to, "to", time_zone, end=True),
        group_by=group_by,
        time_zone=time_zone,
    )
    if format == "csv":
        return Response(
            as_csv(group_by, rows),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="usage-by-{group_by}.csv"'},
        )
    return {"group_by": group_by, "rows": rows}
