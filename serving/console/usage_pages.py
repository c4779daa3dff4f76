"""Usage pages: the usage chart and its CSV export."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from agencyllm.serving.admin import tenants, usage
from agencyllm.serving.console import reports
from agencyllm.serving.console.web import ConsoleRoute, CurrentViewer, render
from agencyllm.serving.gateway.deps import DbSession, SettingsDep
from agencyllm.serving.gateway.errors import OpenAIError

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)


@router.get("/usage")
async def usage_page(
    request: Request,
    viewer: CurrentViewer,
    session: DbSession,
    settings: SettingsDep,
    tenant: str | None = None,
    split: str = "model",
) -> Response:
    tenant = tenant or None
    if not viewer.is_platform_admin and tenant is None:
        tenant = viewer.principal.tenant
    scoped = usage.scoped_tenant(viewer.principal, tenant)
    split = split if split in ("model", "user") else "model"
    report = await reports.usage_chart(session, settings.quota_timezone, tenant=scoped, split=split)
    choices = (
        [t.name for t in await tenants.list_tenants(viewer.principal, session)] if viewer.is_platform_admin else []
    )
    return render(
        request, "usage.html", viewer, title="Usage", report=report, tenant=scoped, split=split, tenant_choices=choices
    )


@router.get("/usage.csv")
async def usage_csv(
    viewer: CurrentViewer, session: DbSession, settings: SettingsDep, tenant: str | None = None, group_by: str = "day"
) -> Response:
    tenant = tenant or None
    if not viewer.is_platform_admin and tenant is None:
        tenant = viewer.principal.tenant
    if group_by not in ("day", "user", "model", "tenant"):
        raise OpenAIError(400, "Choose a report by day, user, model or tenant.")
    first, _ = reports.window(settings.quota_timezone)
    return await usage.usage(
        viewer.principal, session, settings, tenant=tenant, from_=first.isoformat(), group_by=group_by, format="csv"
    )
