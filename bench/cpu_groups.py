"""CPU accounting of a benchmark run: CPU seconds per labelled process group, read from /proc."""

from __future__ import annotations

import os
from pathlib import Path

# ---- CPU accounting ---------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(roots: set[int]) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))):
            parents[int(entry.name)] = st[0]
    found = set(roots)
    while True:
        more = {pid for pid, ppid in parents.items() if ppid in found and pid not in found}
        if not more:
            return found
        found |= more


def _holding(path_fragment: str) -> set[int]:
    """Processes with an open file under a path containing `path_fragment` (Ray session logs)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if path_fragment in os.readlink(fd):
                    pids.add(int(entry.name))
                    break
        except OSError:
            continue
    return pids


def _ray_label(prefix: str, cmd: str) -> str:
    return (
        f"{prefix}: ray proxy"
        if "ProxyActor" in cmd
        else f"{prefix}: ingress"
        if "Ingress" in cmd
        else f"{prefix}: llmserver"
        if "LLMServer" in cmd
        else f"{prefix}: engine core"
        if "EngineCore" in cmd or "VLLM::Worker" in cmd
        else f"{prefix}: ray system"
    )


class CpuGroups:
    """CPU seconds per labelled process group: plain vLLM (API server + engine core), Ray Serve
    LLM's and our stack's Ray proxy, ingress, LLMServer, engine core and Ray system processes,
    and our Postgres."""

    def __init__(self, plain_pid: int, ray_llm_pid: int, ray_session: str | None, pg_dir: str) -> None:
        self.labels: dict[int, str] = {}
        for pid in _descendants({plain_pid}):
            self.labels[pid] = "plain: api server" if pid == plain_pid else "plain: engine core"
        # Ray Serve LLM's driver started its own Ray instance: everything it runs descends from it.
        for pid in _descendants({ray_llm_pid}) - set(self.labels):
            self.labels[pid] = "rayllm: ray system" if pid == ray_llm_pid else _ray_label("rayllm", _cmdline(pid))
        ours = _descendants(_holding(ray_session)) if ray_session else set()
        for pid in ours - {os.getpid()} - set(self.labels):
            self.labels[pid] = _ray_label("ours", _cmdline(pid))
        postmaster = {pid for pid in self._all() if pg_dir in _cmdline(pid)}
        for pid in _descendants(postmaster):
            self.labels.setdefault(pid, "ours: postgres")
        self.labels[os.getpid()] = "client (load generator)"

    @staticmethod
    def _all() -> set[int]:
        return {int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()}

    def snapshot(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid, label in self.labels.items():
            if (st := _stat(pid)) is not None:
                totals[label] = totals.get(label, 0.0) + st[1]
        return totals


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
