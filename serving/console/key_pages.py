"""Key pages: a tenant's API keys, minting a service key and revoking any key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from agencyllm.quotas.models import TRAFFIC_CLASSES
from agencyllm.serving.admin import access, keys, tenants
from agencyllm.serving.admin.schemas import KeyCreate
from agencyllm.serving.console.forms import ADMIN_ERRORS, FormProblem, tenant_path, text
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
from agencyllm.serving.gateway.deps import DbSession

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)


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
