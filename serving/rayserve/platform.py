"""What this host's vLLM build runs its engines on (GPU or CPU), for placement and model cards."""

from __future__ import annotations

from agencyllm.serving.settings import Settings


def cpu_only(force_cpu: bool | None = None) -> bool:
    """True where vLLM's CPU build is installed (no GPU engine on this host), or where the
    settings say so (`AGENCYLLM_FORCE_CPU`; read from the environment when not given)."""
    if force_cpu is None:
        force_cpu = Settings().force_cpu
    try:
        from vllm.platforms import current_platform
    except ImportError:  # pragma: no cover - vLLM always present in an install
        return True
    return current_platform.is_cpu() or force_cpu
