"""The Files API (`/v1/files`): uploads for batches (and `user_data`), stored in Postgres, owned by
the tenant and the uploader, within the upload size limit and the tenant's storage quota."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response

from agencyllm.auth.principal import Principal
from agencyllm.quotas.audit import Actor
from agencyllm.quotas.batches.files import UPLOAD_PURPOSES, FileStore, StorageFull
from agencyllm.serving.gateway.bodies import list_page
from agencyllm.serving.gateway.errors import OpenAIError
from agencyllm.serving.gateway.inputs import InvalidInput, check_query, check_text
from agencyllm.serving.gateway.pipeline import Gateway

# OpenAI's bounds on `expires_after.seconds`, and how long batch input files live by default.
MIN_EXPIRY, MAX_EXPIRY = 3600, 30 * 24 * 3600
BATCH_FILE_DAYS = 30


def file_not_found(file_id: str, param: str = "file_id") -> OpenAIError:
    return OpenAIError(404, f"No such File object: {file_id[:80]}", param=param, code="file_not_found")


def caller(principal: Principal) -> tuple[str, str]:
    if principal.tenant is None:
        raise OpenAIError(403, "Your account is not assigned to a tenant, so it cannot use files.")
    return principal.tenant, principal.subject


def actor(principal: Principal) -> Actor:
    """The caller as the audit records of their file and batch changes name them."""
    return Actor(principal.subject, principal.username, principal.client_id, principal.key_id)


class Files:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.store = FileStore(gateway.services.database)

    async def upload(self, request: Request) -> Response:
        principal = await self.gateway.authenticate(request)
        tenant, subject = caller(principal)
        settings = self.gateway.settings
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise InvalidInput("Upload files as multipart/form-data with `file` and `purpose`.", param="file")
        async with request.form(max_files=1, max_fields=8) as form:
            purpose, upload = form.get("purpose"), form.get("file")
            if not isinstance(purpose, str) or purpose not in UPLOAD_PURPOSES:
                raise InvalidInput(f"`purpose` must be one of: {', '.join(UPLOAD_PURPOSES)}.", param="purpose")
            if not isinstance(upload, UploadFile):
                raise InvalidInput("Attach the file as the `file` part.", param="file")
            content = await upload.read(settings.file_max_bytes + 1)
            filename = (upload.filename or "upload").rsplit("/", 1)[-1][:255]
            expires_at = _expiry(form.get("expires_after[anchor]"), form.get("expires_after[seconds]"), purpose)
        if len(content) > settings.file_max_bytes:
            raise OpenAIError(
                413, f"The file exceeds the limit of {settings.file_max_bytes} bytes.", code="file_too_large"
            )
        if not content:
            raise InvalidInput("The file is empty.", param="file")
        check_text(filename, "file")
        if purpose == "batch":
            _check_jsonl(content)
        try:
            stored = await self.store.save(
                tenant,
                subject,
                purpose,
                filename,
                content,
                expires_at=expires_at,
                tenant_limit=settings.file_storage_bytes_per_tenant,
                audit=actor(principal),
            )
        except StorageFull as exc:
            raise OpenAIError(413, f"{exc}: delete files you no longer need.", code="storage_quota_exceeded") from None
        return JSONResponse(stored.openai())

    async def listing(self, request: Request) -> Response:
        tenant, subject = caller(await self.gateway.authenticate(request))
        query = request.query_params
        check_query(query.multi_items())
        limit = _bounded(query.get("limit"), 10_000, 10_000, "limit")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidInput("`order` must be asc or desc.", param="order")
        found = await self.store.page(
            tenant,
            subject,
            purpose=query.get("purpose"),
            limit=limit + 1,
            after=query.get("after"),
            ascending=order == "asc",
        )
        page = [f.openai() for f in found[:limit]]
        return JSONResponse(list_page(page, has_more=len(found) > limit))

    async def retrieve(self, file_id: str, request: Request) -> Response:
        tenant, subject = caller(await self.gateway.authenticate(request))
        found = await self.store.get(file_id, tenant, subject)
        if found is None:
            raise file_not_found(file_id)
        return JSONResponse(found.openai())

    async def content(self, file_id: str, request: Request) -> Response:
        tenant, subject = caller(await self.gateway.authenticate(request))
        data = await self.store.content(file_id, tenant, subject)
        if data is None:
            raise file_not_found(file_id)
        return Response(data, media_type="application/octet-stream")

    async def delete(self, file_id: str, request: Request) -> Response:
        principal = await self.gateway.authenticate(request)
        tenant, subject = caller(principal)
        if not await self.store.delete(file_id, tenant, subject, audit=actor(principal)):
            raise file_not_found(file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})


def _bounded(raw: str | None, default: int, high: int, param: str) -> int:
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise InvalidInput(f"`{param}` must be an integer from 1 to {high}.", param=param)
    return int(raw)


def _expiry(anchor: Any, seconds: Any, purpose: str) -> datetime | None:
    now = datetime.now(UTC)
    if anchor is None and seconds is None:
        return now + timedelta(days=BATCH_FILE_DAYS) if purpose == "batch" else None
    if anchor != "created_at":
        raise InvalidInput("`expires_after[anchor]` must be created_at.", param="expires_after.anchor")
    if not isinstance(seconds, str) or not seconds.isdigit() or not MIN_EXPIRY <= int(seconds) <= MAX_EXPIRY:
        raise InvalidInput(
            f"`expires_after[seconds]` must be from {MIN_EXPIRY} to {MAX_EXPIRY}.", param="expires_after.seconds"
        )
    return now + timedelta(seconds=int(seconds))


def _check_jsonl(content: bytes) -> None:
    """A batch input file is UTF-8 text (its lines are checked when a batch is created from it)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("A batch file must be UTF-8 JSONL text; this one is not.", param="file") from None
    if "\x00" in text:
        raise InvalidInput("A batch file must be JSONL text; this one holds NUL bytes.", param="file")
