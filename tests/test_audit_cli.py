"""`agencyllm model card MODEL`: what the platform knows about a served model, for the agency's
model card (docs/compliance/)."""

from __future__ import annotations

import hashlib
import json

from agencyllm.serving.cli import main as cli
from agencyllm.serving.ops.placeholder import write_placeholder_model


def test_model_card_names_weights_hash_context_and_engine_args(tmp_path, capsys, monkeypatch):
    model = write_placeholder_model(tmp_path / "memo-model")
    config = tmp_path / "models.yaml"
    config.write_text(f"models:\n  - id: memo-model\n    path: {model}\n    engine_args: {{max_model_len: 512}}\n")
    monkeypatch.delenv("AGENCYLLM_CONFIG", raising=False)

    assert cli.main(["model", "card", "memo-model", "--config", str(config), "--format", "json"]) == 0
    card = json.loads(capsys.readouterr().out)
    weights = model / "model.safetensors"
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert card["weights"] == [{"file": "model.safetensors", "bytes": weights.stat().st_size, "sha256": expected}]
    assert card["weights_sha256"] == hashlib.sha256(f"{expected}  model.safetensors\n".encode()).hexdigest()
    assert card["weights_path"] == str(model.resolve())
    assert card["context_length"] == 512 and card["engine_args"]["max_model_len"] == 512
    assert card["architecture"] == "LlamaForCausalLM" and card["placeholder"] is True

    out = tmp_path / "card.md"
    assert cli.main(["model", "card", "memo-model", "--config", str(config), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Model card: memo-model") and expected in text
    assert "Placeholder model" in text and "agency to complete" in text

    assert cli.main(["model", "card", "nope", "--config", str(config)]) == 1
    assert "no model 'nope'" in capsys.readouterr().err
