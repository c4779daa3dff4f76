"""Ansible for bare hosts: lint, argument specs, and a real converge against this machine.

The converge runs as root inside a private mount namespace with /etc, /opt and /var overlaid
(tests/ansible_converge.py), so the host is untouched. systemd is not PID 1 here: the roles run
with `agencyllm_service_manager: none`, and the test starts each generated unit's ExecStart as the
unit's user with its environment file, in its own cgroup, as systemd would.
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

from agencyllm.serving.cli.main import main as cli_main

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


def _converge(work: Path) -> dict:
    from agencyllm.serving.ops.placeholder import write_placeholder_model

    model = write_placeholder_model(work / "placeholder")
    bundle = work / "bundle"
    # A wheelhouse of agencyllm's own wheel: the venv sees this Python's packages (the full
    # wheelhouse install is the `wheelhouse` test in test_bundle.py).
    assert cli_main(["bundle", "build", str(bundle), "--cpu", "--wheel-only", "--model", f"placeholder={model}"]) == 0
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
    assert set(units) == {"agencyllm-postgres.service", "agencyllm-ray.service"}
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
