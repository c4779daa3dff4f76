"""What every console page shares: the signed-in viewer, CSRF checks, templates, error pages,
security headers and the session cookie written back on the way out."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.responses import RedirectResponse

from agencyllm.auth.principal import Principal, Role
from agencyllm.quotas.store import StoreError
from agencyllm.serving.console.charts import meter
from agencyllm.serving.console.session import (
    SESSION_COOKIE,
    CookieBox,
    Session,
    SessionTooLarge,
    dump_session,
    load_session,
    session_key,
)
from agencyllm.serving.console.signin import SignInClient, SignInFailed
from agencyllm.serving.gateway.errors import OpenAIError, as_openai_error
from agencyllm.serving.gateway.identity import Authenticator
from agencyllm.serving.settings import Settings

log = logging.getLogger("agencyllm.console")

PREFIX = "/console"
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals["meter_svg"] = meter
# Refresh the access token this long before it expires.
REFRESH_MARGIN_SECONDS = 20
# Write the session back (new idle deadline) at most this often.
TOUCH_SECONDS = 60


class SignInRequired(Exception):
    pass


class CsrfRefused(Exception):
    pass


@dataclass
class Console:
    """Per-replica console services, built on first use from what the ingress put on app.state."""

    settings: Settings
    authenticator: Authenticator
    box: CookieBox
    signin: SignInClient | None

    @property
    def oidc(self) -> bool:
        return self.signin is not None


def console_of(request: Request) -> Console:
    state = request.app.state
    console = getattr(state, "console", None)
    if console is None:
        settings: Settings = state.settings
        authenticator: Authenticator = state.authenticator
        verifier = authenticator.verifier
        signin = SignInClient(settings, verifier) if verifier is not None else None
        console = Console(settings, authenticator, CookieBox(session_key(settings)), signin)
        state.console = console
    return console


def base_url(request: Request) -> str:
    """Where users reach the platform: AGENCYLLM_PUBLIC_URL, else this request's own origin."""
    configured = console_of(request).settings.public_url
    return (configured or str(request.base_url)).rstrip("/")


def secure_cookies(request: Request) -> bool:
    return base_url(request).startswith("https://") or request.url.scheme == "https"


def safe_next(value: Any, default: str = f"{PREFIX}/") -> str:
    """Only paths inside the console: never another host (`//evil`, `/\\evil`, `https://…`)."""
    if not isinstance(value, str) or not value.startswith(f"{PREFIX}/") or "\\" in value or "//" in value:
        return default
    return value


def set_cookie(request: Request, response: Response, name: str, value: str, *, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=PREFIX, httponly=True, samesite="lax", secure=secure_cookies(request)
    )


def clear_cookie(request: Request, response: Response, name: str) -> None:
    response.delete_cookie(name, path=PREFIX, httponly=True, samesite="lax", secure=secure_cookies(request))


def save_session(request: Request, session: Session | None) -> None:
    """Ask for the session cookie to be (re)written, or cleared with None, on the way out."""
    request.state.console_session = session


# --- the viewer -----------------------------------------------------------------------------


@dataclass
class Viewer:
    principal: Principal
    session: Session

    @property
    def is_platform_admin(self) -> bool:
        return self.principal.is_platform_admin

    @property
    def administers_tenant(self) -> bool:
        return Role.TENANT_ADMIN in self.principal.roles and self.principal.tenant is not None

    @property
    def name(self) -> str:
        if self.session.kind == "key":
            return "Platform administrator (key)"
        return self.principal.username or self.principal.subject


async def current_viewer(request: Request) -> Viewer:
    console = console_of(request)
    session = load_session(console.box, request.cookies.get(SESSION_COOKIE), console.settings)
    if session is None:
        raise SignInRequired
    request.state.console_loaded_session = session
    now = time.time()
    if session.kind == "oidc" and (session.credential_expires or 0) - REFRESH_MARGIN_SECONDS < now:
        if not session.refresh_token or console.signin is None:
            raise SignInRequired
        try:
            tokens = await console.signin.refresh(session.refresh_token)
        except SignInFailed as exc:
            log.info("console session ended: refresh refused (%s)", exc.reason)
            raise SignInRequired from None
        session.credential, session.credential_expires = tokens.access_token, tokens.expires_at
        session.refresh_token = tokens.refresh_token or session.refresh_token
        save_session(request, session)
    try:
        principal = await console.authenticator.authenticate(f"Bearer {session.credential}")
    except OpenAIError as exc:
        if exc.status == 401:
            raise SignInRequired from None
        raise
    if now - session.seen > TOUCH_SECONDS:
        session.seen = now
        save_session(request, session)
    request.state.viewer = Viewer(principal, session)
    return request.state.viewer


CurrentViewer = Annotated[Viewer, Depends(current_viewer)]


def check_same_origin(request: Request) -> None:
    """Browsers say where a form came from; a cross-site one is refused before anything else."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise CsrfRefused
    origin = request.headers.get("origin")
    if origin and origin != "null":
        expected = urlsplit(base_url(request))
        actual = urlsplit(origin)
        own = urlsplit(str(request.base_url))
        if (actual.scheme, actual.netloc) not in {(expected.scheme, expected.netloc), (own.scheme, own.netloc)}:
            raise CsrfRefused
    elif origin == "null":
        raise CsrfRefused


async def checked_form(request: Request, expected_token: str) -> FormData:
    """The posted form, once its origin and CSRF token are right."""
    check_same_origin(request)
    form = await request.form()
    token = form.get("csrf_token")
    if not isinstance(token, str) or not hmac.compare_digest(token.encode(), expected_token.encode()):
        raise CsrfRefused
    return form


async def posted(request: Request, viewer: Viewer) -> FormData:
    return await checked_form(request, viewer.session.csrf)


def flash(request: Request, viewer: Viewer, message: str, **extra: Any) -> None:
    viewer.session.flash = {"message": message, **extra}
    save_session(request, viewer.session)


def take_flash(request: Request, viewer: Viewer) -> dict[str, Any] | None:
    message = viewer.session.flash
    if message is not None:
        viewer.session.flash = None
        save_session(request, viewer.session)
    return message


def redirect(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


# --- errors in plain words ------------------------------------------------------------------

FIELD_HELP = {
    "name": "Use 2 to 63 lowercase letters, digits and hyphens, starting with a letter or digit.",
    "display_name": "Use at most 200 characters.",
    "keycloak_group": "Use at most 255 characters, such as 'roads' or '/agencies/roads'.",
    "expires_in_days": "Enter a whole number of days from 1 to 3650, or leave it empty.",
    "allowed_models": "List model names separated by commas, or leave it empty to allow every model.",
    "share": "Enter a number above 0 and at most 1000, such as 2, or leave it empty for 1.",
}


def field_errors(exc: Exception) -> tuple[dict[str, str], str | None]:
    """({field: message}, page-level message) for an admin API error, a store error or a
    validation error."""
    if isinstance(exc, ValidationError):
        errors: dict[str, str] = {}
        for error in exc.errors(include_url=False, include_input=False):
            field = str(error["loc"][0]) if error.get("loc") else ""
            errors.setdefault(field, FIELD_HELP.get(field) or str(error.get("msg", "Invalid value.")))
        return errors, None
    if isinstance(exc, StoreError):
        exc = as_openai_error(exc)
    if isinstance(exc, OpenAIError):
        if exc.param:
            return {exc.param: exc.message}, None
        return {}, exc.message
    raise exc


# --- pages ----------------------------------------------------------------------------------


def nav_items(viewer: Viewer | None) -> list[tuple[str, str]]:
    if viewer is None:
        return []
    items: list[tuple[str, str]] = []
    principal = viewer.principal
    if viewer.is_platform_admin:
        items.append(("Tenants", f"{PREFIX}/tenants"))
    elif viewer.administers_tenant:
        items.append(("My tenant", f"{PREFIX}/tenants/{quote(principal.tenant or '')}"))
    if viewer.is_platform_admin or viewer.administers_tenant:
        items.append(("Usage", f"{PREFIX}/usage"))
    items.append(("My keys and usage", f"{PREFIX}/me"))
    items.append(("Batches", f"{PREFIX}/batches"))
    return items


def render(
    request: Request, template: str, viewer: Viewer | None, *, status_code: int = 200, **context: Any
) -> Response:
    path = request.url.path
    current = None
    for _, href in nav_items(viewer):
        if path == href or path.startswith(href + "/"):
            current = href
    context.setdefault("title", "Console")
    return templates.TemplateResponse(
        request,
        template,
        {
            "viewer": viewer,
            "nav": nav_items(viewer),
            "current": current,
            "csrf": viewer.session.csrf if viewer else None,
            "prefix": PREFIX,
            **context,
        },
        status_code=status_code,
    )


def error_page(request: Request, status: int, message: str) -> Response:
    viewer: Viewer | None = getattr(request.state, "viewer", None)
    # Signed in, but the platform refused the account (no tenant, tenant suspended): offer sign-out.
    refused: Session | None = getattr(request.state, "console_loaded_session", None) if viewer is None else None
    titles = {400: "That did not work", 403: "Not allowed", 404: "Not found", 409: "That did not work"}
    return render(
        request,
        "error.html",
        viewer,
        status_code=status,
        title=titles.get(status, "Something went wrong"),
        message=message,
        refused_csrf=refused.csrf if refused is not None else None,
    )


def security_headers(request: Request, response: Response) -> None:
    form_action = ["'self'"]
    console = getattr(request.app.state, "console", None)
    if console is not None and console.settings.oidc_issuer:
        issuer = urlsplit(console.settings.oidc_issuer)
        form_action.append(f"{issuer.scheme}://{issuer.netloc}")
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        f"form-action {' '.join(form_action)}; frame-ancestors 'none'; base-uri 'none'",
    )
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Cache-Control", "no-store")


class ConsoleRoute(APIRoute):
    """Console routes answer in HTML: sign-in redirects, error pages, the session cookie."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignInRequired:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                response = redirect(f"{PREFIX}/login?next={quote(safe_next(target))}")
                save_session(request, None)
            except CsrfRefused:
                log.info("console refused a form without a valid CSRF token on %s", request.url.path)
                response = error_page(
                    request,
                    403,
                    "This form was not sent from this console, or it has expired. Reload the page and try again.",
                )
            except (OpenAIError, StoreError) as exc:
                error = as_openai_error(exc) if isinstance(exc, StoreError) else exc
                response = error_page(request, error.status, error.message)
            except Exception as exc:
                log.error(
                    "console error on %s %s: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc
                )
                response = error_page(
                    request, 500, "The console had an error. Try again; if it persists, tell your platform team."
                )
            if hasattr(request.state, "console_session"):
                session = request.state.console_session
                if session is None:
                    clear_cookie(request, response, SESSION_COOKIE)
                else:
                    settings = console_of(request).settings
                    try:
                        value = dump_session(console_of(request).box, session)
                    except SessionTooLarge as exc:
                        log.error("console session does not fit in a cookie (%s): trim the token's claims", exc)
                        response = error_page(
                            request,
                            500,
                            "Your sign-in token is too large for a browser cookie; ask your platform team.",
                        )
                        clear_cookie(request, response, SESSION_COOKIE)
                    else:
                        set_cookie(request, response, SESSION_COOKIE, value, max_age=settings.console_max_hours * 3600)
            security_headers(request, response)
            return response

        return handle
