"""`agencyllm tenants …`: create, list, show, update, suspend, resume and delete tenants."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from agencyllm.serving.cli.admin import Url, call, segment
from agencyllm.serving.cli.common import CommandError
from agencyllm.serving.cli.formats import TableOrJson
from agencyllm.serving.cli.output import show

COLUMNS = ("name", "display_name", "keycloak_group", "status")

app = typer.Typer(help="manage tenants", no_args_is_help=True)

Name = Annotated[str, typer.Argument(show_default=False)]


@app.command("create", help="create a tenant")
def create(
    name: Name,
    display_name: Annotated[str | None, typer.Option()] = None,
    keycloak_group: Annotated[str | None, typer.Option(help="Keycloak group name or full path of its members")] = None,
    url: Url = None,
    fmt: TableOrJson = "table",
) -> int:
    body = {"name": name, "display_name": display_name, "keycloak_group": keycloak_group}
    show(fmt, call(url, "POST", "/tenants", json=body).json(), COLUMNS)
    return 0


@app.command("list", help="list tenants")
def list_(url: Url = None, fmt: TableOrJson = "table") -> int:
    show(fmt, call(url, "GET", "/tenants").json(), COLUMNS)
    return 0


@app.command("show", help="show a tenant")
def show_(name: Name, url: Url = None, fmt: TableOrJson = "table") -> int:
    show(fmt, call(url, "GET", f"/tenants/{segment(name)}").json(), COLUMNS)
    return 0


@app.command("update", help="change a tenant's display name or group")
def update(
    name: Name,
    display_name: Annotated[str | None, typer.Option()] = None,
    keycloak_group: Annotated[str | None, typer.Option(help="'none' removes the mapping")] = None,
    url: Url = None,
    fmt: TableOrJson = "table",
) -> int:
    body: dict[str, Any] = {}
    if display_name is not None:
        body["display_name"] = display_name
    if keycloak_group is not None:
        body["keycloak_group"] = None if keycloak_group in ("", "none") else keycloak_group
    if not body:
        raise CommandError("nothing to change: give --display-name and/or --keycloak-group")
    show(fmt, call(url, "PATCH", f"/tenants/{segment(name)}", json=body).json(), COLUMNS)
    return 0


@app.command("suspend", help="refuse a tenant's users and keys")
def suspend(name: Name, url: Url = None, fmt: TableOrJson = "table") -> int:
    show(fmt, call(url, "POST", f"/tenants/{segment(name)}/suspend").json(), COLUMNS)
    return 0


@app.command("resume", help="resume a suspended tenant")
def resume(name: Name, url: Url = None, fmt: TableOrJson = "table") -> int:
    show(fmt, call(url, "POST", f"/tenants/{segment(name)}/resume").json(), COLUMNS)
    return 0


@app.command("delete", help="delete a tenant that has no usage history")
def delete(name: Name, url: Url = None, fmt: TableOrJson = "table") -> int:
    call(url, "DELETE", f"/tenants/{segment(name)}")
    print(f"deleted tenant {name}")
    return 0
