"""Ansible: who serves the API port on a bare-host install. Rendered with Ansible itself
(ansible-playbook -c local, nothing installed): the environment file every node starts Ray with
holds exactly the direct-ingress variables the platform's own code uses, and the Serve config puts
Ray Serve's proxy on the proxy port; with several ingress replicas, or direct ingress off, the proxy
serves the API port. The running proof is the converge (tests/test_ansible.py) and the multi-host
test (tests/test_cluster_multinode.py), where the ingress replica's process holds the API port."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from ansible_render import ROLES, local_host, playbook, role_defaults

from agencyllm.serving.rayserve.ray_env import direct_ingress_env


def render(tmp_path: Path, **overrides) -> tuple[dict[str, str], dict]:
    """The head's environment file (as a dict) and Serve config for these variables."""
    out = tmp_path / "out"
    inventory = {
        "agencyllm_head": {"hosts": {"llm-head": local_host("10.20.0.10")}},
        "agencyllm_workers": {"hosts": {}},
    }
    group_vars = {
        **role_defaults("agencyllm", "agencyllm_ray", "agencyllm_app"),
        "agencyllm_credentials_dir": str(tmp_path / "credentials"),
        "agencyllm_postgres_password": "unused",
        "agencyllm_config_dir": str(out),
        **overrides,
    }
    tasks = [
        {"name": "Folder", "ansible.builtin.file": {"path": str(out), "state": "directory", "mode": "0700"}},
        {"name": "Environment file", "ansible.builtin.template": {
            "src": str(ROLES / "agencyllm_ray" / "templates" / "agencyllm.env.j2"), "dest": f"{out}/agencyllm.env",
            "mode": "0600"}},
        {"name": "Serve config", "ansible.builtin.template": {
            "src": str(ROLES / "agencyllm_app" / "templates" / "serve-config.yaml.j2"),
            "dest": f"{out}/serve-config.yaml", "mode": "0600"}},
    ]  # fmt: skip
    done = playbook(tmp_path / "render", inventory, group_vars, tasks)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    env = dict(re.findall(r"^(\w+)='(.*)'$", (out / "agencyllm.env").read_text(), re.M))
    return env, yaml.safe_load((out / "serve-config.yaml").read_text())


def test_by_default_the_ingress_replica_serves_the_api_port_and_the_proxy_the_next(tmp_path):
    env, serve = render(tmp_path, agencyllm_api_port=8400)
    ray_serve = {k: v for k, v in env.items() if k.startswith("RAY_SERVE_")}
    assert ray_serve == direct_ingress_env(8400)
    assert env["AGENCYLLM_PROXY_PORT"] == "8401"
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8401}
    assert serve["proxy_location"] == "HeadOnly"


def test_the_proxy_port_can_be_chosen(tmp_path):
    env, serve = render(tmp_path, agencyllm_api_proxy_port=9100)
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8000" and env["AGENCYLLM_PROXY_PORT"] == "9100"
    assert serve["http_options"]["port"] == 9100


@pytest.mark.parametrize(
    "overrides",
    [
        {"agencyllm_direct_ingress": False},
        # Several ingress replicas cannot share one port: the proxy balances them.
        {"agencyllm_settings": {"ingress_replicas": 2}},
    ],
)
def test_otherwise_the_proxy_serves_the_api_port(tmp_path, overrides):
    env, serve = render(tmp_path, agencyllm_api_port=8400, **overrides)
    assert {k: v for k, v in env.items() if k.startswith("RAY_SERVE_")} == {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    assert "AGENCYLLM_PROXY_PORT" not in env
    assert serve["http_options"]["port"] == 8400
