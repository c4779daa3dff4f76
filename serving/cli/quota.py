"""`agencyllm quota set|show`: a tenant's (or one user's) quota policy."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from agencyllm.serving.cli.admin import Url, call, segment
from agencyllm.serving.cli.formats import TableOrJson
from agencyllm.serving.cli.output import show

app = typer.Typer(help="read and set quotas", no_args_is_help=True)

Tenant = Annotated[str, typer.Argument(show_default=False)]
Limit = Annotated[str | None, typer.Option(metavar="N", show_default=False)]


def _path(tenant: str, user: str | None) -> str:
    path = f"/tenants/{segment(tenant)}"
    return f"{path}/users/{segment(user)}/quota" if user else f"{path}/quota"


def limit(value: str, flag: str) -> int | None:
    """A non-negative integer, or `none` for no limit."""
    if value.lower() in ("none", "unlimited"):
        return None
    try:
        number = int(value)
    except ValueError:
        raise typer.BadParameter(f"not an integer: {value!r}", param_hint=flag) from None
    if number < 0:
        raise typer.BadParameter(f"must not be negative: {value}", param_hint=flag)
    return number


def share(value: str) -> float | None:
    """A tenant's fair-sharing weight (above 0), or `none` for the default of 1."""
    if value.lower() in ("none", "default"):
        return None
    try:
        number = float(value)
    except ValueError:
        raise typer.BadParameter(f"not a number: {value!r}", param_hint="--share") from None
    if not number > 0:
        raise typer.BadParameter(f"must be above 0: {value}", param_hint="--share")
    return number


@app.command("set", help="set quota limits (only the flags given change; 'none' = no limit)")
def set_(
    tenant: Tenant,
    user: Annotated[str | None, typer.Option(help="user subject (sub) for a per-user override")] = None,
    tokens_per_day: Limit = None,
    tokens_per_month: Limit = None,
    requests_per_minute: Limit = None,
    max_concurrent: Limit = None,
    max_tokens_per_request: Limit = None,
    share_: Annotated[
        str | None,
        typer.Option(
            "--share",
            metavar="W",
            help="weight of the tenant's claim on engine slots when tenants compete ('none' = 1)",
            show_default=False,
        ),
    ] = None,
    max_tokens_mode: Annotated[Literal["cap", "reject"] | None, typer.Option()] = None,
    allowed_models: Annotated[
        str | None, typer.Option(metavar="A,B", help="comma-separated model names; 'all' = every model")
    ] = None,
    url: Url = None,
    fmt: TableOrJson = "table",
) -> int:
    flags = {
        "tokens_per_day": ("--tokens-per-day", tokens_per_day),
        "tokens_per_month": ("--tokens-per-month", tokens_per_month),
        "requests_per_minute": ("--requests-per-minute", requests_per_minute),
        "max_concurrent_requests": ("--max-concurrent", max_concurrent),
        "max_tokens_per_request": ("--max-tokens-per-request", max_tokens_per_request),
    }
    changes = {field: limit(value, flag) for field, (flag, value) in flags.items() if value is not None}
    if share_ is not None:
        changes["share"] = share(share_)  # type: ignore[assignment]
    # The API replaces the whole policy; the CLI changes only the flags given.
    current = call(url, "GET", _path(tenant, user)).json()
    policy = {k: v for k, v in current.items() if k not in ("tenant", "user")} | changes
    if max_tokens_mode is not None:
        policy["max_tokens_mode"] = max_tokens_mode
    if allowed_models is not None:
        names = [m.strip() for m in allowed_models.split(",") if m.strip()]
        policy["allowed_models"] = None if allowed_models.strip().lower() in ("", "all") else names
    show(fmt, call(url, "PUT", _path(tenant, user), json=policy).json(), ())
    return 0


@app.command("show", help="show a tenant's (or user's) quota")
def show_(
    tenant: Tenant,
    user: Annotated[str | None, typer.Option(help="user subject (sub)")] = None,
    url: Url = None,
    fmt: TableOrJson = "table",
) -> int:
    show(fmt, call(url, "GET", _path(tenant, user)).json(), ())
    return 0
