"""The `agencyllm` command line's contract with people and scripts, offline.

Pinned from the argparse CLI it replaced: every command path with its arguments and options
(`tests/fixtures/cli_commands.json`), `--help` on every command (exit 0), usage errors (exit 2),
and what scripts read: `--format json` and `--format csv` output, the requests made, the one-line
errors. The admin API is a mock transport here; `test_admin_cli.py` drives a real one.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import httpx
import pytest

from agencyllm.serving.cli import admin as cli_admin
from agencyllm.serving.cli.main import build_parser, main

EXPECTED = json.loads((Path(__file__).parent / "fixtures" / "cli_commands.json").read_text())
GROUPS = sorted({" ".join(path.split()[:i]) for path in EXPECTED for i in range(len(path.split()))})


def exit_code(argv: list[str]) -> int:
    """`main`'s code, returned or (usage errors, `--help`) raised as SystemExit as argparse did."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def choices_of(annotation: Any) -> list[str] | None:
    """The values an option's declared type allows (a Literal or an Enum, maybe optional)."""
    if get_origin(annotation) is Literal:
        return sorted(get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return sorted(member.value for member in annotation)
    for arg in get_args(annotation):
        if arg is not type(None) and (found := choices_of(arg)):
            return found
    return None


def walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every command of the tree (click's, under Typer) with its arguments and options."""
    if hasattr(command, "commands"):
        for name, child in command.commands.items():
            yield from walk(child, (*path, name))
        return
    arguments = [p.name for p in command.params if p.param_type_name == "argument"]
    options: dict[str, Any] = {}
    for param in command.params:
        if param.param_type_name == "option":
            choices = choices_of(param.type_descriptor.annotation)
            for flag in [*param.opts, *param.secondary_opts]:
                if flag != "--help":
                    options[flag] = choices
    yield " ".join(path), {"arguments": arguments, "options": options}


def test_command_tree_is_unchanged():
    tree = dict(walk(build_parser()))
    tree.pop("", None)
    completion = {"--install-completion", "--show-completion"}
    assert sorted(tree) == sorted(EXPECTED)
    for path, spec in EXPECTED.items():
        assert tree[path]["arguments"] == spec["arguments"], path
        assert {k: v for k, v in tree[path]["options"].items() if k not in completion} == spec["options"], path


def test_the_root_offers_shell_completion(capsys):
    assert exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--install-completion" in out and "--show-completion" in out


@pytest.mark.parametrize("path", sorted(p for p in EXPECTED if not p.startswith("_")) + GROUPS)
def test_help_on_every_command(path, capsys):
    assert exit_code([*path.split(), "--help"]) == 0
    assert "usage" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_unknown_option_is_a_usage_error(path, capsys):
    assert exit_code([*path.split(), "--no-such-option"]) == 2
    assert capsys.readouterr().err


@pytest.mark.parametrize("path", GROUPS)
def test_a_group_without_its_command_exits_2(path):
    assert exit_code(path.split()) == 2


def test_usage_errors_raise_system_exit_2():
    with pytest.raises(SystemExit) as exited:
        main(["tenants", "list", "--format", "yaml"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        main(["quota", "set", "t", "--share", "0"])
    assert exited.value.code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["up", "--config", "a.yaml", "--model", "m"],
        ["model", "card", "m", "--config", "a.yaml", "--model-dir", "m"],
        ["db", "bootstrap-admin"],
        ["db", "bootstrap-admin", "--new-key", "--key-file", "k"],
        ["quota", "set", "t", "--max-tokens-mode", "drop"],
        ["keys", "create", "--class", "bulk"],
        ["usage", "--group-by", "week"],
        ["feedback", "list", "--category", "rude"],
        ["tenants", "show"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    assert exit_code(argv) == 2


# --- what scripts read: the admin commands over a mock admin API ----------------------------------

TENANTS = [
    {"name": "roads", "display_name": "Roads", "keycloak_group": "/roads", "status": "active"},
    {"name": "parks", "display_name": None, "keycloak_group": None, "status": "suspended"},
]
KEYS = [
    {
        "id": "7f0c",
        "prefix": "sk-agency-abc",
        "name": "etl",
        "kind": "service",
        "traffic_class": "batch",
        "tenant": "roads",
        "owner_username": "svc",
        "expires_at": None,
        "revoked_at": None,
        "last_used_at": "2026-01-02T03:04:05Z",
    }
]
POLICY = {
    "tenant": "roads",
    "user": None,
    "tokens_per_day": 1000,
    "tokens_per_month": None,
    "requests_per_minute": 5,
    "max_concurrent_requests": None,
    "max_tokens_per_request": None,
    "share": None,
    "max_tokens_mode": "cap",
    "allowed_models": ["m1", "m2"],
}
USAGE = {
    "rows": [
        {
            "user": "sub-1",
            "username": "ada",
            "requests": 3,
            "prompt_tokens": 10,
            "completion_tokens": 20,
            "total_tokens": 30,
        }
    ]
}
USAGE_CSV = "user,username,requests,prompt_tokens,completion_tokens,total_tokens\nsub-1,ada,3,10,20,30\n"
FEEDBACK = [
    {
        "id": 4,
        "created_at": "2026-01-02T03:04:05Z",
        "tenant": "roads",
        "username": "ada",
        "rating": -1,
        "category": "biased",
        "request_id": "req-1",
        "comment": "odd answer",
    }
]


class FakeAdminAPI:
    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path, method, params = request.url.path.removeprefix("/admin/v1"), request.method, request.url.params
        if path == "/tenants/ghost":
            return httpx.Response(404, json={"error": {"message": "No tenant named 'ghost'."}})
        if path == "/tenants" and method == "GET":
            return httpx.Response(200, json=TENANTS)
        if path.startswith("/tenants/roads/keys") or path == "/me/keys":
            if method == "POST":
                return httpx.Response(201, json={**KEYS[0], "key": "sk-agency-abc_secret"})
            return httpx.Response(200, json=KEYS)
        if path.startswith("/tenants/roads") and path.endswith("/quota"):
            body = json.loads(request.content) if method == "PUT" else {}
            return httpx.Response(200, json={**POLICY, **body})
        if path in ("/tenants/roads", "/tenants/roads/suspend", "/tenants/roads/resume", "/tenants"):
            return httpx.Response(200, json=TENANTS[0])
        if path == "/keys/7f0c":
            return httpx.Response(200, json={**KEYS[0], "revoked_at": "2026-02-01T00:00:00Z"})
        if path == "/usage":
            if params.get("format") == "csv":
                return httpx.Response(200, text=USAGE_CSV)
            return httpx.Response(200, json=USAGE)
        if path == "/feedback":
            if params.get("format") == "csv":
                return httpx.Response(200, text="id,category\n4,biased\n")
            if params.get("format") == "jsonl":
                return httpx.Response(200, text=json.dumps(FEEDBACK[0]) + "\n")
            return httpx.Response(200, json=FEEDBACK)
        return httpx.Response(500, json={"error": {"message": f"unexpected {method} {path}"}})


@pytest.fixture
def api(monkeypatch) -> FakeAdminAPI:
    fake = FakeAdminAPI()
    monkeypatch.setenv("AGENCYLLM_API_KEY", "sk-agency-aaaaaaaaaaaa_test")
    monkeypatch.setenv("AGENCYLLM_URL", "http://admin.test")
    monkeypatch.setattr(
        cli_admin, "client_factory", lambda **kw: httpx.Client(transport=httpx.MockTransport(fake.handle), **kw)
    )
    return fake


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = exit_code(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_table(out: str, columns: list[str], rows: list[list[str]]) -> None:
    """Human tables: the same columns, in order, and the same values (the look may change)."""
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].split() == [c.upper() for c in columns]
    for line, values in zip(lines[1:], rows, strict=True):
        assert line.split() == values


def test_tenants_json_and_table(api, capsys):
    code, out, _ = run(capsys, "tenants", "list", "--format", "json")
    assert code == 0 and out == json.dumps(TENANTS, indent=2) + "\n"
    code, out, _ = run(capsys, "tenants", "list")
    assert code == 0
    assert_table(
        out,
        ["name", "display_name", "keycloak_group", "status"],
        [["roads", "Roads", "/roads", "active"], ["parks", "-", "-", "suspended"]],
    )
    code, out, _ = run(capsys, "tenants", "show", "roads")
    assert code == 0 and [line.split() for line in out.splitlines() if line.strip()] == [
        ["name", "roads"],
        ["display_name", "Roads"],
        ["keycloak_group", "/roads"],
        ["status", "active"],
    ]
    assert run(capsys, "tenants", "suspend", "roads", "--format", "json")[1] == json.dumps(TENANTS[0], indent=2) + "\n"
    code, out, _ = run(capsys, "tenants", "delete", "roads")
    assert (code, out) == (0, "deleted tenant roads\n")
    assert [(r.method, r.url.path) for r in api.requests] == [
        ("GET", "/admin/v1/tenants"),
        ("GET", "/admin/v1/tenants"),
        ("GET", "/admin/v1/tenants/roads"),
        ("POST", "/admin/v1/tenants/roads/suspend"),
        ("DELETE", "/admin/v1/tenants/roads"),
    ]
    assert api.requests[0].headers["authorization"] == "Bearer sk-agency-aaaaaaaaaaaa_test"


def test_tenant_create_and_update_bodies(api, capsys):
    assert run(capsys, "tenants", "create", "roads", "--display-name", "Roads", "--keycloak-group", "/r")[0] == 0
    assert json.loads(api.requests[-1].content) == {"name": "roads", "display_name": "Roads", "keycloak_group": "/r"}
    assert run(capsys, "tenants", "update", "roads", "--keycloak-group", "none")[0] == 0
    assert (api.requests[-1].method, json.loads(api.requests[-1].content)) == ("PATCH", {"keycloak_group": None})
    code, out, err = run(capsys, "tenants", "update", "roads")
    assert (code, out) == (1, "")
    assert err == "error: nothing to change: give --display-name and/or --keycloak-group\n"


def test_errors_are_one_line(api, capsys):
    code, out, err = run(capsys, "tenants", "show", "ghost")
    assert (code, out, err) == (1, "", "error: No tenant named 'ghost'. (HTTP 404)\n")


def test_keys_output(api, capsys):
    code, out, err = run(capsys, "keys", "create", "--tenant", "roads", "--name", "etl", "--class", "batch")
    assert (code, out) == (0, "sk-agency-abc_secret\n")
    assert err == "# key id 7f0c, tenant roads: store it now, it is not shown again\n"
    assert json.loads(api.requests[-1].content) == {"name": "etl", "traffic_class": "batch"}
    code, out, _ = run(capsys, "keys", "create", "--expires-in-days", "3", "--format", "json")
    assert json.loads(out)["key"] == "sk-agency-abc_secret" and api.requests[-1].url.path == "/admin/v1/me/keys"
    assert json.loads(api.requests[-1].content) == {"name": "cli", "traffic_class": "interactive", "expires_in_days": 3}
    code, out, _ = run(capsys, "keys", "list", "--tenant", "roads", "--all", "--format", "json")
    assert out == json.dumps(KEYS, indent=2) + "\n" and api.requests[-1].url.params["include_revoked"] == "true"
    columns = list(KEYS[0])
    code, out, _ = run(capsys, "keys", "list")
    assert_table(
        out,
        columns,
        [["7f0c", "sk-agency-abc", "etl", "service", "batch", "roads", "svc", "-", "-", KEYS[0]["last_used_at"]]],
    )
    assert json.loads(run(capsys, "keys", "revoke", "7f0c", "--format", "json")[1])["revoked_at"]


def test_quota_set_changes_only_the_flags_given(api, capsys):
    code, out, _ = run(
        capsys, "quota", "set", "roads", "--tokens-per-month", "7", "--requests-per-minute", "none",
        "--share", "2.5", "--allowed-models", "all", "--max-tokens-mode", "reject", "--format", "json",
    )  # fmt: skip
    assert code == 0
    put = api.requests[-1]
    assert (put.method, put.url.path) == ("PUT", "/admin/v1/tenants/roads/quota")
    policy = {k: v for k, v in POLICY.items() if k not in ("tenant", "user")}
    expected = {**policy, "tokens_per_month": 7, "requests_per_minute": None, "share": 2.5}
    assert json.loads(put.content) == {**expected, "allowed_models": None, "max_tokens_mode": "reject"}
    assert json.loads(out)["tokens_per_month"] == 7
    code, out, _ = run(capsys, "quota", "show", "roads", "--user", "sub 1", "--format", "json")
    assert api.requests[-1].url.raw_path == b"/admin/v1/tenants/roads/users/sub%201/quota"
    assert json.loads(out) == POLICY
    code, out, _ = run(capsys, "quota", "show", "roads")
    assert ["max_tokens_mode", "cap"] in [line.split() for line in out.splitlines()]
    assert ["allowed_models", "m1,m2"] in [line.split() for line in out.splitlines()]


def test_usage_csv_json_and_table(api, capsys):
    code, out, _ = run(capsys, "usage", "--tenant", "roads", "--group-by", "user", "--format", "csv")
    assert (code, out) == (0, USAGE_CSV)
    assert dict(api.requests[-1].url.params) == {"tenant": "roads", "group_by": "user", "format": "csv"}
    code, out, _ = run(capsys, "usage", "--since", "2026-01-01", "--until", "2026-02-01", "--format", "json")
    assert out == json.dumps(USAGE, indent=2) + "\n"
    params = dict(api.requests[-1].url.params)
    assert params == {"from": "2026-01-01", "to": "2026-02-01", "group_by": "day", "format": "json"}
    code, out, _ = run(capsys, "usage", "--group-by", "user", "--model", "m1")
    columns = ["user", "username", "requests", "prompt_tokens", "completion_tokens", "total_tokens"]
    assert_table(out, columns, [["sub-1", "ada", "3", "10", "20", "30"]])
    assert next(csv.reader(io.StringIO(USAGE_CSV))) == columns


def test_feedback_formats(api, capsys):
    code, out, _ = run(capsys, "feedback", "export", "--format", "csv", "--category", "biased", "--limit", "5")
    assert (code, out) == (0, "id,category\n4,biased\n")
    assert dict(api.requests[-1].url.params) == {"category": "biased", "limit": "5", "format": "csv"}
    assert run(capsys, "feedback", "export", "--format", "jsonl")[1] == json.dumps(FEEDBACK[0]) + "\n"
    assert run(capsys, "feedback", "list", "--format", "json")[1] == json.dumps(FEEDBACK, indent=2) + "\n"
    code, out, _ = run(capsys, "feedback", "list", "--tenant", "roads", "--since", "2026-01-01")
    assert dict(api.requests[-1].url.params) == {"tenant": "roads", "from": "2026-01-01", "format": "json"}
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].split() == ["ID", "CREATED_AT", "TENANT", "USERNAME", "RATING", "CATEGORY", "REQUEST_ID", "COMMENT"]
    assert lines[1].split() == ["4", "2026-01-02T03:04:05Z", "roads", "ada", "-1", "biased", "req-1", "odd", "answer"]


def test_no_credentials_says_what_to_do(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("AGENCYLLM_API_KEY", raising=False)
    monkeypatch.setenv("AGENCYLLM_DATA_DIR", str(tmp_path))
    monkeypatch.setattr("agencyllm.auth.login.cached_access_token", lambda *a, **k: None)
    code, out, err = run(capsys, "tenants", "list")
    assert (code, out) == (1, "")
    assert err.startswith("error: no credentials: set AGENCYLLM_API_KEY, run `agencyllm login`")


def test_login_needs_an_issuer(monkeypatch, capsys):
    monkeypatch.delenv("AGENCYLLM_OIDC_ISSUER", raising=False)
    code, _, err = run(capsys, "login")
    assert (code, err) == (1, "error: no issuer: pass --issuer or set AGENCYLLM_OIDC_ISSUER\n")


def test_placeholder_and_new_key(tmp_path, capsys):
    code, out, _ = run(capsys, "model", "placeholder", str(tmp_path / "m"))
    assert code == 0 and out.startswith("Placeholder model (random weights, gibberish output) written to ")
    code, out, _ = run(capsys, "db", "bootstrap-admin", "--new-key")
    assert code == 0 and out.startswith("sk-agency-") and len(out.splitlines()) == 1


def test_shell_completion_completes_commands_and_choices():
    import os
    import subprocess
    import sys

    def complete(words: str) -> list[str]:
        env = {**os.environ, "_AGENCYLLM_COMPLETE": "complete_bash", "COMP_WORDS": words}
        env["COMP_CWORD"] = str(len(words.split()) - (0 if words.endswith(" ") else 1))
        code = "from agencyllm.serving.cli.main import main; main()"
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        return result.stdout.split()

    assert complete("agencyllm ten") == ["tenants"]
    assert complete("agencyllm keys create --class ") == ["interactive", "batch"]
