"""Who serves the local run's port (serving/rayserve/ray_env.py): the one ingress replica itself (direct
ingress, the default; `agencyllm up` in tests/test_fault_up.py runs with it) or Ray Serve's proxy
(several ingress replicas, as the shared test stack runs)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from conftest import free_port

from agencyllm.serving.config import ConfigError
from agencyllm.serving.rayserve.ray_env import (
    PortBusy,
    ServeHttp,
    cluster_serve_http,
    direct_ingress_env,
    serve_http,
    wait_for_direct_port,
)
from agencyllm.serving.settings import Settings


def test_one_ingress_replica_serves_the_users_port_itself():
    http = serve_http(
        Settings(host="127.0.0.1", port=18123, ingress_replicas=1, direct_ingress=True, database_url=None)
    )
    assert http.direct
    assert http.env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Ray allocates replica ports from [MIN, MAX): the user's port and nothing else.
    assert (http.env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], http.env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == (
        "18123",
        "18124",
    )
    # Nothing to deregister from: stop without Ray's 30 s drain, restart on the port at once.
    assert http.env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"
    assert http.env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"
    # The proxy moves to a free port of the same host.
    assert http.http_options["host"] == "127.0.0.1" and http.http_options["port"] != 18123
    with socket.socket() as s:
        s.bind(("127.0.0.1", http.http_options["port"]))


@pytest.mark.parametrize(
    "settings",
    [
        {
            "ingress_replicas": 2,
            "direct_ingress": True,
        },  # several replicas cannot share one port: the proxy balances them
        {"direct_ingress": False},
    ],
)
def test_otherwise_the_proxy_serves_it(settings):
    http = serve_http(Settings(host="0.0.0.0", port=18123, database_url=None, **settings))
    assert not http.direct
    assert http.env == {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}  # also undoes an earlier stack's choice
    assert http.http_options == {"host": "0.0.0.0", "port": 18123}


def test_the_setting_comes_from_the_environment(monkeypatch):
    assert Settings(database_url=None).direct_ingress is True  # the default
    monkeypatch.setenv("AGENCYLLM_DIRECT_INGRESS", "false")
    assert Settings(database_url=None).direct_ingress is False


def _direct_env(monkeypatch, port: int) -> None:
    for key, value in serve_http(Settings(host="127.0.0.1", port=port, database_url=None)).env.items():
        monkeypatch.setenv(key, value)


def _closed_by_the_server_first(port: int) -> None:
    """What a replica that died mid-stream leaves behind: its side of a connection in TIME_WAIT."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server closes first: its end goes to TIME_WAIT once the client closes
        client.recv(1)
        client.close()
    time.sleep(0.1)


def test_a_port_left_in_time_wait_cannot_be_bound_the_way_ray_binds_it():
    """Why replicas wait (serving/rayserve/ray_env.py): Ray's bind, without SO_REUSEADDR, fails on it."""
    port = free_port()
    _closed_by_the_server_first(port)
    with socket.socket() as ray_like, pytest.raises(OSError):
        ray_like.bind(("127.0.0.1", port))


def test_a_replica_waits_while_the_port_is_held_then_goes_on(monkeypatch):
    port = free_port()
    _direct_env(monkeypatch, port)
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()

    async def main() -> None:
        asyncio.get_running_loop().call_later(0.6, holder.close)
        await wait_for_direct_port("127.0.0.1", timeout=10)

    asyncio.run(main())
    assert holder.fileno() == -1, "went on while the port was still held"


def test_a_port_that_stays_taken_fails_the_replica_start(monkeypatch):
    port = free_port()
    _direct_env(monkeypatch, port)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(PortBusy, match=str(port)):
            asyncio.run(wait_for_direct_port("127.0.0.1", timeout=0.6))


def test_without_direct_ingress_nothing_is_waited_for(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(holder.getsockname()[1]))
        asyncio.run(wait_for_direct_port("127.0.0.1", timeout=0.1))


def test_joining_a_cluster_whose_nodes_serve_the_port_directly_moves_the_proxy(monkeypatch):
    """`up --address` shares the nodes' environment file (the Ansible install): when it has the
    ingress replica serve the API port, the proxy takes the next port, or the one configured."""
    for name, value in direct_ingress_env(8000).items():
        monkeypatch.setenv(name, value)
    settings = Settings(host="0.0.0.0", port=8000, ray_address="10.0.0.1:6379", database_url=None)
    http = cluster_serve_http(settings)
    assert http.direct and http.http_options == {"host": "0.0.0.0", "port": 8001}
    chosen = cluster_serve_http(settings.model_copy(update={"proxy_port": 9100}))
    assert chosen.http_options["port"] == 9100
    with pytest.raises(ConfigError, match="2 ingress replicas"):
        cluster_serve_http(settings.model_copy(update={"ingress_replicas": 2}))


def test_joining_a_cluster_without_direct_ingress_puts_the_proxy_on_the_port(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
    settings = Settings(host="0.0.0.0", port=8000, ray_address="10.0.0.1:6379", database_url=None)
    assert cluster_serve_http(settings) == ServeHttp(
        env={}, http_options={"host": "0.0.0.0", "port": 8000}, direct=False
    )
    # Nodes that serve another port directly leave this one to the proxy too.
    for name, value in direct_ingress_env(8500).items():
        monkeypatch.setenv(name, value)
    assert not cluster_serve_http(settings).direct
