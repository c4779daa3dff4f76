"""One Ray Serve LLM engine deployment (`LLMServer` running vLLM) per configured model."""

from __future__ import annotations

from typing import Any

from ray.serve.llm import LLMConfig, LLMServer, ModelLoadingConfig
from ray.serve.llm import build_llm_deployment

from agencyllm.serving.config import ModelSpec

# vLLM on CPU: fp32 kernels, no CUDA graphs, a bounded KV cache (GiB) instead of a share of GPU memory.
_CPU_ENGINE_DEFAULTS = {"dtype": "float32", "enforce_eager": True}
CPU_KV_CACHE_GIB = "1"

# Engine processes must never reach out: air-gapped installs have nowhere to send telemetry to.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def llm_config(spec: ModelSpec, *, cpu: bool) -> LLMConfig:
    engine_kwargs: dict[str, Any] = {"max_model_len": spec.context_length(), **spec.engine_args}
    if spec.task == "embed":
        engine_kwargs.setdefault("runner", "pooling")
    env = dict(OFFLINE_ENV)
    if cpu:
        engine_kwargs = {**_CPU_ENGINE_DEFAULTS, **engine_kwargs}
        env["VLLM_CPU_KVCACHE_SPACE"] = CPU_KV_CACHE_GIB
        bundles = [{"CPU": spec.accelerator.cpus, "GPU": 0}]
    else:
        gpus_per_engine = max(spec.accelerator.gpus, 1)
        bundles = [{"CPU": 1, "GPU": 1} for _ in range(gpus_per_engine)]
        engine_kwargs.setdefault("tensor_parallel_size", gpus_per_engine)

    autoscaling = {
        "min_replicas": spec.replicas.min,
        "initial_replicas": max(spec.replicas.min, 1),
        "max_replicas": spec.replicas.max,
        "target_ongoing_requests": spec.replicas.target_ongoing_requests,
    }
    return LLMConfig(
        model_loading_config=ModelLoadingConfig(model_id=spec.id, model_source=str(spec.path)),
        engine_kwargs=engine_kwargs,
        accelerator_type=None if cpu else spec.accelerator.type,
        placement_group_config={"bundles": bundles, "strategy": spec.accelerator.strategy},
        deployment_config={"autoscaling_config": autoscaling, "max_ongoing_requests": spec.max_ongoing_requests},
        runtime_env={"env_vars": env},
        # Chunks leave as the engine makes them: Ray's default 50 ms batching adds ~48 ms to TTFT.
        experimental_configs={"stream_batching_interval_ms": 0},
        log_engine_metrics=True,
    )


def engine_deployment(spec: ModelSpec, *, cpu: bool):
    """The bound `LLMServer` deployment for one model."""
    return build_llm_deployment(llm_config(spec, cpu=cpu), deployment_cls=LLMServer)
