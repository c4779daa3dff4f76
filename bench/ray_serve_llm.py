"""Ray Serve LLM's own OpenAI app (`ray.serve.llm.build_openai_app`, its defaults) as a benchmark
target: what a Ray user would deploy instead of agencyllm. No authentication, no quotas.

Started by bench/servers.py for bench/serving_bench.py in its own process (its own local Ray
instance, so its CPU is counted apart from agencyllm's):  python -m bench.ray_serve_llm --model DIR --port PORT
Stops cleanly on SIGTERM or SIGINT: Serve, then Ray.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

# The same engine settings as the other two targets (bench/serving_bench.py).
ENGINE_KWARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024}
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--model-id", default="placeholder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--num-cpus", type=int, default=8, help="Ray's logical CPUs (the ingress needs one)")
    args = parser.parse_args(argv)
    os.environ.update(ENGINE_ENV)

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, ModelLoadingConfig, build_openai_app

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    stopping = threading.Event()
    # ray.init installs its own SIGTERM handler: ours comes after it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        config = LLMConfig(
            model_loading_config=ModelLoadingConfig(model_id=args.model_id, model_source=args.model),
            engine_kwargs=ENGINE_KWARGS,
            placement_group_config={"bundles": [{"CPU": 1, "GPU": 0}]},
            runtime_env={"env_vars": ENGINE_ENV},
        )
        serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
        print("ready", flush=True)
        while not stopping.wait(1):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
