"""The models an install serves: a YAML file (`--config`) or one directory (`--model`).

```yaml
models:
  - id: llama-3.1-8b-instruct          # what staff pass as `model`
    path: /models/llama-3.1-8b-instruct  # weights on local disk or a volume (no hub downloads)
    task: generate                      # or `embed`
    engine_args: {max_model_len: 8192, tensor_parallel_size: 1}
    replicas: {min: 1, max: 4}          # or a number
    accelerator: {type: L4, gpus: 1}    # gpus: 0 runs on CPU
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """An invalid models configuration; the message names the bad field."""


class Replicas(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: int = Field(default=1, ge=0)
    max: int = Field(default=1, ge=1)
    target_ongoing_requests: int = Field(
        default=32, ge=1, description="ongoing requests per replica the autoscaler aims for"
    )

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


RAY_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
MAX_CUSTOM_RESOURCE = 1_000_000


class Accelerator(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str | None = Field(
        default=None,
        description="Ray accelerator type label (e.g. L4, A100, H100); null: any GPU, or CPU when gpus is 0",
    )
    gpus: int = Field(default=0, ge=0, description="GPUs per engine replica; 0 runs on CPU")
    cpus: int = Field(default=1, ge=1)
    strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="PACK", description="Ray placement strategy for multi-GPU engines"
    )
    resources: dict[str, float] = Field(
        default={},
        description="Ray custom resources each engine replica needs (e.g. {engine_node: 1}): only Ray nodes "
        "started with them (ray start --resources) run it",
    )

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in RAY_BUILTIN_RESOURCES or not name or name.startswith("node:"):
                raise ValueError(f"{name!r} is not a custom resource name (cpus and gpus set CPU and GPU)")
            if not 0 < amount <= MAX_CUSTOM_RESOURCE:
                raise ValueError(f"resource {name!r}: {amount} is not between 0 (excluded) and {MAX_CUSTOM_RESOURCE}")
        return value


# Engine deployments are named LLMServer:<model id> (as Ray Serve LLM names them).
ENGINE_PREFIX = "LLMServer:"
# Running slots per engine replica when `engine_args` does not set vLLM's `max_num_seqs`.
DEFAULT_ENGINE_SLOTS = 256


class FairShare(BaseModel):
    """Fair admission in front of each engine replica (docs/quotas.md, "Fair sharing")."""

    model_config = ConfigDict(extra="forbid")
    slots: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="running slots the queue hands out; the engine gets the same `max_num_seqs`. "
        f"Unset: `engine_args.max_num_seqs`, else {DEFAULT_ENGINE_SLOTS}",
    )
    interactive_reserve: int | None = Field(
        default=None,
        ge=0,
        description="slots only interactive requests may take. Unset: one in eight (at least 1 when slots > 1)",
    )
    burst: int | None = Field(
        default=None,
        ge=0,
        le=4096,
        description="extra engine sequences (vLLM runs `slots + burst`) in which a tenant below its share starts "
        "at once when every slot is busy. Unset: one in sixteen slots, at least 1; 0 turns it off",
    )
    max_wait_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="a request that waits longer for a slot gets 429 with Retry-After; nothing is charged",
    )
    max_queued_per_tenant: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="requests one tenant may have waiting on one replica; more get 429 at once",
    )


# Default for `ModelSpec.stream_coalesce_ms` (docs/benchmarks.md, "Serving").
DEFAULT_STREAM_COALESCE_MS = 5.0


# vLLM arguments the model settings own (they are checked, and the gateway acts on them).
ENGINE_ARGS_WITH_A_SETTING = {
    "tool_call_parser": "tool_call_parser",
    "enable_auto_tool_choice": "tool_call_parser",
    "reasoning_parser": "reasoning_parser",
    "chat_template": "chat_template",
}


class ModelSpec(BaseModel):
    """One model an install serves: one vLLM engine deployment."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description="what staff pass as `model`",
    )
    path: Path = Field(description="weights directory on local disk or a volume (no hub downloads)")
    task: Literal["generate", "embed"] = "generate"
    engine_args: dict[str, Any] = Field(default={}, description="any vLLM engine argument")
    replicas: Replicas = Field(default=Replicas(), description="engine replicas: a number, or min/max to autoscale")
    accelerator: Accelerator = Accelerator()
    max_ongoing_requests: int = Field(default=64, ge=1)
    fair_share: FairShare = FairShare()
    tool_call_parser: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="vLLM's tool-call parser for the model's output format (e.g. hermes for Qwen2.5 and Hermes, "
        "llama3_json, mistral, pythonic). Unset: requests with tools get 400, except tool_choice none",
    )
    auto_tool_choice: bool = Field(
        default=True,
        description="with a tool_call_parser: the model may decide itself whether to call a tool (tool_choice auto, "
        "the default when tools are sent). false: only none, required and a named function",
    )
    reasoning_parser: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="vLLM's reasoning parser (e.g. qwen3, deepseek_r1): the model's thinking is returned apart, "
        "as `reasoning` in messages and deltas",
    )
    chat_template: Path | None = Field(
        default=None,
        description="a Jinja chat template file replacing the one in the weights' tokenizer_config.json (for "
        "example one that renders tools); the gateway counts prompt tokens with it too",
    )
    stream_coalesce_ms: float = Field(
        default=DEFAULT_STREAM_COALESCE_MS,
        ge=0,
        le=1000,
        description="streamed output: the first chunk leaves at once; chunks the engine makes within this many "
        "milliseconds of the last one sent travel together (less CPU per token, each chunk delayed by at most "
        "this much). 0 sends every chunk on its own",
    )

    @field_validator("replicas", mode="before", json_schema_input_type=Annotated[int, Field(ge=0)] | Replicas)
    @classmethod
    def _fixed_count(cls, value: Any) -> Any:
        return {"min": value, "max": value} if isinstance(value, int) else value

    @field_validator("chat_template")
    @classmethod
    def _template_readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"no chat template file at {path}")
        return path

    @field_validator("path")
    @classmethod
    def _weights_exist(cls, path: Path) -> Path:
        if not (path / "config.json").is_file():
            raise ValueError(f"no model at {path} (config.json not found)")
        return path

    @field_validator("engine_args")
    @classmethod
    def _own_settings_not_in_engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name, setting in ENGINE_ARGS_WITH_A_SETTING.items():
            if name in value:
                raise ValueError(f"{name} is set with the model setting `{setting}`, not in engine_args")
        return value

    @model_validator(mode="after")
    def _reserve_below_slots(self) -> ModelSpec:
        reserve = self.fair_share.interactive_reserve
        if reserve is not None and reserve >= self.engine_slots():
            raise ValueError(
                f"fair_share.interactive_reserve ({reserve}) must be below the slots ({self.engine_slots()})"
            )
        return self

    def engine_slots(self) -> int:
        """Running slots per replica: what the fair queue hands out and vLLM's `max_num_seqs`."""
        if self.fair_share.slots is not None:
            return self.fair_share.slots
        return int(self.engine_args.get("max_num_seqs", DEFAULT_ENGINE_SLOTS))

    def interactive_reserve(self) -> int:
        if self.fair_share.interactive_reserve is not None:
            return self.fair_share.interactive_reserve
        slots = self.engine_slots()
        return 0 if slots < 2 else max(1, slots // 8)

    def burst(self) -> int:
        if self.fair_share.burst is not None:
            return self.fair_share.burst
        return max(1, self.engine_slots() // 16)

    def context_length(self) -> int:
        if "max_model_len" in self.engine_args:
            return int(self.engine_args["max_model_len"])
        config = json.loads((self.path / "config.json").read_text())
        return int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> ServingConfig:
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique, repeated: {', '.join(duplicates)}")
        return self

    def model(self, model_id: str) -> ModelSpec | None:
        return next((m for m in self.models if m.id == model_id), None)


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid models configuration in {source}:"]
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def parse_config(raw: Any, source: str) -> ServingConfig:
    """Validate a models configuration already read (a YAML file's content, a Serve config's args)."""
    try:
        return ServingConfig.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_config(file: Path) -> ServingConfig:
    try:
        raw = yaml.safe_load(Path(file).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read models configuration {file}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"models configuration {file} is not valid YAML: {exc}") from None
    return parse_config(raw, str(file))


def single_model_config(
    path: Path, *, task: str = "generate", engine_args: dict[str, Any] | None = None
) -> ServingConfig:
    path = Path(path).resolve()
    try:
        return ServingConfig(models=[ModelSpec(id=path.name, path=path, task=task, engine_args=engine_args or {})])
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(path))) from None
