"""Staff pages: my keys, my usage and a quick start with this platform's real URL and models."""

from __future__ import annotations

import logging
from typing import Any

import httpx
from fastapi import APIRouter, Request, Response

from agencyllm.serving.admin import me
from agencyllm.serving.console import reports
from agencyllm.serving.console.forms import ADMIN_ERRORS, FormProblem, text
from agencyllm.serving.console.key_pages import key_body
from agencyllm.serving.console.web import (
    PREFIX,
    ConsoleRoute,
    CurrentViewer,
    Viewer,
    base_url,
    field_errors,
    flash,
    posted,
    redirect,
    render,
    take_flash,
)
from agencyllm.serving.gateway.deps import DbSession, LedgerDep, SettingsDep

log = logging.getLogger("agencyllm.console")

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)

LIMIT_LABELS = {
    "tokens_per_day": "Tokens today",
    "tokens_per_month": "Tokens this month",
    "requests_per_minute": "Requests this minute",
    "max_concurrent_requests": "Requests running now",
}


async def model_ids(request: Request, credential: str) -> list[str]:
    """The models this caller may list, from the platform's own `/v1/models`, asked in-process."""
    transport = httpx.ASGITransport(app=request.app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://console.local", timeout=10) as client:
            response = await client.get("/v1/models", headers={"Authorization": f"Bearer {credential}"})
        if response.status_code == 200:
            return [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]
    except Exception as exc:
        log.info("console could not list models: %s", type(exc).__name__)
    return []


async def _me_page(
    request: Request,
    viewer: Viewer,
    session,
    ledger,
    settings,
    *,
    status_code: int = 200,
    errors: dict[str, str] | None = None,
    problem: str | None = None,
    values: dict[str, Any] | None = None,
) -> Response:
    principal = viewer.principal
    who = await me.me(principal, ledger)
    personal = await me.list_personal_keys(principal, session)
    chart = None
    if principal.tenant is not None:
        chart = await reports.usage_chart(
            session,
            settings.quota_timezone,
            tenant=principal.tenant,
            split="model",
            user=principal.subject,
            subject_label="you",
        )
    limits = []
    if who.remaining:
        for scope in ("user_limits", "tenant_limits"):
            for field, label in LIMIT_LABELS.items():
                dim = (who.remaining.get(scope) or {}).get(field)
                if dim and dim["limit"] is not None:
                    limits.append(
                        {
                            "label": label,
                            "scope": "you" if scope == "user_limits" else "your tenant",
                            "limit": dim["limit"],
                            "used": dim["used"] + dim["reserved"],
                            "field": f"{scope}-{field}",
                        }
                    )
    models = await model_ids(request, viewer.session.credential)
    return render(
        request,
        "me.html",
        viewer,
        status_code=status_code,
        title="My keys and usage",
        who=who,
        keys=personal,
        chart=chart,
        limits=limits,
        models=models,
        api_base=f"{base_url(request)}/v1",
        errors=errors or {},
        problem=problem,
        values=values or {},
        notice=take_flash(request, viewer),
        back=f"{PREFIX}/me",
    )


@router.get("/me")
async def me_page(
    request: Request, viewer: CurrentViewer, session: DbSession, ledger: LedgerDep, settings: SettingsDep
) -> Response:
    return await _me_page(request, viewer, session, ledger, settings)


@router.post("/me/keys")
async def mint_personal_key(
    request: Request, viewer: CurrentViewer, session: DbSession, ledger: LedgerDep, settings: SettingsDep
) -> Response:
    form = await posted(request, viewer)
    values = {"name": text(form, "name"), "expires_in_days": text(form, "expires_in_days")}
    try:
        created = await me.create_personal_key(key_body(form), viewer.principal, session)
    except FormProblem as problem:
        return await _me_page(
            request,
            viewer,
            session,
            ledger,
            settings,
            status_code=400,
            errors={problem.field: problem.message},
            values=values,
        )
    except ADMIN_ERRORS as exc:
        errors, problem = field_errors(exc)
        if not values["name"] and not problem:
            errors = {"name": "Give the key a name, such as 'laptop' or 'notebook'."}
        return await _me_page(
            request, viewer, session, ledger, settings, status_code=400, errors=errors, problem=problem, values=values
        )
    flash(request, viewer, f"Key {created.name} minted.", key=created.key, key_name=created.name)
    return redirect(f"{PREFIX}/me")
