"""Environment every process of the platform runs with: nothing ever reaches out (air-gapped
installs have nowhere to send telemetry to, and no model hub). Kept apart from the engine code
so that the local run can set it before Ray starts without importing vLLM first."""

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
