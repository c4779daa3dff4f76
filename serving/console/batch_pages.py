"""The batches page: a tenant's batch jobs (status, line counts, tokens), for its admins (every
batch of the tenant) and its staff (their own)."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from agencyllm.quotas.batches.files import FileStore
from agencyllm.quotas.batches.jobs import BatchStore
from agencyllm.quotas.db import Database
from agencyllm.serving.console.web import ConsoleRoute, CurrentViewer, render
from agencyllm.serving.gateway.deps import get_database

router = APIRouter(route_class=ConsoleRoute, include_in_schema=False)
SHOWN = 100


@router.get("/batches")
async def batches_page(
    request: Request,
    viewer: CurrentViewer,
    database: Annotated[Database, Depends(get_database)],
    tenant: str | None = None,
) -> Response:
    # A platform admin looks at any tenant (`?tenant=`); everyone else at their own.
    tenant = (tenant or None) if viewer.is_platform_admin else viewer.principal.tenant
    everyone = viewer.is_platform_admin or viewer.administers_tenant
    rows = []
    if tenant is not None:
        store = BatchStore(database, FileStore(database))
        subject = None if everyone else viewer.principal.subject
        for batch in await store.page(tenant, subject, limit=SHOWN, after=None):
            described = batch.openai()
            owner = json.loads(batch.row["owner"])
            rows.append({**described, "owner": owner.get("username") or owner["subject"]})
    return render(
        request, "batches.html", viewer, title="Batches", batches=rows, tenant=tenant, everyone=everyone, shown=SHOWN
    )
