"""Ansible: the optional staff chat (Open WebUI, role agencyllm_chat), rendered with Ansible itself
(ansible-playbook -c local, nothing installed).

Open WebUI's environment file holds exactly what `agencyllm.serving.ops.chat_env` builds for the
same install (the fixed part, the history switch, the per-install values); the unit runs
`open-webui serve` on the listen address as its own user, hardened; the platform's environment file
carries the realm's directory client; the bundled server lets Open WebUI's role in from loopback
only when the chat host is the head. The argument specs and the role's checks refuse bad values
before anything changes. The real converge (a stand-in open-webui wheel installed offline from the
bundle's chat wheelhouse, its database made on the bundled server, the unit's ExecStart run as its
user) is part of tests/test_ansible.py.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible_render import ROLES, local_host, playbook, role_defaults

from agencyllm.serving.ops import chat_env
from agencyllm.serving.ops.chat_env import ChatInstall, install_environment

CHAT = ROLES / "agencyllm_chat"
GENERATED = yaml.safe_load((CHAT / "vars" / "main.yml").read_text())
ISSUER = "https://sso.agency.gov/realms/agency"
SECRETS = {
    "agencyllm_chat_frontend_key": "sk-agency-frontend-0123456789",
    "agencyllm_chat_client_secret": "owui-client-secret",
    "agencyllm_chat_secret_key": "owui-session-secret",
    "agencyllm_chat_database_password": "chat-db-secret",
}
SECRET_NAMES = ("frontend_key", "client_secret", "secret_key", "database_url", "database_password", "environment")
REQUIRED = {"agencyllm_chat_public_url": "https://chat.agency.gov/", **SECRETS}


def _inventory(chat_hosts: dict) -> dict:
    return {
        "agencyllm_head": {"hosts": {"llm-head": local_host("10.20.0.10")}},
        "agencyllm_workers": {"hosts": {}},
        "agencyllm_chat": {"hosts": chat_hosts},
    }


def _group_vars(tmp_path: Path, **overrides) -> dict:
    return {
        **role_defaults("agencyllm", "agencyllm_ray", "agencyllm_postgres", "agencyllm_chat"),
        **GENERATED,
        "agencyllm_credentials_dir": str(tmp_path / "credentials"),
        "agencyllm_postgres_password": "app-secret",
        "agencyllm_settings": {"oidc_issuer": ISSUER},
        **REQUIRED,
        **overrides,
    }


def render(tmp_path: Path, chat_hosts: dict | None = None, **overrides) -> dict[str, dict[str, str]]:
    """Each host's rendered files by name: Open WebUI's environment file and unit (on chat hosts),
    the platform's environment file and the bundled server's pg_hba.conf (on the head)."""
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    chat_hosts = {"llm-head": {}} if chat_hosts is None else chat_hosts
    host_dir = str(out) + "/{{ inventory_hostname }}"
    tasks = [
        {"name": "A folder per host", "ansible.builtin.file": {"path": host_dir, "state": "directory", "mode": "0700"}},
        {"name": "Chat files", "when": "inventory_hostname in groups['agencyllm_chat']",
         "ansible.builtin.template": {"src": str(CHAT / "templates" / "{{ item }}.j2"),
                                      "dest": host_dir + "/{{ item }}", "mode": "0600"},
         "loop": ["open-webui.env", "agencyllm-chat.service"]},
        {"name": "Platform environment file", "when": "inventory_hostname in groups['agencyllm_head']",
         "ansible.builtin.template": {"src": str(ROLES / "agencyllm_ray" / "templates" / "agencyllm.env.j2"),
                                      "dest": host_dir + "/agencyllm.env", "mode": "0600"}},
        {"name": "Bundled server's pg_hba.conf", "when": "inventory_hostname in groups['agencyllm_head']",
         "ansible.builtin.template": {"src": str(ROLES / "agencyllm_postgres" / "templates" / "pg_hba.conf.j2"),
                                      "dest": host_dir + "/pg_hba.conf", "mode": "0600"}},
    ]  # fmt: skip
    done = playbook(tmp_path / "render", _inventory(chat_hosts), _group_vars(tmp_path, **overrides), tasks)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return {h.name: {p.name: p.read_text() for p in h.iterdir()} for h in out.iterdir() if h.is_dir()}


def env_file(text: str) -> dict[str, str]:
    """An environment file as systemd reads it: KEY='VALUE' lines, comments skipped."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    parsed = dict(re.findall(r"^(\w+)='([^'\n]*)'$", "\n".join(lines), re.M))
    assert len(parsed) == len(lines), f"lines systemd would not read as KEY='VALUE': {lines}"
    return parsed


def unit_file(text: str) -> dict[str, list[str]]:
    unit: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            unit.setdefault(key, []).append(value)
    return unit


def expected_environment(**changes) -> dict[str, str]:
    """What the platform's own code builds for the install the tests render."""
    install = {
        "api_base_url": "http://10.20.0.10:8000/v1",
        "frontend_key": SECRETS["agencyllm_chat_frontend_key"],
        "public_url": "https://chat.agency.gov",
        "oidc_issuer": ISSUER,
        "client_secret": SECRETS["agencyllm_chat_client_secret"],
        "database_url": "postgresql://openwebui:chat-db-secret@127.0.0.1:5432/openwebui",
        "secret_key": SECRETS["agencyllm_chat_secret_key"],
        "data_dir": "/var/lib/agencyllm-chat",
        "keep_history": False,
    }
    chosen = install | changes
    # Beside install_environment: the host's layout (the unit keeps the venv read-only).
    return install_environment(ChatInstall(**chosen)) | {"STATIC_DIR": f"{chosen['data_dir']}/static"}


# --- Open WebUI's environment file ------------------------------------------------------------------


def test_the_environment_file_is_what_chat_env_builds_for_this_install(tmp_path):
    env = env_file(render(tmp_path)["llm-head"]["open-webui.env"])
    assert env == expected_environment()
    # Spelled out: every fixed value, history off (temporary chats only), the front-end key twice.
    for key, value in chat_env.FIXED_ENVIRONMENT.items():
        assert env[key] == value, key
    assert {k: env[k] for k in chat_env.HISTORY_OFF} == chat_env.HISTORY_OFF
    assert env["OPENAI_API_KEY"] == env["FORWARD_USER_INFO_HEADER_JWT_SECRET"] == SECRETS["agencyllm_chat_frontend_key"]
    assert env["OPENID_PROVIDER_URL"] == f"{ISSUER}/.well-known/openid-configuration"
    assert env["OPENID_REDIRECT_URI"] == "https://chat.agency.gov/oauth/oidc/callback"
    assert env["OAUTH_CLIENT_ID"] == chat_env.OPEN_WEBUI_CLIENT_ID
    assert env["DATABASE_URL"].startswith("postgresql://") and "sqlite" not in json.dumps(env)


def test_history_on_keeps_conversations(tmp_path):
    env = env_file(render(tmp_path, agencyllm_chat_history=True)["llm-head"]["open-webui.env"])
    assert env == expected_environment(keep_history=True)
    assert {k: env[k] for k in chat_env.HISTORY_ON} == chat_env.HISTORY_ON


def test_a_chat_host_of_its_own_with_its_database_url_the_agency_ca_and_extra_variables(tmp_path):
    external = "postgresql://owui:pw@db.agency.gov:5432/openwebui?sslmode=verify-full"
    hosts = render(
        tmp_path,
        {"llm-chat": local_host("10.20.0.13")},
        agencyllm_chat_database_url=external,
        agencyllm_ca_file="/etc/pki/agency-ca.pem",
        agencyllm_api_port=8400,
        agencyllm_chat_history=False,
        agencyllm_chat_extra_environment={"WEBUI_NAME": "Agency chat", "ENABLE_SIGNUP": False},
    )
    env = env_file(hosts["llm-chat"]["open-webui.env"])
    expected = expected_environment(api_base_url="http://10.20.0.10:8400/v1", database_url=external)
    ca = {"SSL_CERT_FILE": "/etc/pki/agency-ca.pem", "REQUESTS_CA_BUNDLE": "/etc/pki/agency-ca.pem"}
    assert env == expected | ca | {"WEBUI_NAME": "Agency chat", "ENABLE_SIGNUP": "False"}
    assert "open-webui.env" not in hosts["llm-head"]
    # Not the head: no database of Open WebUI's on the bundled server, so no line for it.
    assert "openwebui" not in hosts["llm-head"]["pg_hba.conf"]
    assert "agencyllm-postgres.service" not in hosts["llm-chat"]["agencyllm-chat.service"]


def test_the_platform_api_and_issuer_can_be_named(tmp_path):
    env = env_file(
        render(
            tmp_path,
            agencyllm_chat_api_base_url="http://127.0.0.1:8000/v1/",
            agencyllm_chat_oidc_issuer="https://sso.agency.gov/realms/staff/",
            agencyllm_chat_public_url="https://llm.agency.gov/chat",
        )["llm-head"]["open-webui.env"]
    )
    assert env["OPENAI_API_BASE_URL"] == "http://127.0.0.1:8000/v1"
    assert env["OPENID_PROVIDER_URL"] == "https://sso.agency.gov/realms/staff/.well-known/openid-configuration"
    assert env["WEBUI_URL"] == env["CORS_ALLOW_ORIGIN"] == "https://llm.agency.gov/chat"
    assert env["OPENID_REDIRECT_URI"] == "https://llm.agency.gov/chat/oauth/oidc/callback"


def test_the_environment_file_is_written_root_only_and_never_logged():
    tasks = yaml.safe_load((CHAT / "tasks" / "main.yml").read_text())
    [task] = [t for t in tasks if t.get("ansible.builtin.template", {}).get("src") == "open-webui.env.j2"]
    assert task["ansible.builtin.template"]["mode"] == "0600"
    assert task["ansible.builtin.template"]["owner"] == "root" and task["ansible.builtin.template"]["group"] == "root"
    assert task["no_log"] is True
    assert stat.S_IMODE(int(task["ansible.builtin.template"]["mode"], 8)) == 0o600
    # Every task handling a secret hides it.
    for name in ("main.yml", "check.yml"):
        for task in yaml.safe_load((CHAT / "tasks" / name).read_text()):
            text = json.dumps(task)
            if any(f"agencyllm_chat_{secret}" in text for secret in SECRET_NAMES) or "open-webui.env" in text:
                assert task.get("no_log") is True, f"{name}: {task['name']}"
    chat_db = yaml.safe_load((ROLES / "agencyllm_postgres" / "tasks" / "chat_database.yml").read_text())
    for task in chat_db:
        if "agencyllm_chat_database_password" in json.dumps(task):
            assert task.get("no_log") is True, task["name"]


# --- The unit -------------------------------------------------------------------------------------


def test_the_unit_runs_open_webui_on_the_listen_address_as_its_user_hardened(tmp_path):
    unit = unit_file(render(tmp_path)["llm-head"]["agencyllm-chat.service"])
    port = chat_env.OPEN_WEBUI_PORT
    assert unit["ExecStart"] == [f"/opt/agencyllm-chat/venv/bin/open-webui serve --host 127.0.0.1 --port {port}"]
    assert unit["User"] == ["agencyllm-chat"] and unit["Group"] == ["agencyllm-chat"]
    assert unit["EnvironmentFile"] == ["/etc/agencyllm-chat/open-webui.env"]
    assert unit["WorkingDirectory"] == ["/var/lib/agencyllm-chat"]
    # The data folder is the only one it writes.
    assert unit["ReadWritePaths"] == ["/var/lib/agencyllm-chat"]
    hardening = {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "true",
        "PrivateTmp": "true",
        "ProtectHome": "true",
        "PrivateDevices": "true",
        "RestrictSUIDSGID": "true",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "Restart": "on-failure",
    }
    assert {k: unit[k] for k in hardening} == {k: [v] for k, v in hardening.items()}
    assert "agencyllm-postgres.service" in unit["After"][0]  # its database is on the head's bundled server
    assert "ExecStop" not in unit and "PORT" not in json.dumps(unit["ExecStart"]).replace("--port", "")


def test_the_listen_address_and_port_can_be_chosen(tmp_path):
    unit = unit_file(
        render(
            tmp_path,
            agencyllm_chat_listen_address="10.20.0.10",
            agencyllm_chat_port=3000,
            agencyllm_chat_venv="/srv/owui/venv",
            agencyllm_chat_data_dir="/srv/owui/data",
        )["llm-head"]["agencyllm-chat.service"]
    )
    assert unit["ExecStart"] == ["/srv/owui/venv/bin/open-webui serve --host 10.20.0.10 --port 3000"]
    assert unit["WorkingDirectory"] == unit["ReadWritePaths"] == ["/srv/owui/data"]


# --- The platform's side: the directory client and Open WebUI's database on the bundled server ----


def test_the_platform_gets_the_directory_client_and_its_secret_only_when_set(tmp_path):
    env = env_file(
        render(tmp_path / "a", agencyllm_ray_oidc_directory_client_secret="dir-secret")["llm-head"]["agencyllm.env"]
    )
    assert env["AGENCYLLM_OIDC_DIRECTORY_CLIENT_ID"] == "agencyllm-directory"
    assert env["AGENCYLLM_OIDC_DIRECTORY_CLIENT_SECRET"] == "dir-secret"
    assert env["AGENCYLLM_OIDC_ISSUER"] == ISSUER
    env = env_file(render(tmp_path / "b")["llm-head"]["agencyllm.env"])
    assert env["AGENCYLLM_OIDC_DIRECTORY_CLIENT_ID"] == "agencyllm-directory"
    assert "AGENCYLLM_OIDC_DIRECTORY_CLIENT_SECRET" not in env
    env = env_file(
        render(tmp_path / "c", agencyllm_ray_oidc_directory_client_id="staff-directory")["llm-head"]["agencyllm.env"]
    )
    assert env["AGENCYLLM_OIDC_DIRECTORY_CLIENT_ID"] == "staff-directory"


def test_the_bundled_server_lets_open_webui_in_from_loopback_only_when_the_head_is_the_chat_host(tmp_path):
    def lines(text: str) -> list[str]:
        return [" ".join(line.split()) for line in text.splitlines() if line.strip() and not line.startswith("#")]

    head = lines(render(tmp_path / "a")["llm-head"]["pg_hba.conf"])
    assert [line for line in head if "openwebui" in line] == ["host openwebui openwebui 127.0.0.1/32 scram-sha-256"]
    for case, overrides in {
        "b": {"chat_hosts": {}},
        "c": {"agencyllm_chat_database_url": "postgresql://owui:pw@db.agency.gov/openwebui"},
        "d": {"agencyllm_postgres_mode": "external", "agencyllm_postgres_url": "postgresql://a:b@db/agencyllm"},
    }.items():
        head = lines(render(tmp_path / case, **overrides)["llm-head"]["pg_hba.conf"])
        assert not [line for line in head if "openwebui" in line], case


# --- Argument specs and the role's checks ----------------------------------------------------------


def _validate(tmp_path: Path, arguments: dict) -> subprocess.CompletedProcess:
    spec = CHAT / "meta" / "argument_specs.yml"
    options = f"{{{{ (lookup('ansible.builtin.file', '{spec}') | from_yaml).argument_specs.main.options }}}}"
    task = {
        "name": "Validate",
        "ansible.builtin.validate_argument_spec": {"argument_spec": options, "provided_arguments": arguments},
    }
    return playbook(tmp_path, {"all": {"hosts": {"localhost": local_host("127.0.0.1")}}}, {}, [task])


def test_argument_specs_accept_a_chat_configuration(tmp_path):
    done = _validate(
        tmp_path,
        {
            **{k: v for k, v in REQUIRED.items() if k != "agencyllm_chat_database_password"},
            "agencyllm_chat_history": True,
            "agencyllm_chat_port": 3000,
            "agencyllm_chat_extra_environment": {},
        },
    )
    assert done.returncode == 0, done.stdout[-3000:]


def test_argument_specs_refuse_bad_values_and_missing_secrets(tmp_path):
    done = _validate(
        tmp_path,
        {"agencyllm_chat_public_url": "https://chat.agency.gov", "agencyllm_chat_history": "sometimes",
         "agencyllm_chat_port": "eighty", "agencyllm_chat_extra_environment": ["WEBUI_NAME=x"]},
    )  # fmt: skip
    assert done.returncode != 0
    for expected in (
        "agencyllm_chat_history",
        "sometimes",
        "agencyllm_chat_port",
        "eighty",
        "agencyllm_chat_extra_environment",
        "missing required arguments",
        "agencyllm_chat_frontend_key",
        "agencyllm_chat_client_secret",
    ):
        assert expected in done.stdout, (expected, done.stdout[-3000:])


@pytest.fixture(scope="module")
def chat_wheels(tmp_path_factory) -> Path:
    """A chat wheelhouse's lock as the bundle writes it (its content only matters for the check)."""
    folder = tmp_path_factory.mktemp("chat-wheels")
    (folder / "requirements.lock").write_text(
        f"# agencyllm chat wheelhouse\nopen-webui=={chat_env.OPEN_WEBUI_VERSION} \\\n    --hash=sha256:{'0' * 64}\n"
    )
    return folder


def check(tmp_path: Path, chat_wheels: Path, **overrides) -> subprocess.CompletedProcess:
    """The role's checks (tasks_from check: asserts, the Python's version, the wheelhouse's lock;
    nothing changes) on the head as chat host."""
    defaults = {
        "agencyllm_bundle_dir": str(tmp_path / "bundle"),
        "agencyllm_chat_wheels_dir": str(chat_wheels),
        "agencyllm_chat_python_interpreter": sys.executable,
        "agencyllm_ray_oidc_directory_client_secret": "dir-secret",
    }
    group_vars = _group_vars(tmp_path, **(defaults | overrides))
    task = {"name": "Checks", "ansible.builtin.include_role": {"name": "agencyllm_chat", "tasks_from": "check"}}
    return playbook(tmp_path / "check", _inventory({"llm-head": {}}), group_vars, [task])


def test_the_checks_pass_for_a_good_configuration(tmp_path, chat_wheels):
    if f"{sys.version_info[0]}.{sys.version_info[1]}" not in ("3.11", "3.12"):
        pytest.skip("the test runner's Python is not one open-webui supports")
    done = check(tmp_path, chat_wheels)
    assert done.returncode == 0, done.stdout[-4000:]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"agencyllm_chat_public_url": "http://chat.agency.gov"}, "must be the https address staff open"),
        ({"agencyllm_chat_frontend_key": ""}, "agencyllm keys create-frontend"),
        ({"agencyllm_settings": {}}, "the realm's issuer"),
        ({"agencyllm_chat_database_url": "sqlite:////var/lib/webui.db"}, "postgresql://"),
        ({"agencyllm_chat_data_dir": "/home/owui"}, "may not be under /home"),
        ({"agencyllm_chat_client_secret": "it's"}, "may not hold single quotes"),
        ({"agencyllm_ray_oidc_directory_client_secret": ""}, "agencyllm_ray_oidc_directory_client_secret"),
        ({"agencyllm_chat_python_interpreter": "PYTHON313"}, "open-webui needs 3.11 or 3.12"),
        ({"agencyllm_chat_wheels_dir": "EMPTY"}, "agencyllm bundle build --with-chat"),
        ({"agencyllm_chat_wheels_dir": "OTHER_RELEASE"}, f"does not pin open-webui {chat_env.OPEN_WEBUI_VERSION}"),
    ],
    ids=["http", "no-key", "no-issuer", "sqlite", "home", "quote", "no-directory", "python", "no-wheels", "release"],
)
def test_the_checks_refuse_and_name_the_fix(tmp_path, chat_wheels, overrides, expected):
    if overrides.get("agencyllm_chat_python_interpreter") == "PYTHON313":
        fake = tmp_path / "python3.13"
        fake.write_text("#!/bin/sh\necho 3.13\n")
        fake.chmod(0o755)
        overrides = {"agencyllm_chat_python_interpreter": str(fake)}
    elif overrides.get("agencyllm_chat_wheels_dir") == "EMPTY":
        (tmp_path / "empty").mkdir()
        overrides = {"agencyllm_chat_wheels_dir": str(tmp_path / "empty")}
    elif overrides.get("agencyllm_chat_wheels_dir") == "OTHER_RELEASE":
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "requirements.lock").write_text("open-webui==0.0.1 \\\n    --hash=sha256:00\n")
        overrides = {"agencyllm_chat_wheels_dir": str(tmp_path / "other")}
    else:
        overrides = dict(overrides)
    done = check(tmp_path, chat_wheels, **overrides)
    assert done.returncode != 0
    assert expected in done.stdout, done.stdout[-4000:]
    # Secrets never reach the output, not even in a failing check.
    for secret in SECRETS.values():
        assert secret not in done.stdout + done.stderr
