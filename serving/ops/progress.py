"""Start-up progress of `agencyllm up`: the stack process writes its steps on a pipe (`Reporter`),
the supervisor shows them with the seconds since start (`Progress`)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

# Lines on the progress pipe: "<kind> <text>"; `step` lines are shown with the elapsed time,
# `say` lines as messages.
STEP, SAY = "step", "say"


def say(message: str) -> None:
    print(f"agencyllm: {message}", file=sys.stderr, flush=True)


class Progress:
    """One line per start-up step, with the seconds since `agencyllm up` started."""

    def __init__(self, started: float) -> None:
        self.started = started
        self._lock = threading.Lock()

    def step(self, message: str) -> None:
        with self._lock:
            print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    def say(self, message: str) -> None:
        with self._lock:
            say(message)

    def relay(self, pipe) -> None:
        """Show the stack process's lines until it closes its end."""
        with pipe:
            for line in pipe:
                kind, _, text = line.rstrip("\n").partition(" ")
                (self.step if kind == STEP else self.say)(text)


class Reporter:
    """The stack process's side of the progress pipe (or plain output when run on its own)."""

    def __init__(self, fd: int | None) -> None:
        self._pipe = None if fd is None else os.fdopen(fd, "w", buffering=1, encoding="utf-8")

    def step(self, message: str) -> None:
        self._write(STEP, message)

    def close(self) -> None:
        if self._pipe is not None:
            self._pipe.close()

    def say(self, message: str) -> None:
        self._write(SAY, message)

    def _write(self, kind: str, message: str) -> None:
        line = " ".join(message.split())  # one line each
        if self._pipe is None:
            print(
                line if kind == STEP else f"agencyllm: {line}",
                file=sys.stdout if kind == STEP else sys.stderr,
                flush=True,
            )
            return
        with contextlib.suppress(OSError, ValueError):
            self._pipe.write(f"{kind} {line}\n")
