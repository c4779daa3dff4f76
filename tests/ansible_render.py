"""Ansible itself, with nothing installed: run a few tasks against an inventory of hosts that are
all this machine (`-c local`), to render the roles' templates and variables for that inventory.
Used by the tests that check what the roles write, and by the multi-host test to start each host
with the command its unit would run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = REPO / "infra" / "ansible"
ROLES = ANSIBLE / "roles"
BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")


def tool(name: str) -> str | None:
    """The tool beside this interpreter (its venv), on PATH, or beside the base interpreter."""
    for folder in (Path(sys.executable).parent, Path(sys.base_prefix) / "bin"):
        if (folder / name).exists():
            return str(folder / name)
    return shutil.which(name)


def playbook(work: Path, inventory: dict, group_vars: dict, tasks: list) -> subprocess.CompletedProcess:
    """`tasks` as one play on every host of `inventory`, with `group_vars` for all."""
    command = tool("ansible-playbook")
    if command is None:
        pytest.skip("ansible-core not installed")
    (work / "group_vars").mkdir(parents=True, exist_ok=True)
    (work / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (work / "group_vars" / "all.yml").write_text(yaml.safe_dump(group_vars))
    (work / "play.yml").write_text(
        yaml.safe_dump([{"name": "Render", "hosts": "all", "gather_facts": False, "tasks": tasks}], sort_keys=False)
    )
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(work / "tmp"),
        "ANSIBLE_REMOTE_TEMP": str(work / "tmp"),
    }
    return subprocess.run(
        [command, "-i", str(work / "hosts.yml"), "-c", "local", str(work / "play.yml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def role_defaults(*roles: str) -> dict:
    """The roles' defaults, merged in order (what group_vars would start from)."""
    merged: dict = {}
    for role in roles:
        merged.update(yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {})
    return merged


def local_host(address: str, **extra) -> dict:
    """An inventory host that is this machine, known by `address`."""
    return {"ansible_host": address, "ansible_connection": "local", "ansible_python_interpreter": BASE_PYTHON, **extra}
