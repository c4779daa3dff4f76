"""The web console in a real headless Chromium (Debian's package, driven by Playwright) against the
real stack: Ray Serve + vLLM + Postgres, and the local OIDC issuer standing in for Keycloak.

Every page visited is checked with axe-core (WCAG 2.0/2.1 A and AA, plus axe's best practices:
zero violations) and saved as a screenshot under the test's temporary directory, or under
`AGENCYLLM_TEST_ARTIFACTS` when that is set.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import threading
import uuid
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.stack

CHROMIUM = os.environ.get("AGENCYLLM_CHROMIUM", "/usr/bin/chromium")
# What the machine's closed network needs: no background requests to Google's hosts, no sandbox as root.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--metrics-recording-only",
    "--no-default-browser-check",
]
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]
PASSWORD = "correct horse battery staple"


def _have_browser() -> None:
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (scripts/install.sh does, as root)")


class Browser:
    """One Chromium for the module; each test opens its own context (own cookies)."""

    def __init__(self, browser, shots: Path, base_url: str, axe) -> None:
        self.browser = browser
        self.shots = shots
        self.base_url = base_url
        self.axe = axe
        self.checked: list[str] = []

    async def context(self):
        context = await self.browser.new_context(
            base_url=self.base_url, accept_downloads=True, viewport={"width": 1280, "height": 900}
        )
        await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=self.base_url)
        return context

    async def check(self, page, name: str) -> None:
        """axe on the page as it is now, then a full-page screenshot."""
        results = await self.axe.run(page, options={"runOnly": {"type": "tag", "values": AXE_TAGS}})
        violations = results.response["violations"]
        assert not violations, f"{name}: " + results.generate_report()
        await page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)
        self.checked.append(name)


@pytest.fixture(scope="module")
async def chromium(stack, tmp_path_factory) -> AsyncIterator[Browser]:
    _have_browser()
    from axe_playwright_python.async_playwright import Axe
    from playwright.async_api import async_playwright

    configured = os.environ.get("AGENCYLLM_TEST_ARTIFACTS")
    shots = Path(configured) / "console" if configured else tmp_path_factory.mktemp("console-screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield Browser(browser, shots, stack.url, Axe())
        finally:
            await browser.close()


async def sign_in(page, issuer, username: str) -> None:
    """Through the console's button, the issuer's login form (authorization code + PKCE), and back."""
    await page.goto("/console/")
    await page.get_by_role("link", name="Sign in with your agency account").click()
    await page.wait_for_url(f"{issuer.issuer}/**")
    await page.fill("#username", username)
    await page.fill("#password", PASSWORD)
    await page.click("#kc-login")
    await page.wait_for_url("**/console/**")


async def copied(page) -> None:
    """Wait for the copy button's status line. A locator waits outside the page's
    script context, so the console's CSP (no 'unsafe-eval') stays in force."""
    await page.locator('[data-copy-status="new-key"]', has_text="Copied").wait_for()


def new_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_admin_gives_an_office_a_budget_and_a_key_and_sees_its_first_requests(chromium, stack):
    issuer = stack.issuer
    admin = new_name("ada")
    issuer.add_user(admin, PASSWORD, realm_roles=["llm-user", "llm-platform-admin"], groups=[])
    office = new_name("roads")
    context = await chromium.context()
    page = await context.new_page()
    exchanges = issuer.code_exchanges

    await page.goto("/console/")
    assert "/console/login" in page.url
    await chromium.check(page, "01-sign-in")
    await sign_in(page, issuer, admin)
    assert page.url.endswith("/console/tenants") and issuer.code_exchanges == exchanges + 1
    cookie = next(c for c in await context.cookies() if c["name"] == "agencyllm_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/console"
    assert await page.evaluate("document.cookie") == ""  # nothing readable by scripts
    assert await page.evaluate("window.localStorage.length + window.sessionStorage.length") == 0
    await chromium.check(page, "02-tenants")

    # A mistake first: the error is in plain words, next to the field.
    await page.fill("#name", "Roads Office")
    await page.click("button:has-text('Create tenant')")
    error = page.locator("#name-error")
    assert "lowercase letters, digits and hyphens" in await error.inner_text()
    assert await page.get_attribute("#name", "aria-invalid") == "true"
    await chromium.check(page, "03-tenants-error")

    await page.fill("#name", office)
    await page.fill("#display-name", "Roads Office")
    await page.fill("#keycloak-group", f"/agencies/{office}")
    await page.click("button:has-text('Create tenant')")
    await page.wait_for_url(f"**/console/tenants/{office}")
    assert f"Tenant {office} created" in await page.inner_text("main")

    await page.fill("#tokens-per-day", "lots")
    await page.click("button:has-text('Save quota')")
    assert "whole number" in await page.inner_text("#tokens-per-day-error")
    await page.fill("#tokens-per-day", "200000")
    await page.fill("#tokens-per-month", "4000000")
    await page.fill("#requests-per-minute", "60")
    await page.fill("#max-concurrent-requests", "4")
    await page.fill("#max-tokens-per-request", "64")
    async with page.expect_navigation():  # back to the same address, with the notice
        await page.click("button:has-text('Save quota')")
    assert "Quota saved" in await page.inner_text("main")
    budget = await page.inner_text("table")
    assert "200,000" in budget and "4,000,000" in budget
    await chromium.check(page, "04-tenant-quota")

    await page.get_by_role("link", name="Keys", exact=True).click()
    await page.fill("#name", "notebook")
    await page.fill("#expires-in-days", "30")
    await page.click("button:has-text('Mint key')")
    await page.wait_for_url(f"**/console/tenants/{office}/keys")
    key = await page.input_value("#new-key")
    assert key.startswith("sk-agency-")
    await page.click("button:has-text('Copy key')")
    await copied(page)
    assert await page.evaluate("navigator.clipboard.readText()") == key
    await chromium.check(page, "05-keys-minted")
    await page.reload()
    assert await page.locator("#new-key").count() == 0  # shown once

    # The office's first request, with the official SDK and the key just minted.
    client = stack.openai(api_key=key)
    reply = await asyncio.to_thread(
        client.chat.completions.create,
        model="placeholder",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
    )
    tokens = reply.usage.total_tokens
    assert tokens > 0

    await page.goto(f"/console/usage?tenant={office}&split=model")
    chart = page.locator("svg.chart")
    assert f"placeholder: {tokens:,} tokens" in await chart.inner_html()
    assert f"{tokens:,} tokens in 1 request." in await page.inner_text("main")
    await chromium.check(page, "06-usage-by-model")
    await page.get_by_label("User", exact=True).check()
    await page.click("button:has-text('Show')")
    await page.wait_for_url("**split=user**")
    assert f"notebook: {tokens:,} tokens" in await page.locator("svg.chart").inner_html()
    await chromium.check(page, "07-usage-by-user")

    async with page.expect_download() as download_info:
        await page.get_by_role("link", name="Usage by model (CSV)").click()
    download = await download_info.value
    rows = list(csv.DictReader(io.StringIO(Path(await download.path()).read_text())))
    assert rows == [
        {
            "model": "placeholder",
            "requests": "1",
            "prompt_tokens": str(reply.usage.prompt_tokens),
            "completion_tokens": str(reply.usage.completion_tokens),
            "total_tokens": str(tokens),
        }
    ]

    await page.goto(f"/console/batches?tenant={office}")
    assert "No batches yet." in await page.inner_text("main")
    await chromium.check(page, "07b-batches")

    await page.goto("/console/me")
    snippet = await page.inner_text("#snippet-python")
    assert f'base_url="{stack.url}/v1"' in snippet and 'model="placeholder"' in snippet
    await chromium.check(page, "08-me-platform-admin")

    await page.click("button:has-text('Sign out')")
    await page.wait_for_url("**/console/login?signed_out=1")
    assert "You are signed out" in await page.inner_text("main")
    await page.goto(f"/console/tenants/{office}")
    assert "/console/login" in page.url
    await context.close()


class _Attacker(BaseHTTPRequestHandler):
    """Another site: a page whose form posts to the console on load, without the CSRF token."""

    target = ""

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = (
            f'<!doctype html><html lang="en"><title>Win a prize</title><body>'
            f'<form id="f" method="post" action="{self.target}"><input name="name" value="stolen"></form>'
            f'<script>document.getElementById("f").submit()</script></body></html>'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


async def test_tenant_admin_is_kept_to_their_tenant_and_forged_posts_are_refused(chromium, stack):
    issuer = stack.issuer
    mine, theirs = new_name("mine"), new_name("theirs")
    with stack.admin() as api:
        for name in (mine, theirs):
            assert api.post("/admin/v1/tenants", json={"name": name, "keycloak_group": name}).status_code == 201
    admin = new_name("tia")
    issuer.add_user(admin, PASSWORD, realm_roles=["llm-user", "llm-tenant-admin"], groups=[mine])
    context = await chromium.context()
    page = await context.new_page()
    await sign_in(page, issuer, admin)
    assert page.url.endswith(f"/console/tenants/{mine}")
    await chromium.check(page, "09-tenant-admin-own-tenant")

    for path in (f"/console/tenants/{theirs}", f"/console/tenants/{theirs}/keys", f"/console/usage?tenant={theirs}"):
        response = await page.goto(path)
        assert response.status == 403, path
        assert "may not administer" in await page.inner_text("main")
    await chromium.check(page, "10-other-tenant-refused")

    await page.goto(f"/console/tenants/{mine}/keys")
    token = await page.locator("input[name=csrf_token]").first.input_value()
    forged = await page.evaluate(
        """async ([path, token]) => (await fetch(path, {method: "POST",
              body: new URLSearchParams({csrf_token: token, name: "stolen"})})).status""",
        [f"/console/tenants/{theirs}/keys", token],
    )
    assert forged == 403  # a valid token for a tenant they do not administer
    no_token = await page.evaluate(
        """async (path) => (await fetch(path, {method: "POST", body: new URLSearchParams({name: "x"})})).status""",
        f"/console/tenants/{mine}/keys",
    )
    assert no_token == 403  # their own tenant, but no CSRF token

    # A cross-site page auto-submitting a form into the console: refused, nothing minted.
    handler = type("Attacker", (_Attacker,), {"target": f"{stack.url}/console/tenants/{mine}/keys"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        await page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        await page.wait_for_url(f"{stack.url}/console/tenants/{mine}/keys")
        assert "not sent from this console" in await page.inner_text("main")
    finally:
        server.shutdown()
        server.server_close()
    with stack.admin() as api:
        for name in (mine, theirs):
            assert api.get(f"/admin/v1/tenants/{name}/keys").json() == []
    await context.close()


async def test_keyboard_only_mint_copy_revoke_and_staff_pages(chromium, stack):
    issuer = stack.issuer
    staff = new_name("sam")
    issuer.add_user(staff, PASSWORD, realm_roles=["llm-user"], groups=["office-stack"])  # the stack's tenant
    context = await chromium.context()
    page = await context.new_page()
    await sign_in(page, issuer, staff)
    assert page.url.endswith("/console/me")
    await chromium.check(page, "11-staff-me")

    async def tab_to(selector: str, limit: int = 60) -> None:
        for _ in range(limit):
            await page.keyboard.press("Tab")
            if await page.evaluate("(s) => document.activeElement && document.activeElement.matches(s)", selector):
                return
        raise AssertionError(f"Tab never reached {selector}")

    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Skip to main content"
    await page.keyboard.press("Enter")
    await tab_to("#name")
    await page.keyboard.type("laptop")
    await tab_to("form[action$='/me/keys'] button[type=submit]", limit=5)
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#new-key")
    assert await page.evaluate("document.activeElement.id") == "new-key-title"  # focus moved to the new key
    key = await page.input_value("#new-key")
    await tab_to("button[data-copy='new-key']", limit=5)
    await page.keyboard.press("Enter")
    await copied(page)
    assert await page.evaluate("navigator.clipboard.readText()") == key
    await chromium.check(page, "12-staff-key-minted")

    models = await asyncio.to_thread(lambda: [m.id for m in stack.openai(api_key=key).models.list()])
    assert "placeholder" in models
    assert "placeholder" in await page.inner_text("section[aria-labelledby=start-title]")

    await tab_to("button[aria-label^='Revoke key laptop']")
    async with page.expect_navigation():
        await page.keyboard.press("Enter")
    assert "revoked" in await page.inner_text("main")
    with pytest.raises(Exception) as refused:
        await asyncio.to_thread(stack.openai(api_key=key).models.list)
    assert getattr(refused.value, "status_code", None) == 401

    for path in ("/console/tenants", "/console/usage"):
        response = await page.goto(path)
        assert response.status == 403
    await page.goto("/console/me")
    await tab_to("header button[type=submit]")
    await page.keyboard.press("Enter")
    await page.wait_for_url("**/console/login?signed_out=1")
    await context.close()
