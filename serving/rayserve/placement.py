"""How many CPUs each ingress replica reserves (`AGENCYLLM_INGRESS_CPUS`).

Reserving CPUs keeps Ray's scheduler from packing the ingress onto cores an engine already
holds. It is only possible where the cluster has CPUs left once every engine replica has its
placement bundle, so the default (setting unset) is 1 CPU per ingress replica when that many are
spare and 0 otherwise: a small host whose cores all go to the engines still runs the ingress.
"""

from __future__ import annotations

from agencyllm.serving.config import ModelSpec, ServingConfig
from agencyllm.serving.settings import Settings

DEFAULT_INGRESS_CPUS = 1.0


def engine_cpus(spec: ModelSpec, *, cpu: bool) -> float:
    """CPUs one engine replica's placement group takes: its bundles plus the replica actor's 1
    (Ray Serve LLM merges the replica actor into the first bundle)."""
    per_replica = spec.accelerator.cpus if cpu else max(spec.accelerator.gpus, 1)
    return float(per_replica + 1)


def engines_cpus(serving: ServingConfig, *, cpu: bool) -> float:
    """CPUs every engine takes at its largest replica count."""
    return sum(engine_cpus(spec, cpu=cpu) * spec.replicas.max for spec in serving.models)


def ingress_cpus(settings: Settings, serving: ServingConfig, *, cpu: bool, total_cpus: float | None = None) -> float:
    """The configured `ingress_cpus`, else 1 when `total_cpus` leave one per ingress replica
    beside the engines, else 0. `total_cpus` unset: the connected Ray cluster's CPUs (the local
    run passes the host's real cores instead, as it gives Ray more logical CPUs than that)."""
    if settings.ingress_cpus is not None:
        return settings.ingress_cpus
    if total_cpus is None:
        total_cpus = cluster_cpus()
    if total_cpus is None:
        return 0.0
    spare = total_cpus - engines_cpus(serving, cpu=cpu)
    return DEFAULT_INGRESS_CPUS if spare >= DEFAULT_INGRESS_CPUS * settings.ingress_replicas else 0.0


def cluster_cpus() -> float | None:
    """CPUs the connected Ray cluster has now (None outside Ray)."""
    import ray

    if not ray.is_initialized():
        return None
    return ray.cluster_resources().get("CPU")


def host_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
