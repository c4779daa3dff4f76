"""`agencyllm up`: the whole platform on this machine; `_serve`, the stack process `up` starts."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from agencyllm.serving.cli.common import DataDir, exclusive, settings

STARTED = time.monotonic()  # `agencyllm up` counts its progress lines from here


def up(
    data_dir: DataDir = None,
    host: Annotated[str | None, typer.Option(help="listen address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (default 8000)")] = None,
    config: Annotated[Path | None, typer.Option(help="models YAML file")] = None,
    model: Annotated[Path | None, typer.Option(help="serve one model directory (its id is the directory name)")] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="join this running Ray cluster (its head, HOST:6379) instead of starting Ray here; "
            "run it on the head node unless AGENCYLLM_DATABASE_URL names a database every node reaches",
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="show Ray's, Serve's and the engines' logs here, not in DATA_DIR/logs")
    ] = False,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat",
            help="also run the staff chat (Open WebUI, AGENCYLLM_CHAT_COMMAND) against this platform; "
            "needs Keycloak (docs/chat.md)",
        ),
    ] = False,
) -> int:
    """run the whole platform on this machine, or on a running Ray cluster with --address"""
    from agencyllm.serving.config import ConfigError
    from agencyllm.serving.ops.chat import ChatUnavailable, check_chat_settings
    from agencyllm.serving.ops.stack import PLACEHOLDER_WARNING, resolve_models
    from agencyllm.serving.ops.supervisor import Supervisor

    exclusive(config=config, model=model)
    platform = settings(data_dir=data_dir, host=host, port=port, config=config, ray_address=address)
    if chat:
        platform = platform.model_copy(update={"chat": True})
    if platform.chat:
        try:
            check_chat_settings(platform)
        except ChatUnavailable as exc:
            print(f"agencyllm: {exc}", file=sys.stderr)
            return 2
    try:
        serving, placeholder = resolve_models(platform, model)
    except ConfigError as exc:
        print(f"agencyllm: {exc}", file=sys.stderr)
        return 2
    if placeholder:
        print(PLACEHOLDER_WARNING, file=sys.stderr, flush=True)
    models = ", ".join(m.id for m in serving.models)
    print(f"Starting agencyllm: models {models}; data in {platform.data_dir}", flush=True)
    return Supervisor(platform, model, verbose=verbose, started=STARTED).run()


def serve(
    model: Annotated[Path | None, typer.Option()] = None, progress_fd: Annotated[int | None, typer.Option()] = None
) -> int:
    """The stack process `up` runs (Ray, engines, ingress); the database is already there."""
    from agencyllm.serving.ops.supervisor import serve as serve_stack

    return serve_stack(settings(), model, progress_fd)
