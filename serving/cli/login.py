"""`agencyllm login`: sign in with Keycloak (device code); the admin commands then use the token."""

from __future__ import annotations

from typing import Annotated

import typer

from agencyllm.serving.cli.common import CommandError
from agencyllm.serving.settings import ClientSettings


def login(
    issuer: Annotated[str | None, typer.Option(help="default: $AGENCYLLM_OIDC_ISSUER")] = None,
    client_id: Annotated[str | None, typer.Option(help="public CLI client (default: agencyllm-cli)")] = None,
) -> int:
    """sign in with Keycloak"""
    from agencyllm.auth.login import DEFAULT_CLIENT_ID, LoginError, device_login

    issuer = issuer or ClientSettings().oidc_issuer
    if not issuer:
        raise CommandError("no issuer: pass --issuer or set AGENCYLLM_OIDC_ISSUER")
    try:
        device_login(issuer, client_id or DEFAULT_CLIENT_ID)
    except LoginError as exc:
        raise CommandError(f"login failed: {exc}") from None
    print("signed in")
    return 0
