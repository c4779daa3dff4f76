"""`agencyllm keys create|create-frontend|list|revoke`: personal keys, a tenant's service keys,
and the trusted front-end keys of chat front ends (platform admins)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Literal

import typer

from agencyllm.serving.cli.admin import Url, call, segment
from agencyllm.serving.cli.formats import TableOrJson
from agencyllm.serving.cli.output import show

COLUMNS = (
    "id",
    "prefix",
    "name",
    "kind",
    "traffic_class",
    "tenant",
    "owner_username",
    "expires_at",
    "revoked_at",
    "last_used_at",
)

app = typer.Typer(help="manage API keys", no_args_is_help=True)

Tenant = Annotated[str | None, typer.Option()]


def _keys_path(tenant: str | None) -> str:
    return f"/tenants/{segment(tenant)}/keys" if tenant else "/me/keys"


@app.command("create", help="mint a key (personal, or a tenant's service key with --tenant)")
def create(
    tenant: Tenant = None,
    name: Annotated[str, typer.Option()] = "cli",
    expires_in_days: Annotated[int | None, typer.Option(metavar="D")] = None,
    traffic_class: Annotated[
        Literal["interactive", "batch"],
        typer.Option("--class", help="batch: the key's requests queue behind interactive work when engines are busy"),
    ] = "interactive",
    url: Url = None,
    fmt: TableOrJson = "table",
) -> int:
    body: dict[str, Any] = {"name": name, "traffic_class": traffic_class}
    if expires_in_days is not None:
        body["expires_in_days"] = expires_in_days
    _print_created(call(url, "POST", _keys_path(tenant), json=body).json(), fmt)
    return 0


@app.command(
    "create-frontend",
    help="mint a chat front end's key (platform admins): it calls models for the signed-in people it forwards",
)
def create_frontend(
    serves: Annotated[
        list[str],
        typer.Option("--serves", help="a tenant whose people it may act for (repeat it); '*' for every tenant"),
    ],
    name: Annotated[str, typer.Option()] = "open-webui",
    expires_in_days: Annotated[int | None, typer.Option(metavar="D")] = None,
    url: Url = None,
    fmt: TableOrJson = "table",
) -> int:
    body: dict[str, Any] = {"name": name, "serves_tenants": serves}
    if expires_in_days is not None:
        body["expires_in_days"] = expires_in_days
    _print_created(call(url, "POST", "/frontend-keys", json=body).json(), fmt)
    return 0


def _print_created(created: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(created, indent=2))
    else:
        print(created["key"])
        print(
            f"# key id {created['id']}, tenant {created['tenant']}: store it now, it is not shown again",
            file=sys.stderr,
        )


@app.command("list", help="list your keys, or a tenant's with --tenant")
def list_(
    tenant: Tenant = None,
    all_: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False,
    url: Url = None,
    fmt: TableOrJson = "table",
) -> int:
    params = {"include_revoked": "true"} if all_ else None
    show(fmt, call(url, "GET", _keys_path(tenant), params=params).json(), COLUMNS)
    return 0


@app.command("revoke", help="revoke a key by id")
def revoke(id: Annotated[str, typer.Argument(show_default=False)], url: Url = None, fmt: TableOrJson = "table") -> int:
    show(fmt, call(url, "DELETE", f"/keys/{segment(id)}").json(), COLUMNS)
    return 0
