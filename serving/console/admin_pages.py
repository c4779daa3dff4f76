"""Admin pages: tenants, a tenant's quota and keys, usage charts and CSV.

Every page calls the admin API's own access checks and route functions in-process, so the console
allows exactly what `/admin/v1` allows: a tenant admin never reaches another tenant's pages or forms.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from agencyllm.quotas import store
from agencyllm.quotas.models import MAX_SHARE, TRAFFIC_CLASSES
from agencyllm.serving.admin import access, keys, quotas, tenants, usage
from agencyllm.serving.admin.schemas import KeyCreate, Quota, TenantCreate, TenantUpdate
from agencyllm.serving.console import reports
from agencyllm.serving.console.web import (
    PREFIX,
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
from agencyllm.serving.gateway.deps import DbSession, LedgerDep, SettingsDep
from agencyllm.serving.gateway.errors import OpenAIError

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)

QUOTA_LABELS = {
    "tokens_per_day": "Tokens per day",
    "tokens_per_month": "Tokens per month",
    "requests_per_minute": "Requests per minute",
    "max_concurrent_requests": "Concurrent requests",
    "max_tokens_per_request": "Most tokens per request",
}
ADMIN_ERRORS = (OpenAIError, store.StoreError, ValidationError)


def tenant_path(name: str, *rest: str) -> str:
    return "/".join([f"{PREFIX}/tenants/{quote(name, safe='')}", *rest])


def text(form, name: str) -> str | None:
    value = str(form.get(name) or "").strip()
    return value or None


class FormProblem(Exception):
    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message


def whole_number(form, name: str) -> int | None:
    raw = (text(form, name) or "").replace(",", "").replace("_", "").replace(" ", "")
    if not raw:
        return None
    if not raw.isdigit():
        raise FormProblem(name, "Enter a whole number such as 2000000, or leave it empty for no limit.")
    value = int(raw)
    if value > store.QUOTA_MAXIMUMS.get(name, 3650):
        raise FormProblem(name, f"Enter a number no larger than {store.QUOTA_MAXIMUMS.get(name, 3650):,}.")
    return value


def share_number(form, name: str = "share") -> float | None:
    raw = (text(form, name) or "").replace(" ", "")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_SHARE:
        raise FormProblem(name, f"Enter a number above 0 and at most {MAX_SHARE}, such as 2, or leave it empty for 1.")
    return value


# --- tenants ----------------------------------------------------------------------------------


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


# --- keys -------------------------------------------------------------------------------------


async def _keys_page(
    request: Request,
    viewer: Viewer,
    name: str,
    session,
    *,
    show_revoked: bool = False,
    status_code: int = 200,
    errors: dict[str, str] | None = None,
    problem: str | None = None,
    values: dict[str, Any] | None = None,
) -> Response:
    await access.tenant_admin(name, viewer.principal)
    tenant = await tenants.get_tenant(name, viewer.principal, session)
    listed = await keys.list_tenant_keys(name, viewer.principal, session, include_revoked=show_revoked)
    return render(
        request,
        "keys.html",
        viewer,
        status_code=status_code,
        title=f"Keys of {tenant.display_name}",
        tenant=tenant,
        keys=listed,
        show_revoked=show_revoked,
        errors=errors or {},
        problem=problem,
        values=values or {},
        notice=take_flash(request, viewer),
        back=tenant_path(name, "keys") + ("?show_revoked=true" if show_revoked else ""),
    )


@router.get("/tenants/{name}/keys")
async def keys_page(
    request: Request, name: str, viewer: CurrentViewer, session: DbSession, show_revoked: bool = False
) -> Response:
    return await _keys_page(request, viewer, name, session, show_revoked=show_revoked)


def key_body(form) -> KeyCreate:
    days = text(form, "expires_in_days")
    if days is not None and not days.isdigit():
        raise FormProblem("expires_in_days", "Enter a whole number of days, or leave it empty for no expiry.")
    traffic_class = text(form, "traffic_class") or "interactive"
    if traffic_class not in TRAFFIC_CLASSES:
        raise FormProblem("traffic_class", "Choose interactive or batch.")
    return KeyCreate(
        name=text(form, "name") or "", expires_in_days=int(days) if days else None, traffic_class=traffic_class
    )


@router.post("/tenants/{name}/keys")
async def mint_service_key(request: Request, name: str, viewer: CurrentViewer, session: DbSession) -> Response:
    form = await posted(request, viewer)
    await access.tenant_admin(name, viewer.principal)
    values = {
        "name": text(form, "name"),
        "expires_in_days": text(form, "expires_in_days"),
        "traffic_class": text(form, "traffic_class"),
    }
    try:
        created = await keys.create_service_key(name, key_body(form), viewer.principal, session)
    except FormProblem as problem:
        return await _keys_page(
            request, viewer, name, session, status_code=400, errors={problem.field: problem.message}, values=values
        )
    except ADMIN_ERRORS as exc:
        errors, problem = field_errors(exc)
        if not values["name"]:
            errors = {"name": "Give the key a name, such as the job or notebook that will use it."}
        return await _keys_page(
            request, viewer, name, session, status_code=400, errors=errors, problem=problem, values=values
        )
    flash(request, viewer, f"Key {created.name} minted.", key=created.key, key_name=created.name)
    return redirect(tenant_path(name, "keys"))


@router.post("/keys/{key_id}/revoke")
async def revoke(request: Request, key_id: str, viewer: CurrentViewer, session: DbSession) -> Response:
    form = await posted(request, viewer)
    revoked = await keys.revoke_key(key_id, viewer.principal, session)
    flash(request, viewer, f"Key {revoked.name} ({revoked.prefix}) revoked: it is refused from the next request on.")
    return redirect(safe_next(form.get("back"), f"{PREFIX}/me"))


# --- usage ------------------------------------------------------------------------------------


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
