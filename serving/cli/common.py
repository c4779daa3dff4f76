"""What the command modules share: the error they raise, settings from the command line, the
options several commands take."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from agencyllm.serving.settings import Settings, SettingsError


class CommandError(Exception):
    """A command failed: one line for the user (`error: …` on stderr) and the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class UsageError(typer.BadParameter):
    """Options that cannot go together (or one that must be given): exit 2, like any usage error."""


DataDir = Annotated[Path | None, typer.Option(help="state directory (default ~/.local/share/agencyllm)")]


def settings(**overrides: Any) -> Settings:
    """The platform's settings with the options given; a bad setting stops here, naming the variable."""
    try:
        return Settings(**{name: value for name, value in overrides.items() if value is not None})
    except SettingsError as exc:  # before anything starts
        print(f"agencyllm: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def exclusive(**given: object) -> None:
    """At most one of these options (argparse's mutually exclusive group)."""
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value not in (None, False)]
    if len(named) > 1:
        raise UsageError(f"{named[0]} and {named[1]} cannot be used together")
