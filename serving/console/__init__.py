"""The web console at /console (see docs/console.md): server-rendered pages on the admin API's own
rules and store, every asset served from this package."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles

from agencyllm.serving.console import admin_pages, batch_pages, key_pages, signin_pages, staff_pages, usage_pages
from agencyllm.serving.console.web import HERE, PREFIX

router = APIRouter()
for module in (signin_pages, admin_pages, key_pages, usage_pages, staff_pages, batch_pages):
    router.include_router(module.router, prefix=PREFIX)


def mount(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="console-static")


__all__ = ["mount", "router"]
