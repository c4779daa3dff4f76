"""How the platform offers its HTTP port: served by the ingress replica itself (Ray Serve's direct
ingress, one process hop less per streamed chunk) or by Ray Serve's proxy in front of the ingress
replicas.

Direct ingress needs one ingress replica: the replica listens on the user's port itself, so a
second one could not share it. With more replicas (`AGENCYLLM_INGRESS_REPLICAS`), or with
`AGENCYLLM_DIRECT_INGRESS=false`, the proxy serves the port as before. The proxy runs in both
cases (Ray Serve starts the replica's own server only beside it); with direct ingress it listens
on a free port of the same host, answering the same routes with the same authentication.
On a cluster (`agencyllm up --address`, the Ansible install) the nodes' own environment decides:
Ray reads these variables where its controller runs, so the install writes `direct_ingress_env`
into every node's environment file, and the joining process moves the proxy off the port
(`cluster_serve_http`).
At stop, the stack first has the ingress end its streams in band and settle them
(`Gateway.stop_serving`): Ray would hold a replica serving HTTP open for them until it kills it.
A replica that serves the port waits in its constructor until the port can be bound
(`wait_for_direct_port`): see there why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass

from agencyllm.serving.config import ConfigError
from agencyllm.serving.settings import Settings

log = logging.getLogger(__name__)

# Ray Serve's own variables: written here for Ray's processes, read back in its replicas.
DIRECT_INGRESS = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
MIN_PORT, MAX_PORT = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"


@dataclass(frozen=True)
class ServeHttp:
    # Environment for Ray's processes, set before `ray.init` (Ray Serve reads it at import).
    env: dict[str, str]
    # `serve.start(http_options=...)`: where Ray Serve's proxy listens.
    http_options: dict
    direct: bool


def serve_http(settings: Settings) -> ServeHttp:
    if not settings.direct_ingress or settings.ingress_replicas != 1:
        return ServeHttp(
            env={DIRECT_INGRESS: "0"},
            http_options={"host": settings.host, "port": settings.port},
            direct=False,
        )
    env = direct_ingress_env(settings.port)
    proxy_port = settings.proxy_port or _free_port(settings.host)
    return ServeHttp(env=env, http_options={"host": settings.host, "port": proxy_port}, direct=True)


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve's variables for an ingress replica that serves `port` itself (the Ansible
    install's environment file holds the same: tests/test_ansible.py compares them)."""
    return {
        DIRECT_INGRESS: "1",
        # Ray hands replica ports out of [MIN, MAX): exactly the user's port.
        MIN_PORT: str(port),
        MAX_PORT: str(port + 1),
        # Ray holds a stopping replica open (30 s by default) for a cloud load balancer to
        # deregister it; nothing sits in front here, so stop once in-flight requests are done.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        # A replica restarted after a crash takes the port back at once instead of after a quarantine.
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


def cluster_serve_http(settings: Settings) -> ServeHttp:
    """Where Serve's proxy listens when this process joins a cluster. The nodes were started with
    their environment file, which this process shares: if it has the ingress replica serve the
    API port, the proxy takes `proxy_port` (default the next port), else the API port."""
    if direct_port() != settings.port:
        return ServeHttp(env={}, http_options={"host": settings.host, "port": settings.port}, direct=False)
    if settings.ingress_replicas != 1:
        raise ConfigError(
            f"the cluster's nodes have one ingress replica serve port {settings.port} itself "
            f"({DIRECT_INGRESS}=1 in their environment), but {settings.ingress_replicas} ingress replicas "
            "are asked for: set the ingress replicas to 1, or start the nodes without direct ingress"
        )
    proxy_port = settings.proxy_port or settings.port + 1
    return ServeHttp(env={}, http_options={"host": settings.host, "port": proxy_port}, direct=True)


# Linux keeps a closed connection's port in TIME_WAIT for 60 s.
PORT_WAIT_S = 90.0


class PortBusy(RuntimeError):
    pass


def direct_port() -> int | None:
    """The user's port, in a replica that Ray will have serve it (read from the environment
    `serve_http` gave Ray's processes); None otherwise."""
    if os.environ.get(DIRECT_INGRESS) != "1":
        return None
    low, high = os.environ.get(MIN_PORT), os.environ.get(MAX_PORT)
    if low is None or high is None or int(high) != int(low) + 1:
        return None
    return int(low)


async def wait_for_direct_port(host: str, *, timeout: float = PORT_WAIT_S) -> None:
    """Return once the direct-ingress port can be bound. Ray binds it without SO_REUSEADDR, so
    after a replica serving it died, its connections' TIME_WAIT entries make a restarted
    replica's bind fail, and Ray then takes the port out of its pool for good (no replica ever
    serves it again). Waiting here, before Ray asks for the port, lets them expire. Raises
    `PortBusy` (the replica fails to start and Ray retries it) if the port stays taken."""
    port = direct_port()
    if port is None:
        return
    deadline = time.monotonic() + timeout
    warned = False
    while not _bindable(host, port):
        if time.monotonic() >= deadline:
            raise PortBusy(
                f"port {port} on {host} stayed in use for {timeout:.0f} s: is another service listening on it?"
            )
        if not warned:
            log.warning("port %d is still held by closing connections of a previous replica: waiting for it", port)
            warned = True
        await asyncio.sleep(0.5)


def _bindable(host: str, port: int) -> bool:
    # The same bind Ray's server makes (no SO_REUSEADDR); closing an unconnected socket leaves no TIME_WAIT.
    with _socket(host) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with _socket(host) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
