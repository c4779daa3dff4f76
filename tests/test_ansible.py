"""Ansible for bare hosts: lint, argument specs, and a real converge against this machine.

The converge runs as root inside a private mount namespace with /etc, /opt and /var overlaid
(tests/ansible_converge.py), so the host is untouched. systemd is not PID 1 here: the roles run
with `agencyllm_service_manager: none`, and the test starts each generated unit's ExecStart as the
unit's user with its environment file, in its own cgroup, as systemd would.

The head is also the staff chat's host (group agencyllm_chat): the bundle carries a chat
wheelhouse holding a stand-in open-webui (a small wheel whose `open-webui serve` answers /health
and records how it was started), so the role installs it offline into its own venv, makes its
database on the bundled server and writes its environment file and unit for real, without the
3.4 GB of the real package (the role's rendered files: tests/test_ansible_chat.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ansible_render import ANSIBLE, BASE_PYTHON, REPO, tool
from conftest import RUNNER_SITE

from agencyllm.serving.ops import chat_env
from agencyllm.serving.ops.bundle import build as bundle_build

ROLES = sorted(p.name for p in (ANSIBLE / "roles").iterdir() if p.is_dir())


def test_ansible_lint_production_profile_is_clean():
    lint = tool("ansible-lint")
    if lint is None:
        pytest.skip("ansible-lint not installed")
    done = subprocess.run(
        [lint, "--profile", "production", "--offline", "--nocolor"],
        cwd=ANSIBLE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in done.stderr + done.stdout


@pytest.mark.parametrize("role", ROLES)
def test_every_role_documents_its_variables(role):
    """Each default has an argument spec with a description, and each spec option exists."""
    root = ANSIBLE / "roles" / role
    defaults = yaml.safe_load((root / "defaults" / "main.yml").read_text()) or {}
    spec = yaml.safe_load((root / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert set(defaults) <= set(spec), f"{role}: defaults without argument spec: {sorted(set(defaults) - set(spec))}"
    for name, option in spec.items():
        assert name.startswith(role.removesuffix("_") + "_") or role == "agencyllm", name
        assert option.get("description"), f"{role}: {name} has no description"
        if "default" in option and "{{" not in str(defaults.get(name)):
            assert defaults.get(name) == option["default"], f"{role}: {name} default differs from its spec"
    comments = (root / "defaults" / "main.yml").read_text().count("\n#")
    assert comments >= 1, f"{role}: defaults/main.yml explains nothing"


def test_units_never_stop_ray_by_name():
    unit = (ANSIBLE / "roles" / "agencyllm_ray" / "templates" / "agencyllm-ray.service.j2").read_text()
    assert "KillMode=control-group" in unit and "--block" in unit
    assert "ExecStop" not in unit.replace("No ExecStop=ray stop", "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_converge() -> str | None:
    if os.geteuid() != 0:
        return "needs root (inside a private mount namespace)"
    for command in ("unshare", "runuser", "systemd-analyze"):
        if shutil.which(command) is None:
            return f"needs {command}"
    if tool("ansible-playbook") is None:
        return "needs ansible-core"
    if not Path("/sys/fs/cgroup/systemd").is_dir():
        return "needs the name=systemd cgroup hierarchy to track the units' processes"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    return None if probe.returncode == 0 else "cannot create a mount namespace"


def _ca_pem() -> str:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Agency Test Root CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def converged() -> Iterator[dict]:
    reason = _can_converge()
    if reason:
        pytest.skip(reason)
    # Our own folder: pytest prunes old numbered basetemps, other sessions' included.
    work = Path(tempfile.mkdtemp(prefix="agencyllm-converge-"))
    try:
        yield _converge(work)
    finally:
        if not os.environ.get("AGENCYLLM_KEEP_CONVERGE"):  # set it to look at logs and findings.json
            shutil.rmtree(work, ignore_errors=True)


# Stand-in for Open WebUI in the converge: `open-webui serve --host H --port P` answers /health and
# records how it was started (arguments, folder, user, umask, environment names) in DATA_DIR.
STANDIN_OPEN_WEBUI = """\
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    args = sys.argv[1:]
    if not args or args[0] != "serve":
        sys.exit("usage: open-webui serve --host HOST --port PORT")
    host = args[args.index("--host") + 1] if "--host" in args else "0.0.0.0"
    port = int(args[args.index("--port") + 1]) if "--port" in args else 8080
    umask = os.umask(0)
    os.umask(umask)
    record = {"argv": args, "cwd": os.getcwd(), "uid": os.getuid(), "umask": umask, "environment": sorted(os.environ)}
    with open(os.path.join(os.environ["DATA_DIR"], "standin-started.json"), "w") as out:
        json.dump(record, out)

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": self.path == "/health"}).encode()
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer((host, port), Health).serve_forever()
"""


def standin_open_webui(index: Path) -> Path:
    """A wheel named open-webui at the pinned release (extra `postgres` included) whose console
    script `open-webui` is the stand-in above: standard library only."""
    project = index / "standin-src"
    (project / "open_webui").mkdir(parents=True)
    (project / "open_webui" / "__init__.py").write_text(STANDIN_OPEN_WEBUI)
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "open-webui"\nversion = "{chat_env.OPEN_WEBUI_VERSION}"\n'
        '[project.optional-dependencies]\npostgres = []\n[project.scripts]\nopen-webui = "open_webui:main"\n'
        '[tool.setuptools]\npackages = ["open_webui"]\n'
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(index),
            str(project),
        ],
        check=True,
    )
    shutil.rmtree(project)
    return next(index.glob("open_webui-*.whl"))


def _converge(work: Path) -> dict:
    from agencyllm.serving.ops.placeholder import write_placeholder_model

    model = write_placeholder_model(work / "placeholder")
    bundle = work / "bundle"
    chat_index = work / "chat-index"
    chat_index.mkdir()
    standin_open_webui(chat_index)
    # A wheelhouse of agencyllm's own wheel: the venv sees this Python's packages (the full
    # wheelhouse install is the `wheelhouse` test in test_bundle.py). The chat wheelhouse holds
    # the stand-in open-webui, downloaded from its folder only.
    bundle_build.build(
        bundle_build.BuildOptions(
            out=bundle,
            source=bundle_build.find_source(),
            flavors=["cpu"],
            wheel_only=True,
            models={"placeholder": model},
            chat=True,
            pip_args=["--no-index", "--find-links", str(chat_index)],
        ),
        progress=lambda _line: None,
    )
    ports = {
        name: _free_port()
        for name in (
            "api",
            "proxy",
            "postgres",
            "gcs",
            "dashboard",
            "client",
            "node_manager",
            "object_manager",
            "agent",
            "agent_grpc",
            "metrics",
            "runtime_env",
            "chat",
        )
    }
    first_worker = 20000 + (os.getpid() % 400) * 20
    inventory = work / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    (inventory / "hosts.yml").write_text(
        yaml.safe_dump(
            {
                "agencyllm_head": {
                    "hosts": {
                        "localhost": {
                            "ansible_host": "127.0.0.1",
                            "ansible_connection": "local",
                            "ansible_python_interpreter": BASE_PYTHON,
                        }
                    }
                },
                "agencyllm_workers": {"hosts": {}},
                "agencyllm_chat": {"hosts": {"localhost": None}},
            }
        )
    )
    ca_file = "/etc/pki/agency/agency-ca.pem"
    (inventory / "group_vars" / "all.yml").write_text(
        yaml.safe_dump(
            {
                "agencyllm_bundle_dir": str(bundle),
                "agencyllm_flavor": "cpu",
                "agencyllm_service_manager": "none",
                "agencyllm_python_interpreter": BASE_PYTHON,
                "agencyllm_python_system_site_packages": True,
                "agencyllm_python_bin_link_dir": "",
                "agencyllm_ca_file": ca_file,
                "agencyllm_preflight_require_ca": True,
                "agencyllm_preflight_margin_bytes": 100_000_000,
                "agencyllm_api_host": "127.0.0.1",
                "agencyllm_api_port": ports["api"],
                "agencyllm_api_proxy_port": ports["proxy"],
                "agencyllm_postgres_port": ports["postgres"],
                "agencyllm_ray_gcs_port": ports["gcs"],
                "agencyllm_ray_dashboard_port": ports["dashboard"],
                "agencyllm_ray_client_port": ports["client"],
                "agencyllm_ray_node_manager_port": ports["node_manager"],
                "agencyllm_ray_object_manager_port": ports["object_manager"],
                "agencyllm_ray_dashboard_agent_port": ports["agent"],
                "agencyllm_ray_dashboard_agent_grpc_port": ports["agent_grpc"],
                "agencyllm_ray_metrics_port": ports["metrics"],
                "agencyllm_ray_runtime_env_agent_port": ports["runtime_env"],
                "agencyllm_ray_min_worker_port": first_worker,
                "agencyllm_ray_max_worker_port": first_worker + 19,
                "agencyllm_ray_num_cpus": "8",
                "agencyllm_ray_firewall": False,
                "agencyllm_models": [{"id": "placeholder"}],
                "agencyllm_app_ready_timeout": 600,
                # The staff chat on the head (its database on the bundled server), the platform
                # with the realm's directory client.
                "agencyllm_chat_public_url": "https://chat.agency.test",
                "agencyllm_chat_frontend_key": "sk-agency-frontend-converge",
                "agencyllm_chat_client_secret": "converge-client-secret",
                "agencyllm_chat_oidc_issuer": "https://sso.agency.test/realms/agency",
                "agencyllm_chat_port": ports["chat"],
                "agencyllm_ray_oidc_directory_client_secret": "converge-directory-secret",
            }
        )
    )
    config = {
        "work": str(work),
        "scratch": str(work / "scratch"),
        "inventory": str(inventory / "hosts.yml"),
        "ansible_dir": str(bundle / "ansible"),
        "ansible_playbook": tool("ansible-playbook"),
        "ports": ports,
        "ca_file": ca_file,
        "ca_pem": _ca_pem(),
        "runner_site": RUNNER_SITE,
        "bad_variables": ["-e", "agencyllm_service_manager=upstart", "-e", "agencyllm_flavor=tpu"],
        "preflight_failure": [
            "-e",
            "agencyllm_gpus_per_host=2",
            "-e",
            "agencyllm_ca_file=/etc/pki/agency/missing.pem",
            "-e",
            f"agencyllm_python_interpreter={work}/no-python",
        ],
    }
    (work / "scratch").mkdir()
    (work / "config.json").write_text(json.dumps(config))
    done = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            sys.executable,
            str(REPO / "tests" / "ansible_converge.py"),
            str(work / "config.json"),
        ],
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    findings = json.loads(done.stdout.strip().splitlines()[-1])
    findings["_work"] = str(work)
    return findings


def _show(run: dict) -> str:
    return json.dumps({k: v for k, v in run.items() if k != "tail"}) + "\n" + run["tail"]


def test_argument_specs_refuse_bad_variables(converged):
    run = converged["bad_variables"]
    assert run["rc"] != 0, _show(run)
    assert "agencyllm_service_manager" in run["tail"] and "upstart" in run["tail"]
    assert "agencyllm_flavor" in run["tail"] and "tpu" in run["tail"]
    assert "choices" in run["tail"] or "Choices" in run["tail"]


def test_preflight_stops_before_any_change_and_names_the_fix(converged):
    run = converged["preflight_failure"]
    assert run["rc"] != 0, _show(run)
    assert "Preflight found" in run["tail"]
    assert "install the NVIDIA driver" in run["tail"]
    assert "copy the agency CA bundle (PEM) there" in run["tail"]
    assert "install Python 3.11+ with venv" in run["tail"]
    assert converged["opt_untouched_after_failures"], "a failed preflight changed the host"


def test_converge_installs_and_units_verify(converged):
    assert "error" not in converged, converged.get("error")
    first = converged["first"]
    assert first["rc"] == 0 and first["failed"] == 0, _show(first)
    units = converged["units"]
    assert set(units) == {"agencyllm-postgres.service", "agencyllm-ray.service", "agencyllm-chat.service"}
    for name, unit in units.items():
        assert unit["verify_stderr"] == "", f"systemd-analyze verify {name}: {unit['verify_stderr']}"
    ray = units["agencyllm-ray.service"]["unit"]
    assert ray["User"] == "agencyllm" and ray["KillMode"] == "control-group" and "ExecStop" not in ray
    assert (
        " --head " in ray["ExecStart"]
        and "--block" in ray["ExecStart"]
        and "--dashboard-host=127.0.0.1" in ray["ExecStart"]
    )
    assert units["agencyllm-postgres.service"]["unit"]["User"] == "agencyllm-postgres"


def test_services_run_as_their_users_and_the_app_deploys(converged):
    assert "error" not in converged, json.dumps(converged)[-6000:]
    import pwd

    # The users exist only inside the namespace: compare by uid ownership, not by name.
    users = converged["service_users"]
    assert users["postgres"] and 0 not in users["postgres"] and 0 not in users["ray"], users
    second = converged["second"]
    assert second["rc"] == 0, _show(second)
    assert "agencyllm_app : Deploy the application (serve deploy)" in second["changed_tasks"], _show(second)
    assert converged["readyz"] == 200
    assert converged["models_unauthenticated"] == 401
    # Direct ingress (the default): the ingress replica serves the API port itself, and Ray
    # Serve's proxy answers the same routes on the proxy port.
    assert "ServeReplica:agencyllm:AgencyIngress" in converged["api_port_served_by"], converged["api_port_served_by"]
    assert converged["readyz_via_proxy"] == 200
    del pwd


def test_second_converge_changes_nothing(converged):
    third = converged["third"]
    assert third["rc"] == 0, _show(third)
    assert third["changed"] == 0, f"changed tasks: {third['changed_tasks']}\n{_show(third)}"


def test_sigterm_stops_every_process(converged):
    stop = converged["stop"]
    assert converged["ray_processes"] > 3
    for name, result in stop.items():
        assert result["left"] == 0, f"{name}: {result['left']} processes left after SIGTERM ({result})"


def test_the_chat_installs_offline_and_runs_as_its_user_on_loopback(converged):
    """The staff chat on the head: its venv holds the wheelhouse's open-webui (installed offline
    from the lock), its files have their modes, its unit verifies and its ExecStart, run as the
    unit's user with its environment file, serves /health on loopback from its data folder; its
    database on the bundled server takes its role's password, and only its role's."""
    assert "error" not in converged, json.dumps(converged)[-6000:]
    chat = converged["chat"]
    unit = converged["units"]["agencyllm-chat.service"]["unit"]
    port = converged["ports"]["chat"]
    assert unit["User"] == unit["Group"] == "agencyllm-chat"
    assert unit["ExecStart"] == f"/opt/agencyllm-chat/venv/bin/open-webui serve --host 127.0.0.1 --port {port}"
    assert unit["WorkingDirectory"] == "/var/lib/agencyllm-chat"
    assert chat["installed"] == f"open-webui {chat_env.OPEN_WEBUI_VERSION}", chat
    assert chat["files"]["/etc/agencyllm-chat/open-webui.env"] == {"mode": "0600", "uid": 0, "gid": 0}
    assert chat["files"]["/etc/agencyllm-chat"]["mode"] == "0700"
    data = chat["files"]["/var/lib/agencyllm-chat"]
    assert data["mode"] == "0700" and data["uid"] == chat["uid"] != 0
    assert chat["files"]["/opt/agencyllm-chat/venv"]["uid"] == 0
    assert chat["health"] == 200
    started = chat["started"]
    assert started["argv"] == ["serve", "--host", "127.0.0.1", "--port", str(port)]
    assert started["cwd"] == "/var/lib/agencyllm-chat" and started["uid"] == chat["uid"]
    expected = set(chat_env.FIXED_ENVIRONMENT) | {"DATABASE_URL", "OPENAI_API_KEY", "WEBUI_SECRET_KEY", "DATA_DIR"}
    assert expected <= set(started["environment"])
    assert not any(name.startswith("AGENCYLLM_") for name in started["environment"])
    # The second run made its database; its role owns it, reaches it from loopback by password.
    assert "agencyllm_postgres : Create Open WebUI's role and database" in converged["second"]["changed_tasks"]
    assert chat["database"] == {"user": "openwebui", "database": "openwebui", "created_table": True}, chat
    # The platform's role cannot reach Open WebUI's database (pg_hba.conf names its role only).
    assert chat["platform_role_refused"], chat
    # The platform's environment file carries the realm's directory client.
    assert converged["platform_env"]["AGENCYLLM_OIDC_DIRECTORY_CLIENT_ID"] == "agencyllm-directory"
    assert converged["platform_env"]["AGENCYLLM_OIDC_DIRECTORY_CLIENT_SECRET"] is True
