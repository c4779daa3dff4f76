"""Converge the Ansible roles for real against this machine, without changing it.

Run as root inside a private mount namespace (`unshare -m --propagation private`, see
tests/test_ansible.py): /etc, /opt and /var are overlaid on a tmpfs, so users, units, the venv
and the database vanish with the namespace. Then, like systemd would, each generated unit's
ExecStart runs as the unit's user with its environment file, in its own cgroup; the playbook runs
again to migrate and deploy, once more to show nothing changes, and SIGTERM stops everything.
With a chat host (group agencyllm_chat, the head), its unit's ExecStart starts after the second
run, once its database exists; its files, installed package and database are probed.

    python tests/ansible_converge.py CONFIG.json   ->  one JSON line of findings on stdout
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/systemd")


def overlay(scratch: Path, runner_site: list[str]) -> None:
    """Writable copies of /etc, /opt and /var in this mount namespace only. With `runner_site`
    (the --wheel-only bundle relies on the test runner's packages: ray, vllm), the base Python's
    site-packages, which a venv made with --system-site-packages sees, gets a .pth putting them first.
    A folder above the base Python that others may not enter (e.g. /root, mode 700) is opened to
    them here, so the service users can run the venv's interpreter."""
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(scratch)], check=True)
    base_site = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"]
    closed = [
        str(d) for d in reversed(Path(sys.base_prefix).parents) if d != Path("/") and not d.stat().st_mode & 0o001
    ]
    tops = ["/etc", "/opt", "/var", *closed] + ([base_site] if runner_site else [])
    for i, top in enumerate(tops):
        upper, work = scratch / str(i) / "upper", scratch / str(i) / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={top},upperdir={upper},workdir={work}", top],
            check=True,
        )
    for folder in closed:
        os.chmod(folder, os.stat(folder).st_mode | 0o011)
    if runner_site:
        # Ahead of the base site-packages, not after it: an older copy there (typing_extensions)
        # would otherwise shadow the runner's.
        (Path(base_site) / "zz-test-runner.pth").write_text(
            f"import sys; i = sys.path.index({base_site!r}) if {base_site!r} in sys.path else len(sys.path); "
            f"sys.path[i:i] = [p for p in {runner_site!r} if p not in sys.path]\n"
        )


def playbook(config: dict, *extra: str) -> dict:
    started = time.monotonic()
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(Path(config["ansible_dir"]) / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_LOCAL_TEMP": str(Path(config["work"]) / "ansible-local"),
        "ANSIBLE_REMOTE_TEMP": str(Path(config["work"]) / "ansible-remote"),
    }
    done = subprocess.run(
        [
            config["ansible_playbook"],
            "-i",
            config["inventory"],
            "-c",
            "local",
            str(Path(config["ansible_dir"]) / "site.yml"),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )
    recap = re.findall(r"^\S+\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", done.stdout, re.M)
    return {
        "rc": done.returncode,
        "seconds": round(time.monotonic() - started, 1),
        "changed": int(recap[-1][1]) if recap else None,
        "failed": int(recap[-1][3]) if recap else None,
        "changed_tasks": _changed_tasks(done.stdout),
        "tail": (done.stdout + done.stderr)[-6000:],
    }


def _changed_tasks(output: str) -> list[str]:
    task, found = None, []
    for line in output.splitlines():
        if line.startswith("TASK ["):
            task = line[6 : line.rfind("]")]
        elif line.startswith("changed:") and task:
            found.append(task)
    return found


def parse_unit(path: Path) -> dict:
    unit = {"env_files": []}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#"):
            continue
        if key == "EnvironmentFile":
            unit["env_files"].append(value)
        elif key in ("User", "Group", "ExecStart", "WorkingDirectory", "KillMode", "ExecStop", "KillSignal"):
            unit[key] = value
    return unit


def read_env_file(path: str) -> dict[str, str]:
    env = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip("'\"")
    return env


class Service:
    """One unit's ExecStart as its user, with its environment file, in its own cgroup."""

    def __init__(self, name: str, unit: dict, log: Path) -> None:
        import grp
        import pwd

        self.name = name
        self.cgroup = CGROUP_ROOT / f"agencyllm-test-{os.getpid()}-{name}"
        self.cgroup.mkdir()
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        for env_file in unit["env_files"]:
            env.update(read_env_file(env_file))
        user = pwd.getpwnam(unit["User"])
        group = grp.getgrnam(unit.get("Group", unit["User"]))
        cgroup_procs = str(self.cgroup / "cgroup.procs")

        def enter_cgroup_then_drop_root() -> None:
            with open(cgroup_procs, "w") as procs:
                procs.write(str(os.getpid()))
            os.setgroups([])
            os.setgid(group.gr_gid)
            os.setuid(user.pw_uid)

        self.log = open(log, "wb")
        try:
            self.process = self._spawn(unit, env, enter_cgroup_then_drop_root)
        except Exception:
            self.cgroup.rmdir()
            raise

    def _spawn(self, unit: dict, env: dict, preexec) -> subprocess.Popen:
        return subprocess.Popen(
            shlex.split(unit["ExecStart"]),
            env=env,
            cwd=unit.get("WorkingDirectory") or "/",
            preexec_fn=preexec,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def pids(self) -> list[int]:
        return [int(p) for p in (self.cgroup / "cgroup.procs").read_text().split()]

    def users(self) -> set[int]:
        owners = set()
        for pid in self.pids():
            try:
                owners.add(os.stat(f"/proc/{pid}").st_uid)
            except FileNotFoundError:
                pass
        return owners

    def terminate(self, timeout: float = 90) -> dict:
        """SIGTERM to the main process, as systemd's stop does first; then wait for the cgroup to empty."""
        before = len(self.pids())
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        while self.pids() and time.monotonic() - started < timeout:
            time.sleep(0.5)
        left = self.pids()
        return {"processes": before, "left": len(left), "seconds": round(time.monotonic() - started, 1)}

    def kill(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            self.cgroup.rmdir()
        except OSError:
            pass


def wait_port(host: str, port: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            socket.create_connection((host, port), 1).close()
            return round(time.monotonic() - started, 1)
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def listener(port: int) -> str:
    """The command line of the process listening on `port` (Ray names its actors' processes)."""
    import psutil

    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return " ".join(psutil.Process(connection.pid).cmdline())
    return ""


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def file_facts(*paths: str) -> dict[str, dict]:
    facts = {}
    for path in paths:
        info = os.stat(path)
        facts[path] = {"mode": f"{info.st_mode & 0o7777:04o}", "uid": info.st_uid, "gid": info.st_gid}
    return facts


def chat_facts() -> dict:
    """What the chat role installed: files and their modes, the package in its own venv."""
    import pwd

    installed = subprocess.run(
        [
            "/opt/agencyllm-chat/venv/bin/python",
            "-I",
            "-c",
            "import importlib.metadata as m; print('open-webui', m.version('open-webui'))",
        ],
        capture_output=True,
        text=True,
    )
    return {
        "uid": pwd.getpwnam("agencyllm-chat").pw_uid,
        "installed": installed.stdout.strip() or installed.stderr.strip()[-500:],
        "files": file_facts(
            "/etc/agencyllm-chat",
            "/etc/agencyllm-chat/open-webui.env",
            "/var/lib/agencyllm-chat",
            "/opt/agencyllm-chat/venv",
        ),
    }


def chat_database(chat_url: str, platform_url: str) -> dict:
    """Open WebUI's database as its URL reaches it (its role owns it: a table can be made), and
    the platform's role refused there."""
    import asyncio
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    async def probe() -> dict:
        connection = await asyncpg.connect(chat_url, timeout=10)
        try:
            user, database = await connection.fetchrow("SELECT current_user, current_database()")
            await connection.execute("CREATE TABLE converge_probe (id int); DROP TABLE converge_probe")
        finally:
            await connection.close()
        platform = urlsplit(platform_url)
        try:
            other = await asyncpg.connect(urlunsplit(platform._replace(path="/" + database)), timeout=10)
        except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError) as exc:
            refused = type(exc).__name__
        else:
            await other.close()
            refused = ""
        return {"user": user, "database": database, "created_table": True, "refused": refused}

    found = asyncio.run(probe())
    return {
        "database": {k: found[k] for k in ("user", "database", "created_table")},
        "platform_role_refused": found["refused"],
    }


def main() -> int:
    config = json.loads(Path(sys.argv[1]).read_text())
    findings: dict = {}
    services: list[Service] = []
    work = Path(config["work"])
    findings["ports"] = config["ports"]
    try:
        overlay(Path(config["scratch"]), config["runner_site"])
        Path(config["ca_file"]).parent.mkdir(parents=True, exist_ok=True)
        Path(config["ca_file"]).write_text(config["ca_pem"])

        findings["bad_variables"] = playbook(config, *config["bad_variables"])
        findings["preflight_failure"] = playbook(config, *config["preflight_failure"])
        findings["opt_untouched_after_failures"] = not Path("/opt/agencyllm").exists()
        findings["first"] = playbook(config)
        if findings["first"]["rc"] != 0:
            return 0

        units = sorted(Path("/etc/systemd/system").glob("agencyllm-*.service"))
        findings["units"] = {}
        for unit_path in units:
            verify = subprocess.run(["systemd-analyze", "verify", str(unit_path)], capture_output=True, text=True)
            findings["units"][unit_path.name] = {
                "verify_rc": verify.returncode,
                "verify_stderr": verify.stderr.strip(),
                "unit": parse_unit(unit_path),
            }

        platform_env = read_env_file("/etc/agencyllm/agencyllm.env")
        findings["platform_env"] = {
            "AGENCYLLM_OIDC_DIRECTORY_CLIENT_ID": platform_env.get("AGENCYLLM_OIDC_DIRECTORY_CLIENT_ID"),
            "AGENCYLLM_OIDC_DIRECTORY_CLIENT_SECRET": bool(platform_env.get("AGENCYLLM_OIDC_DIRECTORY_CLIENT_SECRET")),
        }
        chat_unit = findings["units"].get("agencyllm-chat.service", {}).get("unit")
        if chat_unit:
            findings["chat"] = chat_facts()

        postgres = findings["units"]["agencyllm-postgres.service"]["unit"]
        ray = findings["units"]["agencyllm-ray.service"]["unit"]
        services.append(Service("postgres", postgres, work / "postgres.log"))
        findings["postgres_up_seconds"] = wait_port("127.0.0.1", config["ports"]["postgres"], 60)
        services.append(Service("ray", ray, work / "ray.log"))
        findings["ray_up_seconds"] = wait_port("127.0.0.1", config["ports"]["dashboard"], 120)
        findings["service_users"] = {s.name: sorted(s.users()) for s in services}

        findings["second"] = playbook(config)
        if chat_unit:
            services.append(Service("chat", chat_unit, work / "chat.log"))
            findings["chat"]["up_seconds"] = wait_port("127.0.0.1", config["ports"]["chat"], 60)
            findings["chat"]["health"] = http_status(f"http://127.0.0.1:{config['ports']['chat']}/health")
            findings["chat"]["started"] = json.loads(Path("/var/lib/agencyllm-chat/standin-started.json").read_text())
            chat_environment = read_env_file(chat_unit["env_files"][0])
            findings["chat"] |= chat_database(chat_environment["DATABASE_URL"], platform_env["AGENCYLLM_DATABASE_URL"])
        findings["third"] = playbook(config)
        findings["readyz"] = http_status(f"http://127.0.0.1:{config['ports']['api']}/readyz")
        findings["models_unauthenticated"] = http_status(f"http://127.0.0.1:{config['ports']['api']}/v1/models")
        findings["readyz_via_proxy"] = http_status(f"http://127.0.0.1:{config['ports']['proxy']}/readyz")
        findings["api_port_served_by"] = listener(config["ports"]["api"])
        findings["ray_processes"] = len(services[1].pids())  # postgres, ray, then the chat
        findings["stop"] = {}
        for service in reversed(services):
            findings["stop"][service.name] = service.terminate()
    except Exception as exc:  # report, the test decides
        findings["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for service in services:
            service.kill()
        for name in ("postgres.log", "ray.log", "chat.log"):
            if (work / name).exists():
                findings[f"{name}_tail"] = (work / name).read_text(errors="replace")[-3000:]
        print(json.dumps(findings))
        (work / "findings.json").write_text(json.dumps(findings, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
