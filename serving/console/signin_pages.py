"""Sign-in and sign-out: Keycloak (authorization code + PKCE) when an issuer is configured, the
platform-admin key otherwise."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict
from urllib.parse import quote

from fastapi import APIRouter, Request, Response

from agencyllm.serving.console.session import FLOW_COOKIE, FLOW_SECONDS, Session
from agencyllm.serving.console.signin import Flow, SignInFailed
from agencyllm.serving.console.web import (
    PREFIX,
    ConsoleRoute,
    CsrfRefused,
    CurrentViewer,
    SignInRequired,
    base_url,
    check_same_origin,
    checked_form,
    clear_cookie,
    console_of,
    current_viewer,
    posted,
    redirect,
    render,
    safe_next,
    save_session,
    set_cookie,
)
from agencyllm.serving.gateway.errors import OpenAIError

log = logging.getLogger("agencyllm.console")

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)

SIGN_IN_FAILED = "Sign-in did not complete. Try again; if it keeps failing, tell your platform team."


def home_for(viewer) -> str:
    principal = viewer.principal
    if principal.is_platform_admin:
        return f"{PREFIX}/tenants"
    if viewer.administers_tenant:
        return f"{PREFIX}/tenants/{quote(principal.tenant)}"
    return f"{PREFIX}/me"


@router.get("")
async def root() -> Response:
    return redirect(f"{PREFIX}/")


@router.get("/")
async def home(viewer: CurrentViewer) -> Response:
    return redirect(home_for(viewer))


def _redirect_uri(request: Request) -> str:
    return f"{base_url(request)}{PREFIX}/auth/callback"


def _login_page(
    request: Request, *, next_path: str, status_code: int = 200, error: str | None = None, notice: dict | None = None
) -> Response:
    console = console_of(request)
    token = secrets.token_urlsafe(32)
    response = render(
        request,
        "login.html",
        None,
        status_code=status_code,
        title="Sign in",
        oidc=console.oidc,
        next_path=next_path,
        login_csrf=token,
        error=error,
        notice=notice,
    )
    set_cookie(
        request,
        response,
        FLOW_COOKIE,
        console.box.seal(FLOW_COOKIE, {"csrf": token, "at": time.time()}),
        max_age=FLOW_SECONDS,
    )
    return response


@router.get("/login")
async def login_page(request: Request, next: str | None = None, signed_out: bool = False) -> Response:
    try:
        viewer = await current_viewer(request)
    except (SignInRequired, OpenAIError):
        viewer = None
    if viewer is not None:
        return redirect(safe_next(next, home_for(viewer)))
    notice = {"message": "You are signed out."} if signed_out else None
    return _login_page(request, next_path=safe_next(next), notice=notice)


def _flow_cookie(request: Request) -> dict | None:
    data = console_of(request).box.open(FLOW_COOKIE, request.cookies.get(FLOW_COOKIE))
    if data is None or time.time() - float(data.get("at", 0)) > FLOW_SECONDS:
        return None
    return data


@router.get("/login/start")
async def login_start(request: Request, next: str | None = None) -> Response:
    """Off to Keycloak, with a fresh state, nonce and PKCE verifier kept in an encrypted cookie."""
    console = console_of(request)
    if console.signin is None:
        return redirect(f"{PREFIX}/login")
    flow = Flow.new(safe_next(next))
    try:
        url = await console.signin.authorization_url(flow, _redirect_uri(request))
    except SignInFailed as exc:
        log.warning("console sign-in could not start: %s", exc.reason)
        return _login_page(
            request,
            next_path=flow.next,
            status_code=503,
            error="The sign-in service cannot be reached right now. Try again in a minute.",
        )
    response = redirect(url)
    set_cookie(
        request,
        response,
        FLOW_COOKIE,
        console.box.seal(FLOW_COOKIE, {**asdict(flow), "at": time.time()}),
        max_age=FLOW_SECONDS,
    )
    return response


@router.get("/auth/callback")
async def callback(
    request: Request, code: str | None = None, state: str | None = None, error: str | None = None
) -> Response:
    console = console_of(request)
    data = _flow_cookie(request)
    if console.signin is None or data is None or "state" not in data:
        return _login_page(
            request, next_path=f"{PREFIX}/", status_code=400, error="That sign-in link has expired. Sign in again."
        )
    flow = Flow(data["state"], data["nonce"], data["verifier"], safe_next(data.get("next")))
    if error or not code or not state or not secrets.compare_digest(state, flow.state):
        log.info("console sign-in refused: %s", error or "missing code or state mismatch")
        return _login_page(request, next_path=flow.next, status_code=400, error=SIGN_IN_FAILED)
    try:
        tokens = await console.signin.exchange(code, flow, _redirect_uri(request))
    except SignInFailed as exc:
        log.info("console sign-in refused: %s", exc.reason)
        return _login_page(request, next_path=flow.next, status_code=400, error=SIGN_IN_FAILED)
    try:
        await console.authenticator.authenticate(f"Bearer {tokens.access_token}")
    except OpenAIError as exc:
        message = exc.message if exc.status == 403 else SIGN_IN_FAILED
        return _login_page(request, next_path=flow.next, status_code=exc.status, error=message)
    save_session(
        request,
        Session(
            kind="oidc",
            credential=tokens.access_token,
            refresh_token=tokens.refresh_token,
            credential_expires=tokens.expires_at,
        ),
    )
    response = redirect(flow.next)
    clear_cookie(request, response, FLOW_COOKIE)
    return response


@router.post("/login")
async def login_with_key(request: Request) -> Response:
    """Without Keycloak: the platform-admin key from DATA_DIR/admin.key, pasted once."""
    console = console_of(request)
    data = _flow_cookie(request)
    form = await checked_form(request, (data or {}).get("csrf") or secrets.token_urlsafe(8))
    next_path = safe_next(form.get("next"))
    if console.oidc:
        return redirect(f"{PREFIX}/login")
    key = str(form.get("api_key") or "").strip()
    error = None
    if not key:
        error = "Paste the platform administrator key."
    else:
        try:
            principal = await console.authenticator.authenticate(f"Bearer {key}")
        except OpenAIError:
            principal = None
        if principal is None:
            error = "That key is not valid: it may be mistyped, revoked or expired."
        elif not principal.is_platform_admin:
            error = "That key is valid but is not a platform administrator key."
    if error:
        response = _login_page(request, next_path=next_path, status_code=400, error=error)
        return response
    save_session(request, Session(kind="key", credential=key))
    response = redirect(next_path)
    clear_cookie(request, response, FLOW_COOKIE)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    console = console_of(request)
    try:
        viewer = await current_viewer(request)
        await posted(request, viewer)
        session = viewer.session
    except (SignInRequired, OpenAIError):
        # A refused account (suspended tenant) may still sign out: check the form against the
        # session's own token.
        session = getattr(request.state, "console_loaded_session", None)
        if session is None:
            return redirect(f"{PREFIX}/login")
        check_same_origin(request)
        form = await request.form()
        if not secrets.compare_digest(str(form.get("csrf_token") or ""), session.csrf):
            raise CsrfRefused from None
    save_session(request, None)
    signed_out = f"{base_url(request)}{PREFIX}/login?signed_out=1"
    if session.kind == "oidc" and console.signin is not None:
        url = await console.signin.logout_url(signed_out)
        if url:
            return redirect(url)
    return redirect(f"{PREFIX}/login?signed_out=1")
