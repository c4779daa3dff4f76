"""Admin commands of the `agencyllm` CLI, over the admin REST API (`/admin/v1`).

Credentials, first found: `AGENCYLLM_API_KEY`, the token cached by `agencyllm login`, then the
local platform-admin key `DATA_DIR/admin.key`. Tables for people, JSON/CSV for scripts; an error
prints one line (the server's message) and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from agencyllm.serving.settings import ClientSettings

API = "/admin/v1"
QUOTA_OPTIONS = {
    "tokens_per_day": "--tokens-per-day",
    "tokens_per_month": "--tokens-per-month",
    "requests_per_minute": "--requests-per-minute",
    "max_concurrent_requests": "--max-concurrent",
    "max_tokens_per_request": "--max-tokens-per-request",
}
TENANT_COLUMNS = ("name", "display_name", "keycloak_group", "status")
KEY_COLUMNS = (
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
USAGE_TOTALS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")

# Tests replace this to talk to an in-process app.
client_factory: Callable[..., httpx.Client] = httpx.Client


class CommandError(Exception):
    """One line for the user."""


# --- credentials and HTTP -----------------------------------------------------------------------


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


def call(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> httpx.Response:
    token = credential()
    if token is None:
        raise CommandError(
            "no credentials: set AGENCYLLM_API_KEY, run `agencyllm login`, or run on the server "
            "host where DATA_DIR/admin.key exists"
        )
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with client_factory(base_url=args.url, timeout=30.0) as client:
            response = client.request(method, API + path, headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach {args.url}: {type(exc).__name__}") from None
    if response.status_code >= 400:
        raise CommandError(error_line(response))
    return response


def segment(value: str) -> str:
    return quote(value, safe="")


# --- output -------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def show(args: argparse.Namespace, data: Any, columns: Sequence[str]) -> None:
    if args.format == "json":
        print(json.dumps(data, indent=2))
        return
    rows = data if isinstance(data, list) else [data]
    if not isinstance(data, list):  # one record: field per line
        width = max(len(k) for k in data)
        print("\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in data.items()))
        return
    print(table(rows, columns) if rows else "(none)")


# --- tenants ------------------------------------------------------------------------------------


def tenants_create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "display_name": args.display_name, "keycloak_group": args.keycloak_group}
    show(args, call(args, "POST", "/tenants", json=body).json(), TENANT_COLUMNS)
    return 0


def tenants_list(args: argparse.Namespace) -> int:
    show(args, call(args, "GET", "/tenants").json(), TENANT_COLUMNS)
    return 0


def tenants_show(args: argparse.Namespace) -> int:
    show(args, call(args, "GET", f"/tenants/{segment(args.name)}").json(), TENANT_COLUMNS)
    return 0


def tenants_update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.display_name is not None:
        body["display_name"] = args.display_name
    if args.keycloak_group is not None:
        body["keycloak_group"] = None if args.keycloak_group in ("", "none") else args.keycloak_group
    if not body:
        raise CommandError("nothing to change: give --display-name and/or --keycloak-group")
    show(args, call(args, "PATCH", f"/tenants/{segment(args.name)}", json=body).json(), TENANT_COLUMNS)
    return 0


def tenants_status(action: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        show(args, call(args, "POST", f"/tenants/{segment(args.name)}/{action}").json(), TENANT_COLUMNS)
        return 0

    return run


def tenants_delete(args: argparse.Namespace) -> int:
    call(args, "DELETE", f"/tenants/{segment(args.name)}")
    print(f"deleted tenant {args.name}")
    return 0


# --- quotas -------------------------------------------------------------------------------------


def _quota_path(args: argparse.Namespace) -> str:
    path = f"/tenants/{segment(args.tenant)}"
    return f"{path}/users/{segment(args.user)}/quota" if args.user else f"{path}/quota"


def limit(value: str) -> int | None:
    """A non-negative integer, or `none` for no limit."""
    if value.lower() in ("none", "unlimited"):
        return None
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value}")
    return number


def share(value: str) -> float | None:
    """A tenant's fair-sharing weight (above 0), or `none` for the default of 1."""
    if value.lower() in ("none", "default"):
        return None
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {value}")
    return number


_UNSET = object()


def quota_set(args: argparse.Namespace) -> int:
    # The API replaces the whole policy; the CLI changes only the flags given.
    current = call(args, "GET", _quota_path(args)).json()
    policy = {k: v for k, v in current.items() if k not in ("tenant", "user")}
    for field in QUOTA_OPTIONS:
        value = getattr(args, field)
        if value is not _UNSET:
            policy[field] = value
    if args.share is not _UNSET:
        policy["share"] = args.share
    if args.max_tokens_mode is not None:
        policy["max_tokens_mode"] = args.max_tokens_mode
    if args.allowed_models is not None:
        names = [m.strip() for m in args.allowed_models.split(",") if m.strip()]
        policy["allowed_models"] = None if args.allowed_models.strip().lower() in ("", "all") else names
    show(args, call(args, "PUT", _quota_path(args), json=policy).json(), ())
    return 0


def quota_show(args: argparse.Namespace) -> int:
    show(args, call(args, "GET", _quota_path(args)).json(), ())
    return 0


# --- keys ---------------------------------------------------------------------------------------


def keys_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "traffic_class": args.traffic_class}
    if args.expires_in_days is not None:
        body["expires_in_days"] = args.expires_in_days
    path = f"/tenants/{segment(args.tenant)}/keys" if args.tenant else "/me/keys"
    created = call(args, "POST", path, json=body).json()
    if args.format == "json":
        print(json.dumps(created, indent=2))
    else:
        print(created["key"])
        print(
            f"# key id {created['id']}, tenant {created['tenant']}: store it now, it is not shown again",
            file=sys.stderr,
        )
    return 0


def keys_list(args: argparse.Namespace) -> int:
    path = f"/tenants/{segment(args.tenant)}/keys" if args.tenant else "/me/keys"
    params = {"include_revoked": "true"} if args.all else None
    show(args, call(args, "GET", path, params=params).json(), KEY_COLUMNS)
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    show(args, call(args, "DELETE", f"/keys/{segment(args.id)}").json(), KEY_COLUMNS)
    return 0


# --- usage and login ----------------------------------------------------------------------------


def usage(args: argparse.Namespace) -> int:
    params = {
        "tenant": args.tenant,
        "user": args.user,
        "model": args.model,
        "from": args.since,
        "to": args.until,
        "group_by": args.group_by,
        "format": "csv" if args.format == "csv" else "json",
    }
    response = call(args, "GET", "/usage", params={k: v for k, v in params.items() if v is not None})
    if args.format == "csv":
        sys.stdout.write(response.text)
        return 0
    report = response.json()
    if args.format == "json":
        print(json.dumps(report, indent=2))
        return 0
    key_columns = [args.group_by, *(["username"] if args.group_by == "user" else [])]
    rows = report["rows"]
    print(table(rows, [*key_columns, *USAGE_TOTALS]) if rows else "(no usage)")
    return 0


def login(args: argparse.Namespace) -> int:
    from agencyllm.auth.login import DEFAULT_CLIENT_ID, LoginError, device_login

    issuer = args.issuer or ClientSettings().oidc_issuer
    if not issuer:
        raise CommandError("no issuer: pass --issuer or set AGENCYLLM_OIDC_ISSUER")
    try:
        device_login(issuer, args.client_id or DEFAULT_CLIENT_ID)
    except LoginError as exc:
        raise CommandError(f"login failed: {exc}") from None
    print("signed in")
    return 0


# --- wiring -------------------------------------------------------------------------------------


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CommandError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _common(formats: Sequence[str] = ("table", "json")) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--url",
        default=ClientSettings().url,
        help="platform URL (default: $AGENCYLLM_URL or %(default)s)",
    )
    parent.add_argument("--format", choices=formats, default="table")
    return parent


def _command(
    group: Any,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
    parents: Sequence[argparse.ArgumentParser] | None = None,
) -> argparse.ArgumentParser:
    parser = group.add_parser(name, help=help, description=help, parents=list(parents or [_common()]))
    parser.set_defaults(func=_guarded(func))
    return parser


def _group(subparsers: Any, name: str, help: str) -> Any:
    parser = subparsers.add_parser(name, help=help, description=help)
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])
    return parser.add_subparsers(title="commands", metavar="COMMAND")


def register(subparsers: Any) -> None:
    """Add `tenants`, `quota`, `keys`, `usage` and `login` to the main CLI."""
    tenants = _group(subparsers, "tenants", "manage tenants")
    p = _command(tenants, "create", tenants_create, "create a tenant")
    p.add_argument("name")
    p.add_argument("--display-name")
    p.add_argument("--keycloak-group", help="Keycloak group name or full path of its members")
    _command(tenants, "list", tenants_list, "list tenants")
    _command(tenants, "show", tenants_show, "show a tenant").add_argument("name")
    p = _command(tenants, "update", tenants_update, "change a tenant's display name or group")
    p.add_argument("name")
    p.add_argument("--display-name")
    p.add_argument("--keycloak-group", help="'none' removes the mapping")
    _command(tenants, "suspend", tenants_status("suspend"), "refuse a tenant's users and keys").add_argument("name")
    _command(tenants, "resume", tenants_status("resume"), "resume a suspended tenant").add_argument("name")
    _command(tenants, "delete", tenants_delete, "delete a tenant that has no usage history").add_argument("name")

    quota = _group(subparsers, "quota", "read and set quotas")
    p = _command(quota, "set", quota_set, "set quota limits (only the flags given change; 'none' = no limit)")
    p.add_argument("tenant")
    p.add_argument("--user", help="user subject (sub) for a per-user override")
    for field, flag in QUOTA_OPTIONS.items():
        p.add_argument(flag, dest=field, type=limit, default=_UNSET, metavar="N")
    p.add_argument(
        "--share",
        type=share,
        default=_UNSET,
        metavar="W",
        help="weight of the tenant's claim on engine slots when tenants compete ('none' = 1)",
    )
    p.add_argument("--max-tokens-mode", choices=("cap", "reject"))
    p.add_argument("--allowed-models", metavar="A,B", help="comma-separated model names; 'all' = every model")
    p = _command(quota, "show", quota_show, "show a tenant's (or user's) quota")
    p.add_argument("tenant")
    p.add_argument("--user", help="user subject (sub)")

    keys = _group(subparsers, "keys", "manage API keys")
    p = _command(keys, "create", keys_create, "mint a key (personal, or a tenant's service key with --tenant)")
    p.add_argument("--tenant")
    p.add_argument("--name", default="cli")
    p.add_argument("--expires-in-days", type=int, metavar="D")
    p.add_argument(
        "--class",
        dest="traffic_class",
        choices=("interactive", "batch"),
        default="interactive",
        help="batch: the key's requests queue behind interactive work when engines are busy",
    )
    p = _command(keys, "list", keys_list, "list your keys, or a tenant's with --tenant")
    p.add_argument("--tenant")
    p.add_argument("--all", action="store_true", help="include revoked keys")
    _command(keys, "revoke", keys_revoke, "revoke a key by id").add_argument("id")

    p = _command(subparsers, "usage", usage, "usage totals", parents=[_common(("table", "json", "csv"))])
    p.add_argument("--tenant")
    p.add_argument("--user")
    p.add_argument("--model")
    p.add_argument("--since", metavar="DATE", help="YYYY-MM-DD (inclusive) or ISO date-time")
    p.add_argument("--until", metavar="DATE", help="YYYY-MM-DD (inclusive) or ISO date-time (exclusive)")
    p.add_argument("--group-by", choices=("day", "user", "model", "tenant"), default="day")

    p = subparsers.add_parser("login", help="sign in with Keycloak (device code)", description="sign in with Keycloak")
    p.add_argument("--issuer", help="default: $AGENCYLLM_OIDC_ISSUER")
    p.add_argument("--client-id", help="public CLI client (default: agencyllm-cli)")
    p.set_defaults(func=_guarded(login))
