"""The admin REST API (`/admin/v1`) as the admin commands call it.

Credentials, first found: `AGENCYLLM_API_KEY`, the token cached by `agencyllm login`, then the
local platform-admin key `DATA_DIR/admin.key`. A failed call raises `CommandError` with one line:
the server's message and the HTTP status.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer

from agencyllm.serving.cli.common import CommandError
from agencyllm.serving.settings import ClientSettings

API = "/admin/v1"

# Tests replace this to talk to an in-process app.
client_factory: Callable[..., httpx.Client] = httpx.Client

Url = Annotated[
    str | None,
    typer.Option(help="platform URL (default: $AGENCYLLM_URL or http://127.0.0.1:8000)", show_default=False),
]


def _data_dir() -> Path:
    return ClientSettings().data_dir


def credential() -> str | None:
    api_key = ClientSettings().api_key
    if api_key is not None and (key := api_key.get_secret_value().strip()):
        return key
    try:
        from agencyllm.auth.login import cached_access_token

        if token := cached_access_token():
            return token
    except Exception:  # no cache, broken cache or issuer unreachable: fall through to the local key
        pass
    admin_key = _data_dir() / "admin.key"
    try:
        return admin_key.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def error_line(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except Exception:
        message = response.reason_phrase or "request failed"
    return f"{message} (HTTP {response.status_code})"


def call(url: str | None, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """`method API+path` on the platform at `url` (default: the client settings' URL)."""
    base_url = url or ClientSettings().url
    token = credential()
    if token is None:
        raise CommandError(
            "no credentials: set AGENCYLLM_API_KEY, run `agencyllm login`, or run on the server "
            "host where DATA_DIR/admin.key exists"
        )
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with client_factory(base_url=base_url, timeout=30.0) as client:
            response = client.request(method, API + path, headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach {base_url}: {type(exc).__name__}") from None
    if response.status_code >= 400:
        raise CommandError(error_line(response))
    return response


def segment(value: str) -> str:
    return quote(value, safe="")


def params(**values: Any) -> dict[str, Any]:
    """Query parameters, leaving out those not given."""
    return {name: value for name, value in values.items() if value is not None}
