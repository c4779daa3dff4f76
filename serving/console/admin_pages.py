"""Admin pages: the tenant list, a tenant's page, settings, suspension and quota.

Every page calls the admin API's own access checks and route functions in-process, so the console
allows exactly what `/admin/v1` allows: a tenant admin never reaches another tenant's pages or forms.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from agencyllm.serving.admin import access, quotas, tenants
from agencyllm.serving.admin.schemas import Quota, TenantCreate, TenantUpdate
from agencyllm.serving.console.forms import ADMIN_ERRORS, FormProblem, share_number, tenant_path, text, whole_number
from agencyllm.serving.console.web import (
    ConsoleRoute,
    CurrentViewer,
    Viewer,
    field_errors,
    flash,
    posted,
    redirect,
    render,
    safe_next,
    take_flash,
)
from agencyllm.serving.gateway.deps import DbSession, LedgerDep

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)

QUOTA_LABELS = {
    "tokens_per_day": "Tokens per day",
    "tokens_per_month": "Tokens per month",
    "requests_per_minute": "Requests per minute",
    "max_concurrent_requests": "Concurrent requests",
    "max_tokens_per_request": "Most tokens per request",
}


async def _tenants_page(
    request: Request,
    viewer: Viewer,
    session,
    *,
    status_code: int = 200,
    errors: dict[str, str] | None = None,
    problem: str | None = None,
    values: dict[str, Any] | None = None,
) -> Response:
    listed = await tenants.list_tenants(viewer.principal, session)
    return render(
        request,
        "tenants.html",
        viewer,
        status_code=status_code,
        title="Tenants",
        tenants=listed,
        errors=errors or {},
        problem=problem,
        values=values or {},
        notice=take_flash(request, viewer),
    )


@router.get("/tenants")
async def tenants_page(request: Request, viewer: CurrentViewer, session: DbSession) -> Response:
    if not viewer.is_platform_admin and viewer.administers_tenant:
        return redirect(tenant_path(viewer.principal.tenant))
    return await _tenants_page(request, viewer, session)


@router.post("/tenants")
async def create_tenant(request: Request, viewer: CurrentViewer, session: DbSession) -> Response:
    form = await posted(request, viewer)
    await access.platform_admin(viewer.principal)
    values = {
        "name": text(form, "name"),
        "display_name": text(form, "display_name"),
        "keycloak_group": text(form, "keycloak_group"),
    }
    try:
        body = TenantCreate(
            name=values["name"] or "", display_name=values["display_name"], keycloak_group=values["keycloak_group"]
        )
        created = await tenants.create_tenant(body, viewer.principal, session)
    except ADMIN_ERRORS as exc:
        errors, problem = field_errors(exc)
        if not values["name"]:
            errors["name"] = "Enter a name for the tenant."
        return await _tenants_page(
            request, viewer, session, status_code=400, errors=errors, problem=problem, values=values
        )
    flash(request, viewer, f"Tenant {created.name} created. Set its quota below, then mint a key.")
    return redirect(tenant_path(created.name))


async def _tenant_page(
    request: Request,
    viewer: Viewer,
    name: str,
    session,
    ledger,
    *,
    status_code: int = 200,
    errors: dict[str, str] | None = None,
    problem: str | None = None,
    values: dict[str, Any] | None = None,
    form_name: str | None = None,
) -> Response:
    await access.tenant_admin(name, viewer.principal)
    tenant = await tenants.get_tenant(name, viewer.principal, session)
    policy = await quotas.get_tenant_quota(name, viewer.principal, session)
    remaining = await ledger.remaining(name)
    rows = []
    for field, label in QUOTA_LABELS.items():
        dim = remaining["tenant_limits"].get(field)
        rows.append(
            {
                "field": field,
                "label": label,
                "limit": getattr(policy, field),
                "used": (dim["used"] + dim["reserved"]) if dim else None,
                "resets_at": dim["resets_at"] if dim else None,
            }
        )
    quota_values = (
        values
        if form_name == "quota" and values is not None
        else {
            **{field: getattr(policy, field) for field in QUOTA_LABELS},
            "max_tokens_mode": policy.max_tokens_mode,
            "allowed_models": ", ".join(policy.allowed_models) if policy.allowed_models else "",
            "share": "" if policy.share is None else f"{policy.share:g}",
        }
    )
    settings_values = (
        values
        if form_name == "settings" and values is not None
        else {"display_name": tenant.display_name, "keycloak_group": tenant.keycloak_group or ""}
    )
    return render(
        request,
        "tenant.html",
        viewer,
        status_code=status_code,
        title=f"Tenant {tenant.display_name}",
        tenant=tenant,
        quota_rows=rows,
        policy=policy,
        quota_values=quota_values,
        settings_values=settings_values,
        errors=errors or {},
        problem=problem,
        form_name=form_name,
        timezone=remaining["timezone"],
        notice=take_flash(request, viewer),
    )


@router.get("/tenants/{name}")
async def tenant_page(
    request: Request, name: str, viewer: CurrentViewer, session: DbSession, ledger: LedgerDep
) -> Response:
    return await _tenant_page(request, viewer, name, session, ledger)


@router.post("/tenants/{name}/settings")
async def update_tenant(
    request: Request, name: str, viewer: CurrentViewer, session: DbSession, ledger: LedgerDep
) -> Response:
    form = await posted(request, viewer)
    await access.platform_admin(viewer.principal)
    values = {"display_name": text(form, "display_name"), "keycloak_group": text(form, "keycloak_group")}
    try:
        body = TenantUpdate(**values)
        await tenants.update_tenant(name, body, viewer.principal, session)
    except ADMIN_ERRORS as exc:
        errors, problem = field_errors(exc)
        return await _tenant_page(
            request,
            viewer,
            name,
            session,
            ledger,
            status_code=400,
            errors=errors,
            problem=problem,
            values=values,
            form_name="settings",
        )
    group = values["keycloak_group"]
    flash(
        request,
        viewer,
        f"Saved. Members of Keycloak group {group} now belong to this tenant."
        if group
        else "Saved. No Keycloak group is mapped to this tenant.",
    )
    return redirect(tenant_path(name))


async def _set_status(request: Request, name: str, viewer: Viewer, session, action: str) -> Response:
    form = await posted(request, viewer)
    await access.platform_admin(viewer.principal)
    change = tenants.suspend_tenant if action == "suspend" else tenants.resume_tenant
    tenant = await change(name, viewer.principal, session)
    flash(
        request,
        viewer,
        f"Tenant {tenant.name} is suspended: its users and keys are refused."
        if tenant.status == "suspended"
        else f"Tenant {tenant.name} is active again.",
    )
    return redirect(safe_next(form.get("back"), tenant_path(name)))


@router.post("/tenants/{name}/suspend")
async def suspend(request: Request, name: str, viewer: CurrentViewer, session: DbSession) -> Response:
    return await _set_status(request, name, viewer, session, "suspend")


@router.post("/tenants/{name}/resume")
async def resume(request: Request, name: str, viewer: CurrentViewer, session: DbSession) -> Response:
    return await _set_status(request, name, viewer, session, "resume")


@router.post("/tenants/{name}/quota")
async def set_quota(
    request: Request, name: str, viewer: CurrentViewer, session: DbSession, ledger: LedgerDep
) -> Response:
    form = await posted(request, viewer)
    await access.platform_admin(viewer.principal)
    values: dict[str, Any] = {
        field: text(form, field) for field in (*QUOTA_LABELS, "max_tokens_mode", "allowed_models", "share")
    }
    try:
        numbers = {field: whole_number(form, field) for field in QUOTA_LABELS}
        models = [m.strip() for m in (values["allowed_models"] or "").split(",") if m.strip()]
        body = Quota(
            **numbers,
            max_tokens_mode=values["max_tokens_mode"] or "cap",
            allowed_models=models or None,
            share=share_number(form),
        )
        await quotas.put_tenant_quota(name, body, viewer.principal, session)
    except FormProblem as problem:
        return await _tenant_page(
            request,
            viewer,
            name,
            session,
            ledger,
            status_code=400,
            errors={problem.field: problem.message},
            values=values,
            form_name="quota",
        )
    except ADMIN_ERRORS as exc:
        errors, problem = field_errors(exc)
        return await _tenant_page(
            request,
            viewer,
            name,
            session,
            ledger,
            status_code=400,
            errors=errors,
            problem=problem,
            values=values,
            form_name="quota",
        )
    flash(request, viewer, "Quota saved. It applies from the next request.")
    return redirect(tenant_path(name))
