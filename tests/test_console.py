"""The web console in-process: the real app (create_app), Authenticator, Ledger and Postgres, and
the local OIDC issuer over real HTTP for the authorization-code + PKCE sign-in. One file over 400
lines: the pages share one signed-in app per module (key and Keycloak sign-in), built once.

The browser tests (test_console_browser.py) drive the same pages in Chromium against the real stack.
"""

from __future__ import annotations

import csv
import html
import io
import re
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from oidc_issuer import LocalOIDCIssuer
from pydantic import SecretStr
from sqlalchemy import select

from agencyllm.quotas import store
from agencyllm.quotas.db import Database
from agencyllm.quotas.models import ApiKey, Tenant, UsageRecord
from agencyllm.serving.console.session import FLOW_COOKIE, SESSION_COOKIE, CookieBox, Session, dump_session, session_key
from agencyllm.serving.gateway.identity import ensure_bootstrap_admin_key
from agencyllm.serving.gateway.services import Services
from agencyllm.serving.http.app import create_app
from agencyllm.serving.settings import Settings

BASE = "http://console.test"
CONSOLE = Path(__file__).resolve().parents[1] / "serving" / "console"


@asynccontextmanager
async def console_app(settings: Settings, database_url: str) -> AsyncIterator[FastAPI]:
    """The platform's HTTP application over the gateway's services (no OpenAI routes needed)."""
    services = await Services.start(settings.model_copy(update={"database_url": SecretStr(database_url)}))
    app = create_app(cors_origins=[], max_request_bytes=1024 * 1024)
    services.install(app)
    try:
        yield app
    finally:
        await services.aclose()


# The application behind each test client (httpx keeps it in a private attribute).
APPS: weakref.WeakKeyDictionary[httpx.AsyncClient, Any] = weakref.WeakKeyDictionary()


def client_for(app, base_url: str = BASE) -> httpx.AsyncClient:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=base_url, follow_redirects=False)
    APPS[client] = app
    return client


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "no CSRF token on the page"
    return match.group(1)


def field_error(page: str, field_id: str) -> str | None:
    match = re.search(rf'<p class="error" id="{field_id}-error">(.*?)</p>', page, re.S)
    return html.unescape(re.sub("<[^>]+>", "", match.group(1))).strip().removeprefix("Error: ") if match else None


def new_name(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
async def keyed(pg_url, pg_db, tmp_path_factory) -> AsyncIterator[tuple[httpx.AsyncClient, str, Settings]]:
    """A console without Keycloak: sign-in with the platform-admin key."""
    data_dir = tmp_path_factory.mktemp("console-key")
    settings = Settings(data_dir=data_dir)
    path = await ensure_bootstrap_admin_key(pg_db, data_dir)
    async with console_app(settings, pg_url) as app, client_for(app) as client:
        yield client, path.read_text().strip(), settings


@pytest.fixture(scope="module")
async def oidc_app(pg_url, oidc_issuer, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("console-oidc")
    settings = Settings(data_dir=data_dir, oidc_issuer=oidc_issuer.issuer)
    async with console_app(settings, pg_url) as app:
        yield app


async def key_sign_in(client: httpx.AsyncClient, key: str) -> httpx.Response:
    client.cookies.clear()
    page = await client.get("/console/login")
    return await client.post(
        "/console/login", data={"csrf_token": csrf_of(page.text), "api_key": key, "next": "/console/tenants"}
    )


async def oidc_sign_in(
    app, issuer: LocalOIDCIssuer, username: str, *, next_path: str = "/console/"
) -> httpx.AsyncClient:
    """The browser's part of the authorization-code flow, step by step; returns a signed-in client."""
    client = client_for(app)
    start = await client.get("/console/login/start", params={"next": next_path})
    assert start.status_code == 303
    authorize = start.headers["location"]
    query = parse_qs(urlsplit(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["client_id"] == ["agencyllm-gateway"] and query["redirect_uri"] == [f"{BASE}/console/auth/callback"]
    async with httpx.AsyncClient(follow_redirects=False) as browser:
        form = await browser.get(authorize)
        assert form.status_code == 200 and 'id="kc-form-login"' in form.text
        user = issuer.users[username]
        back = await browser.post(
            authorize, data={**{k: v[0] for k, v in query.items()}, "username": username, "password": user.password}
        )
    assert back.status_code == 302, back.text
    callback = urlsplit(back.headers["location"])
    done = await client.get(f"{callback.path}?{callback.query}")
    assert done.status_code == 303, done.text
    return client


# --- sign-in ----------------------------------------------------------------------------------


async def test_key_sign_in_sets_a_short_http_only_cookie_and_refuses_bad_keys(keyed):
    client, admin_key, settings = keyed
    client.cookies.clear()
    page = await client.get("/console/login")
    assert page.status_code == 200 and 'type="password"' in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"

    wrong = await key_sign_in(client, "sk-agency-AAAAAAAAAAAA_" + "x" * 43)
    assert wrong.status_code == 400
    assert "not valid" in field_error(wrong.text, "api-key")
    assert SESSION_COOKIE not in client.cookies

    async with store_session(client) as session:
        tenant = await store.create_tenant(session, store.SystemActor(), name=new_name())
        service = await store.create_key(
            session, store.SystemActor(), tenant_name=tenant.name, kind="service", name="s"
        )
    not_admin = await key_sign_in(client, service.secret)
    assert not_admin.status_code == 400 and "not a platform administrator key" in field_error(not_admin.text, "api-key")

    signed_in = await key_sign_in(client, admin_key)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/console/tenants"
    cookie = next(
        v for k, v in signed_in.headers.multi_items() if k == "set-cookie" and v.startswith(SESSION_COOKIE + "=")
    )
    attributes = {part.strip().split("=")[0].lower(): part for part in cookie.split(";")}
    assert {"httponly", "path", "max-age"} <= set(attributes) and "secure" not in attributes
    assert "samesite=lax" in cookie.lower() and "Path=/console" in cookie
    assert int(attributes["max-age"].split("=")[1]) == settings.console_max_hours * 3600
    assert admin_key not in cookie  # sealed, not merely signed

    home = await client.get("/console/")
    assert home.status_code == 303 and home.headers["location"] == "/console/tenants"
    tenants = await client.get("/console/tenants")
    assert tenants.status_code == 200 and "Create a tenant" in tenants.text


class store_session:
    """`async with store_session(client) as session`: the console app's own database."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.database: Database = APPS[client].state.database

    async def __aenter__(self):
        self._cm = self.database.sessions()
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc):
        return await self._cm.__aexit__(*exc)


async def test_signed_out_forged_idle_and_overage_sessions_go_to_sign_in(keyed):
    client, admin_key, settings = keyed
    anonymous = client_for(APPS[client])
    for path in ("/console/tenants", "/console/usage", "/console/me"):
        response = await anonymous.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/console/login?next=")
    anonymous.cookies.set(SESSION_COOKIE, "forged-value", domain="console.test", path="/console")
    assert (await anonymous.get("/console/tenants")).status_code == 303

    box = CookieBox(session_key(settings))
    idle = Session(kind="key", credential=admin_key, seen=time.time() - settings.console_idle_minutes * 60 - 5)
    old = Session(kind="key", credential=admin_key, signed_in=time.time() - settings.console_max_hours * 3600 - 5)
    fresh = Session(kind="key", credential=admin_key)
    for session, status in ((idle, 303), (old, 303), (fresh, 200)):
        anonymous.cookies.set(SESSION_COOKIE, dump_session(box, session), domain="console.test", path="/console")
        assert (await anonymous.get("/console/tenants")).status_code == status
    # Sealed with another key (another installation): refused.
    other = CookieBox(b"\x01" * 32)
    anonymous.cookies.set(SESSION_COOKIE, dump_session(other, fresh), domain="console.test", path="/console")
    assert (await anonymous.get("/console/tenants")).status_code == 303
    await anonymous.aclose()


async def test_sign_in_only_returns_to_console_paths(keyed):
    client, admin_key, _ = keyed
    for target in ("//evil.example/x", "https://evil.example/", "/console/\\evil", "/elsewhere"):
        page = await client.get("/console/login", params={"next": target})
        response = await client.post(
            "/console/login",
            data={
                "csrf_token": csrf_of(page.text) if "csrf_token" in page.text else "",
                "api_key": admin_key,
                "next": target,
            },
        )
        location = (response if response.status_code == 303 else page).headers.get("location", "/console/")
        assert location.startswith("/console/") and "evil" not in location


async def test_secure_cookie_behind_tls(pg_url, pg_db, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("console-tls")
    settings = Settings(data_dir=data_dir, public_url="https://llm.agency.example")
    key = (await ensure_bootstrap_admin_key(pg_db, data_dir)).read_text().strip()
    async with console_app(settings, pg_url) as app, client_for(app, "https://llm.agency.example") as client:
        page = await client.get("/console/login")
        assert "secure" in page.headers["set-cookie"].lower()
        response = await client.post(
            "/console/login",
            data={"csrf_token": csrf_of(page.text), "api_key": key},
            headers={"origin": "https://llm.agency.example"},
        )
        assert response.status_code == 303
        assert all("secure" in v.lower() for k, v in response.headers.multi_items() if k == "set-cookie")


async def test_oidc_sign_in_with_pkce_then_sign_out(oidc_app, oidc_issuer):
    name = new_name()
    async with store_session(client_for(oidc_app)) as session:
        await store.create_tenant(session, store.SystemActor(), name=name, keycloak_group=f"/agencies/{name}")
    oidc_issuer.add_user(
        f"adm-{name}", "pw1", realm_roles=["llm-user", "llm-tenant-admin"], groups=[f"/agencies/{name}"]
    )
    exchanges = oidc_issuer.code_exchanges
    client = await oidc_sign_in(oidc_app, oidc_issuer, f"adm-{name}")
    assert oidc_issuer.code_exchanges == exchanges + 1
    home = await client.get("/console/")
    assert home.headers["location"] == f"/console/tenants/{name}"
    page = await client.get(home.headers["location"])
    assert page.status_code == 200 and "Budget and current use" in page.text
    assert "Change the quota" not in page.text  # a tenant admin reads the quota; platform admins set it

    out = await client.post("/console/logout", data={"csrf_token": csrf_of(page.text)})
    assert out.status_code == 303 and out.headers["location"].startswith(
        f"{oidc_issuer.issuer}/protocol/openid-connect/logout?"
    )
    assert "post_logout_redirect_uri=" in out.headers["location"]
    assert SESSION_COOKIE not in client.cookies
    assert (await client.get(f"/console/tenants/{name}")).status_code == 303
    await client.aclose()


async def test_oidc_callback_refuses_wrong_state_and_replayed_codes(oidc_app, oidc_issuer):
    oidc_issuer.add_user("replay-user", "pw", realm_roles=["llm-platform-admin"], groups=[])
    client = client_for(oidc_app)
    start = await client.get("/console/login/start")
    flow = client.cookies.get(FLOW_COOKIE)
    authorize = start.headers["location"]
    query = {k: v[0] for k, v in parse_qs(urlsplit(authorize).query).items()}
    async with httpx.AsyncClient() as browser:
        bad_password = await browser.post(authorize, data={**query, "username": "replay-user", "password": "nope"})
        assert "Invalid username or password" in bad_password.text
        back = await browser.post(authorize, data={**query, "username": "replay-user", "password": "pw"})
    callback = urlsplit(back.headers["location"])
    code = parse_qs(callback.query)["code"][0]
    wrong_state = await client.get("/console/auth/callback", params={"code": code, "state": "forged"})
    assert wrong_state.status_code == 400 and "did not complete" in wrong_state.text
    # Another browser (no sign-in cookie) cannot use the code either.
    stranger = client_for(oidc_app)
    assert (await stranger.get(f"{callback.path}?{callback.query}")).status_code == 400
    # A refused callback ends that sign-in attempt; the browser that started it still holds its
    # cookie from before, as when it follows the real redirect.
    client.cookies.set(FLOW_COOKIE, flow, domain="console.test", path="/console")
    exchanges = oidc_issuer.code_exchanges
    first = await client.get(f"{callback.path}?{callback.query}")
    assert first.status_code == 303 and oidc_issuer.code_exchanges == exchanges + 1
    # The same code again, even with the same sign-in cookie: the issuer refuses a spent code.
    client.cookies.clear()
    client.cookies.set(FLOW_COOKIE, flow, domain="console.test", path="/console")
    replay = await client.get(f"{callback.path}?{callback.query}")
    assert replay.status_code == 400 and oidc_issuer.code_exchanges == exchanges + 2
    assert SESSION_COOKIE not in client.cookies
    await client.aclose()
    await stranger.aclose()


async def test_oidc_session_refreshes_its_access_token(oidc_app, oidc_issuer):
    oidc_issuer.add_user("refresher", "pw", realm_roles=["llm-platform-admin"], groups=[])
    oidc_issuer.access_token_lifetime = 21  # inside the console's 20 s refresh margin almost at once
    try:
        client = await oidc_sign_in(oidc_app, oidc_issuer, "refresher")
        before = oidc_issuer.token_requests
        time.sleep(1.1)
        page = await client.get("/console/tenants")
        assert page.status_code == 200
        assert oidc_issuer.token_requests == before + 1  # one refresh_token grant
    finally:
        oidc_issuer.access_token_lifetime = 300
    await client.aclose()


async def test_account_without_tenant_is_told_why_and_can_sign_out(oidc_app, oidc_issuer):
    oidc_issuer.add_user("orphan", "pw", realm_roles=["llm-user"], groups=["nobody-maps-this"])
    client = client_for(oidc_app)
    start = await client.get("/console/login/start")
    authorize = start.headers["location"]
    query = {k: v[0] for k, v in parse_qs(urlsplit(authorize).query).items()}
    async with httpx.AsyncClient() as browser:
        back = await browser.post(authorize, data={**query, "username": "orphan", "password": "pw"})
    callback = urlsplit(back.headers["location"])
    refused = await client.get(f"{callback.path}?{callback.query}")
    assert refused.status_code == 403 and "not a member of any tenant" in html.unescape(refused.text)
    assert SESSION_COOKIE not in client.cookies
    await client.aclose()


# --- admin pages ------------------------------------------------------------------------------


async def test_create_tenant_errors_in_plain_words_next_to_the_field(keyed):
    client, admin_key, _ = keyed
    await key_sign_in(client, admin_key)
    page = await client.get("/console/tenants")
    token = csrf_of(page.text)
    bad = await client.post("/console/tenants", data={"csrf_token": token, "name": "Roads Office"})
    assert bad.status_code == 400
    assert "lowercase letters, digits and hyphens" in field_error(bad.text, "name")
    assert 'aria-invalid="true"' in bad.text and 'value="Roads Office"' in bad.text
    empty = await client.post("/console/tenants", data={"csrf_token": token, "name": ""})
    assert field_error(empty.text, "name") == "Enter a name for the tenant."

    name = new_name("roads")
    made = await client.post(
        "/console/tenants",
        data={"csrf_token": token, "name": name, "display_name": "Roads Office", "keycloak_group": f"/agencies/{name}"},
    )
    assert made.status_code == 303 and made.headers["location"] == f"/console/tenants/{name}"
    shown = await client.get(made.headers["location"])
    assert f"Tenant {name} created" in shown.text
    again = await client.post("/console/tenants", data={"csrf_token": token, "name": name})
    assert again.status_code == 400 and "already exists" in field_error(again.text, "name")
    clash = await client.post(
        "/console/tenants", data={"csrf_token": token, "name": name + "b", "keycloak_group": f"/agencies/{name}"}
    )
    assert "already mapped" in field_error(clash.text, "keycloak-group")


async def test_quota_form_sets_every_dimension_and_shows_use_against_limits(keyed):
    client, admin_key, _ = keyed
    await key_sign_in(client, admin_key)
    name = new_name()
    token = csrf_of((await client.get("/console/tenants")).text)
    await client.post("/console/tenants", data={"csrf_token": token, "name": name})
    path = f"/console/tenants/{name}/quota"

    typo = await client.post(path, data={"csrf_token": token, "tokens_per_day": "two million"})
    assert typo.status_code == 400 and "whole number" in field_error(typo.text, "tokens-per-day")
    assert 'value="two million"' in typo.text
    huge = await client.post(path, data={"csrf_token": token, "requests_per_minute": str(2**40)})
    assert "no larger than" in field_error(huge.text, "requests-per-minute")

    saved = await client.post(
        path,
        data={
            "csrf_token": token,
            "tokens_per_day": "2,000,000",
            "tokens_per_month": "40000000",
            "requests_per_minute": "120",
            "max_concurrent_requests": "16",
            "max_tokens_per_request": "4096",
            "max_tokens_mode": "reject",
            "allowed_models": "placeholder, all-MiniLM-L6-v2",
            "share": "2.5",
        },
    )
    assert saved.status_code == 303
    async with store_session(client) as session:
        policy = await store.get_quota(session, name)
    assert policy == {
        "tokens_per_day": 2_000_000,
        "tokens_per_month": 40_000_000,
        "requests_per_minute": 120,
        "max_concurrent_requests": 16,
        "max_tokens_per_request": 4096,
        "max_tokens_mode": "reject",
        "allowed_models": ["placeholder", "all-MiniLM-L6-v2"],
        "share": 2.5,
    }
    page = (await client.get(f"/console/tenants/{name}")).text
    assert "Quota saved" in page and "2,000,000" in page and "is refused" in page


async def test_mint_shows_the_key_once_then_lists_and_revokes_it(keyed):
    client, admin_key, _ = keyed
    await key_sign_in(client, admin_key)
    name = new_name()
    token = csrf_of((await client.get("/console/tenants")).text)
    await client.post("/console/tenants", data={"csrf_token": token, "name": name})
    no_name = await client.post(f"/console/tenants/{name}/keys", data={"csrf_token": token, "name": ""})
    assert no_name.status_code == 400 and "Give the key a name" in field_error(no_name.text, "name")
    bad_days = await client.post(
        f"/console/tenants/{name}/keys", data={"csrf_token": token, "name": "etl", "expires_in_days": "0"}
    )
    assert "1 to 3650" in field_error(bad_days.text, "expires-in-days")

    minted = await client.post(
        f"/console/tenants/{name}/keys", data={"csrf_token": token, "name": "etl", "expires_in_days": "90"}
    )
    assert minted.status_code == 303
    page = (await client.get(f"/console/tenants/{name}/keys")).text
    secret = re.search(r'id="new-key"[^>]*value="(sk-agency-[^"]+)"', page).group(1)
    assert 'data-copy="new-key"' in page
    again = (await client.get(f"/console/tenants/{name}/keys")).text
    assert secret not in again and "etl" in again  # shown once, listed after

    async with store_session(client) as session:
        key_id = next(str(k.id) for k, _ in await store.list_keys(session, tenant_name=name))
    revoked = await client.post(
        f"/console/keys/{key_id}/revoke", data={"csrf_token": token, "back": f"/console/tenants/{name}/keys"}
    )
    assert revoked.status_code == 303 and revoked.headers["location"] == f"/console/tenants/{name}/keys"
    async with store_session(client) as session:
        key = await session.scalar(select(ApiKey).where(ApiKey.id == uuid.UUID(key_id)))
        assert key.revoked_at is not None

    suspended = await client.post(f"/console/tenants/{name}/suspend", data={"csrf_token": token})
    assert suspended.status_code == 303
    refused = await client.post(f"/console/tenants/{name}/keys", data={"csrf_token": token, "name": "more"})
    assert refused.status_code == 400 and "suspended" in html.unescape(refused.text)
    assert (await client.post(f"/console/tenants/{name}/resume", data={"csrf_token": token})).status_code == 303


async def test_mint_a_batch_key_for_a_bulk_job(keyed):
    client, admin_key, _ = keyed
    await key_sign_in(client, admin_key)
    name = new_name()
    token = csrf_of((await client.get("/console/tenants")).text)
    await client.post("/console/tenants", data={"csrf_token": token, "name": name})
    form = (await client.get(f"/console/tenants/{name}/keys")).text
    assert re.search(r'name="traffic_class" value="interactive" checked', form)  # interactive unless chosen

    wrong = await client.post(
        f"/console/tenants/{name}/keys", data={"csrf_token": token, "name": "etl", "traffic_class": "urgent"}
    )
    assert wrong.status_code == 400 and field_error(wrong.text, "traffic-class") == "Choose interactive or batch."
    assert re.search(r'name="traffic_class" value="interactive" checked', wrong.text) is None

    minted = await client.post(
        f"/console/tenants/{name}/keys",
        data={"csrf_token": token, "name": "archive-summaries", "traffic_class": "batch"},
    )
    assert minted.status_code == 303
    async with store_session(client) as session:
        [(key, _)] = await store.list_keys(session, tenant_name=name)
    assert key.traffic_class == "batch"
    assert "service, batch" in (await client.get(f"/console/tenants/{name}/keys")).text


async def test_forms_without_the_csrf_token_or_from_another_site_are_refused(keyed):
    client, admin_key, _ = keyed
    await key_sign_in(client, admin_key)
    token = csrf_of((await client.get("/console/tenants")).text)
    attempts = [
        ({"name": new_name()}, {}),
        ({"name": new_name(), "csrf_token": "guess"}, {}),
        ({"name": new_name(), "csrf_token": token}, {"origin": "https://evil.example"}),
        ({"name": new_name(), "csrf_token": token}, {"sec-fetch-site": "cross-site"}),
    ]
    for data, headers in attempts:
        response = await client.post("/console/tenants", data=data, headers=headers)
        assert response.status_code == 403, (data, headers)
        assert "not sent from this console" in response.text
        async with store_session(client) as session:
            assert await session.scalar(select(Tenant.id).where(Tenant.name == data["name"])) is None
    same_origin = await client.post(
        "/console/tenants",
        data={"name": new_name(), "csrf_token": token},
        headers={"origin": BASE, "sec-fetch-site": "same-origin"},
    )
    assert same_origin.status_code == 303


async def test_tenant_admin_cannot_reach_another_tenants_pages_or_forms(oidc_app, oidc_issuer):
    mine, theirs = new_name("mine"), new_name("theirs")
    async with store_session(client_for(oidc_app)) as session:
        for name in (mine, theirs):
            await store.create_tenant(session, store.SystemActor(), name=name, keycloak_group=name)
        other_key = await store.create_key(session, store.SystemActor(), tenant_name=theirs, kind="service", name="t")
    oidc_issuer.add_user(f"ta-{mine}", "pw", realm_roles=["llm-user", "llm-tenant-admin"], groups=[mine])
    client = await oidc_sign_in(oidc_app, oidc_issuer, f"ta-{mine}")
    token = csrf_of((await client.get(f"/console/tenants/{mine}")).text)

    for path in (
        f"/console/tenants/{theirs}",
        f"/console/tenants/{theirs}/keys",
        f"/console/usage?tenant={theirs}",
        f"/console/usage.csv?tenant={theirs}",
        "/console/tenants/no-such-tenant",
    ):
        response = await client.get(path)
        assert response.status_code == 403, path
        assert theirs not in response.text.replace(f"'{theirs}'", "") or "may not administer" in html.unescape(
            response.text
        )
    forged = [
        (f"/console/tenants/{theirs}/keys", {"name": "stolen"}),
        (f"/console/tenants/{theirs}/quota", {"tokens_per_day": "1"}),
        (f"/console/tenants/{theirs}/suspend", {}),
        (f"/console/tenants/{mine}/quota", {"tokens_per_day": "1"}),  # reading is allowed, setting is not
        ("/console/tenants", {"name": new_name()}),
    ]
    for path, data in forged:
        response = await client.post(path, data={"csrf_token": token, **data})
        assert response.status_code == 403, path
    # Another tenant's key answers exactly like a key that does not exist: its id cannot be probed.
    revoke = await client.post(f"/console/keys/{other_key.key.id}/revoke", data={"csrf_token": token})
    unknown = await client.post(f"/console/keys/{uuid.uuid4()}/revoke", data={"csrf_token": token})
    assert revoke.status_code == unknown.status_code == 404
    async with store_session(client) as session:
        assert [k.name for k, _ in await store.list_keys(session, tenant_name=theirs)] == ["t"]
        assert (await store.get_quota(session, mine))["tokens_per_day"] is None
        assert (await store.get_tenant(session, theirs)).status == "active"
    # Their own tenant's keys page and usage work.
    assert (await client.get(f"/console/tenants/{mine}/keys")).status_code == 200
    assert (await client.get("/console/usage")).status_code == 200
    await client.aclose()


async def test_staff_see_only_their_keys_and_usage(oidc_app, oidc_issuer):
    name = new_name()
    async with store_session(client_for(oidc_app)) as session:
        await store.create_tenant(session, store.SystemActor(), name=name, keycloak_group=name)
    oidc_issuer.add_user(f"st-{name}", "pw", realm_roles=["llm-user"], groups=[name])
    client = await oidc_sign_in(oidc_app, oidc_issuer, f"st-{name}")
    home = await client.get("/console/")
    assert home.headers["location"] == "/console/me"
    page = await client.get("/console/me")
    assert page.status_code == 200 and "Quick start" in page.text and f"{BASE}/v1" in page.text
    for path in (f"/console/tenants/{name}", "/console/tenants", "/console/usage", "/console/usage.csv"):
        assert (await client.get(path)).status_code == 403, path
    token = csrf_of(page.text)
    minted = await client.post("/console/me/keys", data={"csrf_token": token, "name": "laptop"})
    assert minted.status_code == 303
    shown = (await client.get("/console/me")).text
    assert re.search(r'id="new-key"[^>]*value="sk-agency-', shown)
    async with store_session(client) as session:
        keys = await store.list_keys(session, tenant_name=name)
    assert [(k.kind, k.owner_username) for k, _ in keys] == [("personal", f"st-{name}")]
    await client.aclose()


async def test_usage_chart_and_csv_reflect_the_ledger(keyed):
    client, admin_key, _ = keyed
    await key_sign_in(client, admin_key)
    name = new_name()
    now = datetime.now(UTC)
    async with store_session(client) as session:
        tenant = await store.create_tenant(session, store.SystemActor(), name=name)
        for subject, username, model, tokens in (
            ("u1", "dora", "m1", 100),
            ("u2", "eli", "m2", 50),
            ("u1", "dora", "m2", 7),
        ):
            session.add(
                UsageRecord(
                    request_id=str(uuid.uuid4()),
                    tenant_id=tenant.id,
                    subject=subject,
                    username=username,
                    model=model,
                    endpoint="chat",
                    prompt_tokens=tokens,
                    completion_tokens=0,
                    total_tokens=tokens,
                    status="ok",
                    latency_ms=1.0,
                    started_at=now,
                    finished_at=now,
                )
            )
        await session.commit()
    by_model = await client.get("/console/usage", params={"tenant": name, "split": "model"})
    assert by_model.status_code == 200
    svg = re.search(r'<svg class="chart".*?</svg>', by_model.text, re.S).group(0)
    assert 'role="img"' in svg and "m1: 100 tokens" in svg and "m2: 57 tokens" in svg
    assert "157 tokens in 3 requests." in by_model.text
    by_user = await client.get("/console/usage", params={"tenant": name, "split": "user"})
    assert "dora: 107 tokens" in by_user.text and "eli: 50 tokens" in by_user.text
    top = by_user.text[by_user.text.index("Top users") :]
    assert top.index("dora") < top.index("eli")

    report = await client.get("/console/usage.csv", params={"tenant": name, "group_by": "user"})
    assert report.headers["content-type"].startswith("text/csv")
    assert "attachment" in report.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(report.text)))
    assert {(r["username"], r["total_tokens"]) for r in rows} == {("dora", "107"), ("eli", "50")}
    everyone = await client.get("/console/usage")
    assert everyone.status_code == 200 and "all tenants" in everyone.text


def test_every_asset_ships_in_the_package_and_nothing_points_off_site():
    files = sorted(p for p in CONSOLE.rglob("*") if p.suffix in {".html", ".css", ".js"})
    assert {p.name for p in files} >= {"base.html", "console.css", "console.js", "usage.html", "me.html"}
    off_site = re.compile(r"""(?:src|href|url)\s*[=(]\s*["']?(?:https?:)?//""", re.I)
    for path in files:
        text = path.read_text()
        assert not off_site.search(text), path
        assert "@import" not in text and "fonts.googleapis" not in text
    import tomllib

    package_data = tomllib.loads((CONSOLE.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    assert set(package_data["agencyllm.serving.console"]) >= {"templates/*.html", "static/*.css", "static/*.js"}


async def test_static_assets_are_served(keyed):
    client, _, _ = keyed
    css = await client.get("/console/static/console.css")
    js = await client.get("/console/static/console.js")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert js.status_code == 200 and "clipboard" in js.text


async def test_key_sign_out_ends_the_session(keyed):
    client, admin_key, _ = keyed
    await key_sign_in(client, admin_key)
    page = await client.get("/console/tenants")
    out = await client.post("/console/logout", data={"csrf_token": csrf_of(page.text)})
    assert out.status_code == 303 and out.headers["location"] == "/console/login?signed_out=1"
    assert SESSION_COOKIE not in client.cookies
    shown = await client.get(out.headers["location"])
    assert "You are signed out." in shown.text
    assert (await client.get("/console/tenants")).status_code == 303


def test_chart_axis_uses_round_steps():
    from agencyllm.serving.console.charts import axis_step

    assert [axis_step(n) for n in (0, 3, 27, 100, 157, 88_328, 2_000_000)] == [1, 1, 10, 25, 50, 25_000, 500_000]


async def test_batches_page_shows_staff_their_own_and_admins_the_tenant_s(oidc_app, oidc_issuer, pg_url):
    from agencyllm.quotas.batches.files import FileStore
    from agencyllm.quotas.batches.jobs import BatchStore

    name, other = new_name(), new_name()
    async with store_session(client_for(oidc_app)) as session:
        for tenant in (name, other):
            await store.create_tenant(session, store.SystemActor(), name=tenant, keycloak_group=tenant)
    oidc_issuer.add_user(f"st-{name}", "pw", realm_roles=["llm-user"], groups=[name])
    oidc_issuer.add_user(f"ad-{name}", "pw", realm_roles=["llm-user", "llm-tenant-admin"], groups=[name])
    oidc_issuer.add_user(f"ad-{other}", "pw", realm_roles=["llm-user", "llm-tenant-admin"], groups=[other])
    staff = await oidc_sign_in(oidc_app, oidc_issuer, f"st-{name}")
    subject = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{oidc_issuer.realm}/st-{name}"))  # the issuer's `sub`
    database = Database(pg_url)
    try:
        batches = BatchStore(database, FileStore(database))
        body = {"model": "placeholder", "messages": []}
        made = []
        for who, username in ((subject, f"st-{name}"), ("colleague", "colleague")):
            made.append(
                await batches.create(
                    tenant=name, owner={"subject": who, "username": username}, endpoint="/v1/chat/completions",
                    input_file_id="file-x", window_seconds=86400, metadata=None, lines=[("a", body), ("b", body)],
                    errors=[], model="placeholder",
                )
            )  # fmt: skip
        mine, theirs = made
    finally:
        await database.dispose()
    page = (await staff.get("/console/batches")).text
    assert mine.id in page and theirs.id not in page and "Your batches" in page
    admin = await oidc_sign_in(oidc_app, oidc_issuer, f"ad-{name}")
    page = (await admin.get("/console/batches")).text
    assert mine.id in page and theirs.id in page and "in progress" in page and f"st-{name}" in page
    stranger = await oidc_sign_in(oidc_app, oidc_issuer, f"ad-{other}")
    page = (await stranger.get(f"/console/batches?tenant={name}")).text
    assert mine.id not in page and theirs.id not in page
    for client in (staff, admin, stranger):
        await client.aclose()
