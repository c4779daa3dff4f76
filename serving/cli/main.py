"""`agencyllm` command line: run the platform, make the placeholder model, manage the schema.

The administration commands (tenants, quota, keys, usage, login) are in `cli_admin`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from agencyllm.serving.settings import Settings, SettingsError

STARTED = time.monotonic()  # `agencyllm up` counts its progress lines from here


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    for name in ("data_dir", "host", "port", "config"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    try:
        return Settings(**overrides)
    except SettingsError as exc:  # before anything starts, naming the variable to fix
        print(f"agencyllm: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_up(args: argparse.Namespace) -> int:
    from agencyllm.serving.config import ConfigError
    from agencyllm.serving.ops.stack import PLACEHOLDER_WARNING, resolve_models
    from agencyllm.serving.ops.supervisor import Supervisor

    settings = _settings(args)
    try:
        serving, placeholder = resolve_models(settings, args.model)
    except ConfigError as exc:
        print(f"agencyllm: {exc}", file=sys.stderr)
        return 2
    if placeholder:
        print(PLACEHOLDER_WARNING, file=sys.stderr, flush=True)
    print(
        f"Starting agencyllm: models {', '.join(m.id for m in serving.models)}; data in {settings.data_dir}", flush=True
    )
    return Supervisor(settings, args.model, verbose=args.verbose, started=STARTED).run()


def cmd_serve(args: argparse.Namespace) -> int:
    """The stack process `up` runs (Ray, engines, ingress); the database is already there."""
    from agencyllm.serving.ops.supervisor import serve

    return serve(_settings(args), args.model, args.progress_fd)


def cmd_placeholder(args: argparse.Namespace) -> int:
    from agencyllm.serving.ops.placeholder import write_placeholder_model

    directory = write_placeholder_model(Path(args.directory))
    print(f"Placeholder model (random weights, gibberish output) written to {directory}")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from agencyllm.quotas.db import upgrade_schema
    from agencyllm.serving.ops.local_db import database_url

    settings = _settings(args)
    url, postgres = database_url(settings)
    try:
        upgrade_schema(url)
        print("Database schema is up to date.")
    finally:
        if postgres is not None:
            postgres.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agencyllm", description="Private OpenAI-compatible LLM platform.")
    sub = parser.add_subparsers(dest="command", required=True)

    def data_dir_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, help="state directory (default ~/.local/share/agencyllm)")

    up = sub.add_parser("up", help="run the whole platform on this machine")
    data_dir_option(up)
    up.add_argument("--host", help="listen address (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="listen port (default 8000)")
    source = up.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="models YAML file")
    source.add_argument("--model", type=Path, help="serve one model directory (its id is the directory name)")
    up.add_argument(
        "--verbose", action="store_true", help="show Ray's, Serve's and the engines' logs here, not in DATA_DIR/logs"
    )
    up.set_defaults(func=cmd_up)
    stack = sub.add_parser("_serve")  # internal: the stack process of `up` (no help: not for users)
    stack.add_argument("--model", type=Path)
    stack.add_argument("--progress-fd", type=int)
    stack.set_defaults(func=cmd_serve)

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    placeholder = model.add_parser("placeholder", help="write the tiny random-weight placeholder model")
    placeholder.add_argument("directory")
    placeholder.set_defaults(func=cmd_placeholder)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    upgrade = db.add_parser("upgrade", help="apply migrations (AGENCYLLM_DATABASE_URL or the embedded server)")
    data_dir_option(upgrade)
    upgrade.set_defaults(func=cmd_db_upgrade)
    from agencyllm.serving.ops import cluster_init

    cluster_init.register(db, data_dir_option)

    from agencyllm.serving.cli import admin as cli_admin
    from agencyllm.serving.cli import audit as cli_audit
    from agencyllm.serving.cli import bundle as cli_bundle

    cli_admin.register(sub)
    cli_audit.register(sub)
    cli_bundle.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
