"""Form parsing shared by the console's admin pages: fields, numbers, problems and tenant paths."""

from __future__ import annotations

from urllib.parse import quote

from pydantic import ValidationError

from agencyllm.quotas import store
from agencyllm.quotas.models import MAX_SHARE
from agencyllm.serving.console.web import PREFIX
from agencyllm.serving.gateway.errors import OpenAIError

ADMIN_ERRORS = (OpenAIError, store.StoreError, ValidationError)


def tenant_path(name: str, *rest: str) -> str:
    return "/".join([f"{PREFIX}/tenants/{quote(name, safe='')}", *rest])


def text(form, name: str) -> str | None:
    value = str(form.get(name) or "").strip()
    return value or None


class FormProblem(Exception):
    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message


def whole_number(form, name: str) -> int | None:
    raw = (text(form, name) or "").replace(",", "").replace("_", "").replace(" ", "")
    if not raw:
        return None
    if not raw.isdigit():
        raise FormProblem(name, "Enter a whole number such as 2000000, or leave it empty for no limit.")
    value = int(raw)
    if value > store.QUOTA_MAXIMUMS.get(name, 3650):
        raise FormProblem(name, f"Enter a number no larger than {store.QUOTA_MAXIMUMS.get(name, 3650):,}.")
    return value


def share_number(form, name: str = "share") -> float | None:
    raw = (text(form, name) or "").replace(" ", "")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_SHARE:
        raise FormProblem(name, f"Enter a number above 0 and at most {MAX_SHARE}, such as 2, or leave it empty for 1.")
    return value
