"""`agencyllm model placeholder|card`: the tiny placeholder model, and a served model's card."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from agencyllm.serving.cli.common import CommandError, DataDir, exclusive, settings

app = typer.Typer(help="model utilities", no_args_is_help=True)


@app.command("placeholder", help="write the tiny random-weight placeholder model")
def placeholder(directory: Annotated[str, typer.Argument(show_default=False)]) -> int:
    from agencyllm.serving.ops.placeholder import write_placeholder_model

    written = write_placeholder_model(Path(directory))
    print(f"Placeholder model (random weights, gibberish output) written to {written}")
    return 0


@app.command("card", help="the model card: weights path and sha256, context length, engine arguments")
def card(
    model: Annotated[str, typer.Argument(help="model id", show_default=False)],
    data_dir: DataDir = None,
    config: Annotated[Path | None, typer.Option(help="models YAML file (default $AGENCYLLM_CONFIG)")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="one model directory")] = None,
    fmt: Annotated[Literal["markdown", "json"], typer.Option("--format")] = "markdown",
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="FILE")] = None,
) -> int:
    from agencyllm.serving.cli.model_card import model_card_data, model_card_markdown
    from agencyllm.serving.config import ConfigError
    from agencyllm.serving.ops.stack import resolve_models
    from agencyllm.serving.rayserve.platform import cpu_only

    exclusive(config=config, model_dir=model_dir)
    try:
        platform = settings(data_dir=data_dir, config=config)
        serving, _ = resolve_models(platform, model_dir)
    except ConfigError as exc:
        raise CommandError(str(exc), code=2) from None
    spec = serving.model(model)
    if spec is None:
        known = ", ".join(m.id for m in serving.models)
        raise CommandError(f"no model '{model}' in the configuration (known: {known})")
    # The engine arguments come from vLLM, whose import logs to stdout: keep stdout for the card.
    with contextlib.redirect_stdout(sys.stderr):
        data = model_card_data(spec, cpu=cpu_only(platform.force_cpu))
    text = json.dumps(data, indent=2) if fmt == "json" else model_card_markdown(data)
    if output:
        Path(output).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0
