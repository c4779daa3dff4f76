"""The `agencyllm` command: one Typer app whose sub-apps live in this package, one module each.

`main(argv)` returns the exit code, as the console script and the tests call it. Usage errors (an
unknown option, a bad choice) print Typer's message and raise SystemExit(2), as argparse did; a
command's `CommandError` prints `error: …` on stderr and exits with its code.
"""

from __future__ import annotations

import logging
import sys

import typer
from typer import rich_utils

from agencyllm.serving.cli import audit, bundle, db, feedback, keys, model, quota, retention, tenants
from agencyllm.serving.cli.common import CommandError
from agencyllm.serving.cli.login import login
from agencyllm.serving.cli.up import serve, up
from agencyllm.serving.cli.usage import usage


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="agencyllm", help="Private OpenAI-compatible LLM platform.", no_args_is_help=True, add_completion=True
    )
    app.command("up")(up)
    app.command("_serve", hidden=True)(serve)  # the stack process of `up`: not for users
    app.add_typer(model.app, name="model")
    app.add_typer(db.app, name="db")
    app.add_typer(tenants.app, name="tenants")
    app.add_typer(quota.app, name="quota")
    app.add_typer(keys.app, name="keys")
    app.command("usage", help="usage totals")(usage)
    app.command("login", help="sign in with Keycloak (device code)")(login)
    app.add_typer(audit.app, name="audit", help="verify and export the audit trail")
    app.add_typer(retention.app, name="retention")
    app.add_typer(feedback.app, name="feedback")
    app.add_typer(bundle.app, name="bundle")
    return app


def build_parser() -> typer.main.TyperGroup:
    """The command tree (click's, under Typer): what `main` runs and what the tests walk."""
    return typer.main.get_command(build_app())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = build_parser().main(args=argv, prog_name="agencyllm", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors (click's, under Typer)
        rich_utils.rich_format_error(exc)  # type: ignore[arg-type]
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
