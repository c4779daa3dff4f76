"""Open WebUI, the pinned release, against the real stack: staff sign in through the local OIDC
issuer in headless Chromium, chat from its page, and the platform charges and audits each
person, not the front end's key.

Opt-in (`python -m pytest -m open_webui`): it installs `open-webui[postgres]` into a virtualenv
of its own (about 7 GB; a few minutes from a local package index) under
`~/.cache/agencyllm-tests/`, reused by later runs, or uses the one `AGENCYLLM_TEST_OPEN_WEBUI_VENV`
names. Open WebUI is started by the code `agencyllm up --chat` runs (serving/ops/chat.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import STACK_GROUP
from pydantic import SecretStr
from test_console_browser import CHROMIUM, CHROMIUM_ARGS

from agencyllm.quotas.db import Database
from agencyllm.serving.ops.chat import KEY_FILE, ChatFrontEnd, chat_database_url
from agencyllm.serving.ops.chat_env import OPEN_WEBUI_VERSION
from agencyllm.serving.settings import Settings

pytestmark = [pytest.mark.stack, pytest.mark.open_webui]

PASSWORD = "correct horse battery staple"
START_TIMEOUT = 240
MESSAGE = "Summarise the memo in one line."


def _python_for_open_webui() -> str:
    """Open WebUI needs Python 3.11 or 3.12."""
    for name in ("python3.11", "python3.12"):
        if found := shutil.which(name):
            return found
    pytest.fail("Open WebUI needs python3.11 or python3.12 on PATH")


@pytest.fixture(scope="module")
def open_webui() -> Path:
    """The `open-webui` executable of a virtualenv holding the pinned release."""
    configured = os.environ.get("AGENCYLLM_TEST_OPEN_WEBUI_VENV")
    venv = (
        Path(configured)
        if configured
        else Path.home() / ".cache" / "agencyllm-tests" / f"open-webui-{OPEN_WEBUI_VERSION}"
    )
    executable = venv / "bin" / "open-webui"
    if not executable.exists():
        began = time.monotonic()
        subprocess.run([_python_for_open_webui(), "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", f"open-webui[postgres]=={OPEN_WEBUI_VERSION}"],
            check=True,
            timeout=3600,
        )
        print(f"\nopen-webui {OPEN_WEBUI_VERSION} installed in {time.monotonic() - began:.0f} s")
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('open-webui'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == OPEN_WEBUI_VERSION, "the virtualenv holds another release"
    return executable


@pytest.fixture(scope="module")
def chat(stack, open_webui, pg_url, tmp_path_factory):
    """Open WebUI as `up --chat` starts it, beside the shared stack."""
    from conftest import free_port

    settings = stack.settings.model_copy(
        update={
            "data_dir": tmp_path_factory.mktemp("chat"),
            "chat": True,
            "chat_command": str(open_webui),
            "chat_port": free_port(),
            "chat_client_secret": SecretStr("open-webui-client-secret"),
        }
    )
    front_end = ChatFrontEnd(settings)
    log = settings.data_dir / "open-webui.log"
    began = time.monotonic()
    front_end.start(pg_url, log)
    try:
        while True:
            assert front_end.exited() is None, f"Open WebUI exited\n{log.read_text()[-4000:]}"
            assert time.monotonic() - began < START_TIMEOUT, f"Open WebUI not up\n{log.read_text()[-4000:]}"
            try:
                if httpx.get(f"{front_end.public_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        print(f"\nOpen WebUI answered /health {time.monotonic() - began:.1f} s after start")
        yield front_end
    finally:
        front_end.stop()
        assert front_end.process is None


async def _rows(url: str, sql: str, *args) -> list[dict]:
    database = Database(url)
    try:
        return [dict(r) for r in await (await database.pool()).fetch(sql, *args)]
    finally:
        await database.dispose()


async def sign_in_and_chat(chat: ChatFrontEnd, issuer_url: str, username: str, message: str | None, shots: Path) -> str:
    """A person's visit: Open WebUI's page, the realm's login form, back, and one message sent."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(f"{chat.public_url}/")
            sign_in = page.get_by_role("button", name=re.compile("Agency sign-in"))
            get_started = page.get_by_role("button", name="Get started")  # before anyone has signed in
            await sign_in.or_(get_started).first.wait_for(timeout=60_000)
            if await get_started.count():
                await get_started.click()
            await sign_in.click()
            await page.wait_for_url(f"{issuer_url}/**")
            await page.fill("#username", username)
            await page.fill("#password", PASSWORD)
            await page.click("#kc-login")
            await page.wait_for_url(f"{chat.public_url}/**")
            editor = page.locator("#chat-input")
            await editor.wait_for(timeout=60_000)
            welcome = page.get_by_role("button", name="Okay, Let's Go!")  # release notes, once per person
            if await welcome.count():
                await welcome.click()
            if message is None:
                return page.url
            await editor.click()
            await page.keyboard.type(message)
            await page.keyboard.press("Enter")
            try:  # the answer is in when the response's action buttons (copy, regenerate) appear
                await page.get_by_role("button", name=re.compile("Regenerate", re.I)).first.wait_for(timeout=120_000)
            finally:
                await page.screenshot(path=str(shots / f"{username}.png"), full_page=True)
            return page.url
        finally:
            await browser.close()


def test_a_person_chats_in_open_webui_and_the_platform_charges_them(stack, chat, pg_url, tmp_path):
    issuer = stack.issuer
    # The first account becomes Open WebUI's administrator (its own rule): a platform admin first.
    admin = f"admin-{uuid.uuid4().hex[:6]}"
    issuer.add_user(admin, PASSWORD, realm_roles=["llm-platform-admin"], groups=[STACK_GROUP])
    configured = os.environ.get("AGENCYLLM_TEST_ARTIFACTS")
    shots = Path(configured) / "open-webui" if configured else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    asyncio.run(sign_in_and_chat(chat, issuer.issuer, admin, None, shots))

    person = f"casey-{uuid.uuid4().hex[:6]}"
    issuer.add_user(person, PASSWORD, realm_roles=["llm-user"], groups=[STACK_GROUP])
    try:
        url = asyncio.run(sign_in_and_chat(chat, issuer.issuer, person, MESSAGE, shots))
    except Exception:
        print(f"screenshots in {shots}\n{chat.log_file.read_text()[-6000:]}")
        raise

    subject = issuer.subject_of(person)
    key = (chat.directory / KEY_FILE).read_text().strip()
    (front_end_key,) = asyncio.run(
        _rows(pg_url, "SELECT id, kind FROM api_keys WHERE prefix = $1", key.removeprefix("sk-agency-")[:12])
    )
    assert front_end_key["kind"] == "frontend"
    deadline = time.monotonic() + 60
    while not (rows := asyncio.run(_rows(pg_url, "SELECT * FROM usage_ledger WHERE subject = $1", subject))):
        assert time.monotonic() < deadline, "no ledger row for the person"
        time.sleep(1)
    # The chat, and the title Open WebUI asks for, each one row: the person's, through the front end's key.
    assert all(r["username"] == person and r["key_id"] == front_end_key["id"] for r in rows), rows
    assert {r["status"] for r in rows} == {"ok"} and sum(r["completion_tokens"] for r in rows) > 0
    audit = asyncio.run(
        _rows(pg_url, "SELECT * FROM audit_events WHERE action = 'model.request' AND actor_subject = $1", subject)
    )
    assert {a["request_id"] for a in audit} == {r["request_id"] for r in rows}
    assert all(a["tenant"] == stack.tenant and a["actor_key_id"] == str(front_end_key["id"]) for a in audit)
    service_owner = f"service:{front_end_key['id']}"
    assert not asyncio.run(_rows(pg_url, "SELECT 1 FROM usage_ledger WHERE subject = $1", service_owner))

    # History is off: the person's chat was temporary, so Open WebUI's database holds no conversation.
    assert "/c/" not in url
    chats = asyncio.run(
        _rows(
            chat_database_url(pg_url),
            'SELECT c.id FROM chat c JOIN "user" u ON u.id = c.user_id WHERE u.email = $1',
            f"{person}@agency.example",
        )
    )
    assert chats == []


AIR_GAPPED_START = """
import subprocess, sys, time, urllib.request
server = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
deadline = time.monotonic() + 240
try:
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen("http://127.0.0.1:8080/health", timeout=2) as answer:
                print("healthy", answer.status, round(time.monotonic() - deadline + 240, 1))
                break
        except OSError:
            time.sleep(1)
    else:
        print("not healthy", server.poll())
finally:
    server.terminate()
    server.wait(30)
"""


def test_open_webui_starts_with_no_network_at_all(open_webui, oidc_issuer, pg_url, tmp_path):
    """The air gap: in a network namespace of its own (loopback only), with the environment the
    platform gives it, Open WebUI starts and answers; nothing it needs at start is outside. The
    database is reached over its unix socket."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=SecretStr(pg_url),
        oidc_issuer=oidc_issuer.issuer,
        chat=True,
        chat_command=str(open_webui),
        chat_client_secret=SecretStr("open-webui-client-secret"),
    )
    env = ChatFrontEnd(settings).environment(pg_url)
    (tmp_path / "chat" / "data").mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENCYLLM_")}
    command = [str(open_webui), "serve", "--host", "127.0.0.1", "--port", "8080"]
    script = f"ip link set lo up && exec {open_webui.parent / 'python'} -c '{AIR_GAPPED_START}' " + " ".join(command)
    done = subprocess.run(
        ["unshare", "-n", "--", "sh", "-c", script],
        env=base | env,
        cwd=tmp_path / "chat",
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.stdout.startswith("healthy 200"), (done.stdout, done.stderr[-3000:])
    print(f"\nOpen WebUI with no network: {done.stdout.strip()} s")
