"""The model card of a served model: what the platform knows (weights and their sha256, context
length, engine arguments), and the sections the agency completes (docs/compliance/)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card_data(spec: Any, *, cpu: bool) -> dict[str, Any]:
    from agencyllm.serving.ops.placeholder import is_placeholder
    from agencyllm.serving.rayserve.engines import llm_config

    path = Path(spec.path)
    weights = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    files = [{"file": str(p.relative_to(path)), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in weights]
    combined = hashlib.sha256("".join(f"{f['sha256']}  {f['file']}\n" for f in files).encode())
    config: dict[str, Any] = {}
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    tokenizer_config = {}
    if (path / "tokenizer_config.json").is_file():
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {
        "id": spec.id,
        "task": spec.task,
        "placeholder": is_placeholder(path),
        "weights_path": str(path.resolve()),
        "weights": files,
        "weights_sha256": combined.hexdigest() if files else None,
        "architecture": (config.get("architectures") or [None])[0],
        "model_type": config.get("model_type"),
        "parameters": {
            k: config.get(k)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if config.get(k) is not None
        },
        "context_length": spec.context_length(),
        "chat_template": bool(tokenizer_config.get("chat_template")),
        "engine_args": llm_config(spec, cpu=cpu).engine_kwargs,
        "replicas": spec.replicas.model_dump(),
        "accelerator": spec.accelerator.model_dump(),
        "generated_at": datetime.now(UTC).isoformat(),
    }


_TO_COMPLETE = "_(agency to complete)_"


def model_card_markdown(card: dict[str, Any]) -> str:
    lines = [f"# Model card: {card['id']}", ""]
    if card["placeholder"]:
        lines += ["> **Placeholder model**: random weights, gibberish output. Not for staff use.", ""]
    lines += [
        "## What the platform knows",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| model id (what staff send as `model`) | `{card['id']}` |",
        f"| task | {card['task']} |",
        f"| weights path | `{card['weights_path']}` |",
        f"| weights sha256 (over the files below) | `{card['weights_sha256']}` |",
        f"| architecture | {card['architecture']} ({card['model_type']}) |",
        f"| context length (tokens) | {card['context_length']} |",
        f"| chat template | {'yes' if card['chat_template'] else 'no'} |",
        f"| engine arguments (vLLM) | `{json.dumps(card['engine_args'], sort_keys=True)}` |",
        f"| replicas | `{json.dumps(card['replicas'])}` |",
        f"| accelerator | `{json.dumps(card['accelerator'])}` |",
        f"| card generated (UTC) | {card['generated_at']} |",
        "",
        "### Weight files",
        "",
        "| file | bytes | sha256 |",
        "| --- | --- | --- |",
        *[f"| `{f['file']}` | {f['bytes']} | `{f['sha256']}` |" for f in card["weights"]],
        "",
        "## What the agency records",
        "",
        f"- Provider, version and licence of the weights: {_TO_COMPLETE}",
        f"- Intended uses and users; uses that are out of scope: {_TO_COMPLETE}",
        f"- Training data summary as published by the provider: {_TO_COMPLETE}",
        f"- Evaluation before deployment (tasks, results, bias testing): {_TO_COMPLETE}",
        f"- Known limitations and risks; human oversight in place: {_TO_COMPLETE}",
        f"- Use-case inventory entries that rely on this model: {_TO_COMPLETE}",
        "",
    ]
    return "\n".join(lines)
