"""Several hosts on this machine: one network namespace per host, joined by a bridge (the
multi-host tests and `python -m bench.serving_bench --cluster`).

The first host holds the bridge (its address ends in .1); every other host has a veth pair with
one end on that bridge. Each host sees only loopback and the bridge's subnet: a default route
onto the bridge lets programs that ask the kernel for "the outward address" (Ray does) find their
own, and traffic to anything else has nowhere to go. Every command a host runs also gets a mount
namespace of its own with a private /dev/shm (Ray's object store), as a separate machine would.

    with Hosts(["head", "worker1"]) as hosts:
        hosts.spawn("worker1", ["ray", "start", ...], log=path)
        with hosts.entered("head"):        # this thread's sockets open in the head's namespace
            httpx.get(f"http://{hosts.address('head')}:8000/healthz")
        hosts.kill("worker1")              # SIGKILL every process in the host's namespace

Teardown kills every process in every namespace and deletes the namespaces, also after a failure;
namespaces of an earlier run whose test process died are removed when the next one starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

SUBNET = "10.231.7"
PREFIX = "agencyllm-t"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


def can_make_hosts() -> str | None:
    """Why this machine cannot run several hosts (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "iproute2 and util-linux are needed"
    probe = f"{PREFIX}probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Namespaces left by a test process that no longer runs (killed before its teardown)."""
    for name in sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else []:
        match = re.fullmatch(rf"{PREFIX}(\d+)-.+", name)
        if match and not process_alive(int(match.group(1))):
            _kill_namespace(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _namespace_pids(namespace: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(pid) for pid in done.stdout.split()]


def _kill_namespace(namespace: str, timeout: float = 30) -> int:
    """SIGKILL every process in `namespace` until none is left; how many there were."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while (pids := _namespace_pids(namespace)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.2)
    return len(killed)


class Hosts:
    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self._tag = f"{PREFIX}{os.getpid()}-"
        self._processes: list[subprocess.Popen] = []
        self._libc = ctypes.CDLL(None, use_errno=True)

    def namespace(self, name: str) -> str:
        return self._tag + name

    def address(self, name: str) -> str:
        return f"{SUBNET}.{self.names.index(name) + 1}"

    @staticmethod
    def planned(names: list[str]) -> dict[str, str]:
        """The address each of `names` gets when the hosts are made (or added) in this order."""
        return {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(names)}

    def __enter__(self) -> Hosts:
        remove_stale()
        try:
            for name in self.names:
                self._add(name)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(self, name: str) -> None:
        namespace, address = self.namespace(name), self.address(name)
        _ip("netns", "add", namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        bridge_ns = self.namespace(self.names[0])
        if name == self.names[0]:
            _ip("-n", namespace, "link", "add", "br0", "type", "bridge")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "br0")
            _ip("-n", namespace, "link", "set", "br0", "up")
            _ip("-n", namespace, "route", "add", "default", "dev", "br0")
            return
        port = f"v-{name}"[:15]
        _ip("-n", bridge_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("-n", bridge_ns, "link", "set", port, "master", "br0", "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "route", "add", "default", "via", self.address(self.names[0]))

    def add_host(self, name: str) -> str:
        """Plug one more host into the bridge; its address."""
        self.names.append(name)
        self._add(name)
        return self.address(name)

    def command(self, name: str, argv: list[str]) -> list[str]:
        """`argv` run on host `name`: its network namespace, a mount namespace with a private /dev/shm."""
        return [
            "ip", "netns", "exec", self.namespace(name),
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", 'mount -t tmpfs -o size=50% tmpfs /dev/shm && exec "$@"', "host",
            *argv,
        ]  # fmt: skip

    def spawn(self, name: str, argv: list[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(log, "ab") as out:
            process = subprocess.Popen(
                self.command(name, argv), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._processes.append(process)
        return process

    def run(self, name: str, argv: list[str], *, timeout: float = 120, env: dict[str, str] | None = None):
        return subprocess.run(self.command(name, argv), capture_output=True, text=True, timeout=timeout, env=env)

    def pids(self, name: str) -> list[int]:
        return _namespace_pids(self.namespace(name))

    def kill(self, name: str) -> int:
        """SIGKILL every process of host `name` (a machine losing power); how many there were."""
        return _kill_namespace(self.namespace(name))

    @contextlib.contextmanager
    def entered(self, name: str) -> Iterator[None]:
        """This thread in host `name`'s network namespace: sockets it opens (and threads and
        processes it starts) live there. Back in its own namespace afterwards."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(NETNS_DIR / self.namespace(name), os.O_RDONLY)
        try:
            self._setns(target)
            try:
                yield
            finally:
                self._setns(own)
        finally:
            os.close(target)
            os.close(own)

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    def close(self) -> None:
        for name in self.names:
            _kill_namespace(self.namespace(name))
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        for name in self.names:
            subprocess.run(["ip", "netns", "del", self.namespace(name)], capture_output=True)

    def left(self) -> list[str]:
        """This run's namespaces that still exist (none after `close`)."""
        return [n for n in os.listdir(NETNS_DIR) if n.startswith(self._tag)] if NETNS_DIR.is_dir() else []
