"""Who serves the local run's port (serving/ray_env.py): the one ingress replica itself (direct
ingress, the default; `agencyllm up` in tests/test_fault_up.py runs with it) or Ray Serve's proxy
(several ingress replicas, as the shared test stack runs)."""

from __future__ import annotations

import socket

import pytest

from agencyllm.serving.ray_env import serve_http
from agencyllm.serving.settings import Settings


def test_one_ingress_replica_serves_the_users_port_itself():
    http = serve_http(Settings(host="127.0.0.1", port=18123, ingress_replicas=1, direct_ingress=True, database_url=None))
    assert http.direct
    assert http.env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Ray allocates replica ports from [MIN, MAX): the user's port and nothing else.
    assert (http.env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], http.env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("18123", "18124")
    # Nothing to deregister from: stop without Ray's 30 s drain, restart on the port at once.
    assert http.env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"
    assert http.env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"
    # The proxy moves to a free port of the same host.
    assert http.http_options["host"] == "127.0.0.1" and http.http_options["port"] != 18123
    with socket.socket() as s:
        s.bind(("127.0.0.1", http.http_options["port"]))


@pytest.mark.parametrize("settings", [
    {"ingress_replicas": 2, "direct_ingress": True},  # several replicas cannot share one port: the proxy balances them
    {"direct_ingress": False},
])
def test_otherwise_the_proxy_serves_it(settings):
    http = serve_http(Settings(host="0.0.0.0", port=18123, database_url=None, **settings))
    assert not http.direct
    assert http.env == {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}  # also undoes an earlier stack's choice
    assert http.http_options == {"host": "0.0.0.0", "port": 18123}


def test_the_setting_comes_from_the_environment(monkeypatch):
    assert Settings(database_url=None).direct_ingress is True  # the default
    monkeypatch.setenv("AGENCYLLM_DIRECT_INGRESS", "false")
    assert Settings(database_url=None).direct_ingress is False
