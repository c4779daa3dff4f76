"""Write the schemas generated from one source, and check that the committed copies are current.

- The Helm chart's `values.schema.json` is hand-written except `properties.models.items`: the
  models configuration's own schema (`ModelSpec` in `agencyllm.serving.config`), with the one
  difference the chart makes: `path` is relative to `weights.mountPath`.
- `serving/http/openai_bodies.json`: the /v1 request bodies the OpenAPI document shows, taken from
  the request models the gateway validates with (Ray Serve LLM's `openai_api_models`, which the
  HTTP layer must not import).

    python scripts/gen_schemas.py           # rewrite the generated files
    python scripts/gen_schemas.py --check   # exit 1 naming each file that is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agencyllm.serving.config import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
HELM_SCHEMA = ROOT / "infra" / "helm" / "agencyllm" / "values.schema.json"
OPENAI_BODIES = ROOT / "serving" / "http" / "openai_bodies.json"
COMMAND = "python scripts/gen_schemas.py"

# The parameters the document shows of each body: the ones clients use most. The engines take more.
_SAMPLING = ("max_tokens", "n", "stream", "temperature", "top_p", "seed", "stop")
DOCUMENTED = {
    "chat": ("model", "messages", *_SAMPLING),
    "completions": ("model", "prompt", *_SAMPLING),
    "embeddings": ("model", "input"),
}
# What the gateway requires beyond the models (serving/gateway/inputs.py, `check_openai_params`).
GATEWAY_REQUIRES = {"chat": "messages", "completions": "prompt", "embeddings": "input"}
# Bounds the engine checks (vLLM's SamplingParams, a 400 naming the parameter) that its request
# models do not express; numeric keywords leave `null` alone.
ENGINE_CHECKS: dict[str, dict[str, Any]] = {
    "max_tokens": {"minimum": 1},
    "n": {"minimum": 1},
    "temperature": {"minimum": 0, "maximum": 2},
    "top_p": {"exclusiveMinimum": 0, "maximum": 1},
}
# Keys of a schema node whose values are data, not schemas.
_DATA_KEYS = ("default", "enum", "const", "examples")


def helm_models_item() -> dict[str, Any]:
    """One `models` entry of the chart's values: `ModelSpec`'s schema, self-contained (draft 7)."""
    raw = ModelSpec.model_json_schema()
    item: dict[str, Any] = _inline(raw, raw.get("$defs", {}))
    item["properties"]["path"] = {
        "type": "string",
        "minLength": 1,
        "description": "weights directory, relative to weights.mountPath or absolute under it",
    }
    return item


def helm_values_schema(current: str) -> str:
    """The chart's values schema `current` with its `models` items generated."""
    schema = json.loads(current)
    schema["properties"]["models"]["items"] = helm_models_item()
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def _inline(node: Any, definitions: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """`node` with every `$ref` replaced by its definition and without titles."""
    if isinstance(node, list):
        return [_inline(item, definitions, seen) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rpartition("/")[2]
        if name in seen:
            raise ValueError(f"{name} is recursive: it cannot be inlined")
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return _inline({**definitions[name], **rest}, definitions, (*seen, name))
    out = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "properties":
            out[key] = {name: _inline(sub, definitions, seen) for name, sub in value.items()}
        else:
            out[key] = value if key in _DATA_KEYS else _inline(value, definitions, seen)
    return out


def _variants(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The object schemas a request model accepts (one, or each member of a union)."""
    return [schema] if "properties" in schema else [v for v in schema.get("anyOf", schema.get("oneOf", []))]


def openai_bodies() -> dict[str, dict[str, Any]]:
    """Each /v1 body's documented schema: the documented parameters as the request model defines
    them (taken from the first variant that has them), required as the model and gateway say."""
    from pydantic import TypeAdapter
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

    models = {"chat": ChatCompletionRequest, "completions": CompletionRequest, "embeddings": EmbeddingRequest}
    bodies = {}
    for endpoint, model in models.items():
        raw = TypeAdapter(model).json_schema()
        variants = _variants(_inline(raw, raw.get("$defs", {})))
        variant = next(v for v in variants if GATEWAY_REQUIRES[endpoint] in v["properties"])
        names = DOCUMENTED[endpoint]
        required = set(variant.get("required", [])) | {GATEWAY_REQUIRES[endpoint]}
        bodies[endpoint] = {
            "type": "object",
            "required": [name for name in names if name in required],
            "properties": {name: {**variant["properties"][name], **ENGINE_CHECKS.get(name, {})} for name in names},
        }
    return bodies


def openai_bodies_json(bodies: dict[str, dict[str, Any]]) -> str:
    return json.dumps(bodies, indent=1, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed files are current")
    args = parser.parse_args(argv)
    outdated = []
    for path, render in (
        (HELM_SCHEMA, helm_values_schema),
        (OPENAI_BODIES, lambda _current: openai_bodies_json(openai_bodies())),
    ):
        current = path.read_text() if path.exists() else ""
        wanted = render(current)
        if current == wanted:
            continue
        outdated.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(wanted)
            print(f"wrote {path.relative_to(ROOT)}")
    if args.check and outdated:
        print(f"out of date: {', '.join(map(str, outdated))}; run `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
