"""The admin store's errors: `NotFound`, `Conflict` and `Invalid`, which the admin API maps to
404, 409 and 400; `param` names the offending field."""

from __future__ import annotations


class StoreError(Exception):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class Invalid(StoreError):
    pass
