"""The Batch API (`/v1/batches`): create (the input file checked line by line first), retrieve,
list, cancel. The lines then run in the background on every ingress replica
(serving/gateway/batch_worker.py), charged to the batch owner's quotas.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from agencyllm.quotas.batches.files import FileStore
from agencyllm.quotas.batches.jobs import ENDPOINTS, BatchStore
from agencyllm.serving.config import ServingConfig
from agencyllm.serving.gateway.bodies import list_page
from agencyllm.serving.gateway.errors import OpenAIError
from agencyllm.serving.gateway.files import actor, caller, file_not_found
from agencyllm.serving.gateway.guards import parse_body
from agencyllm.serving.gateway.inputs import InvalidInput, check_query, load_json
from agencyllm.serving.gateway.pipeline import Gateway

WINDOW_SECONDS = {"24h": 24 * 3600}
# Validation stops listing problems after this many (the file is refused either way).
MAX_REPORTED_ERRORS = 100


def batch_not_found(batch_id: str) -> OpenAIError:
    return OpenAIError(404, f"No batch found with id '{batch_id[:80]}'.", param="batch_id", code="batch_not_found")


class Batches:
    def __init__(self, gateway: Gateway, serving: ServingConfig) -> None:
        self.gateway = gateway
        self.serving = serving
        self.files = FileStore(gateway.services.database)
        self.store = BatchStore(gateway.services.database, self.files)

    async def create(self, request: Request) -> Response:
        principal = await self.gateway.authenticate(request)
        tenant, subject = caller(principal)
        body = await parse_body(request, dict)
        endpoint, window = body.get("endpoint"), body.get("completion_window")
        if endpoint not in ENDPOINTS:
            raise InvalidInput(f"`endpoint` must be one of: {', '.join(ENDPOINTS)}.", param="endpoint")
        if window not in WINDOW_SECONDS:
            raise InvalidInput("`completion_window` must be 24h.", param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= 16
            and all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items()
            )
        ):
            raise InvalidInput("`metadata`: at most 16 string keys (64 characters) and values (512).", param="metadata")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise InvalidInput("`input_file_id` must be the id of an uploaded file.", param="input_file_id")
        found = await self.files.get(file_id, tenant, subject)
        content = None if found is None else await self.files.content(file_id, tenant, subject)
        if found is None or content is None:
            raise file_not_found(file_id, "input_file_id")
        if found.purpose != "batch":
            raise InvalidInput("The input file must be uploaded with purpose `batch`.", param="input_file_id")
        lines, errors, model = self.check_lines(content, endpoint)
        owner = {
            "subject": principal.subject,
            "username": principal.username,
            "client_id": principal.client_id,
            "key_id": principal.key_id,
            "auth_method": principal.auth_method,
            "roles": sorted(principal.roles),
        }
        batch = await self.store.create(
            tenant=tenant,
            owner=owner,
            endpoint=endpoint,
            input_file_id=file_id,
            window_seconds=WINDOW_SECONDS[window],
            metadata=metadata,
            lines=lines,
            errors=errors,
            model=model,
            audit=actor(principal),
        )
        return JSONResponse(batch.openai())

    def check_lines(
        self, content: bytes, endpoint: str
    ) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]], str | None]:
        """The file's requests (custom_id, body), or what is wrong with it, line by line."""
        limit = self.gateway.settings.batch_max_lines
        errors: list[dict[str, Any]] = []
        lines: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()
        models: set[str] = set()

        def error(line: int, code: str, message: str, param: str | None = None) -> None:
            errors.append({"code": code, "message": f"Line {line}: {message}", "param": param, "line": line})

        text = content.decode("utf-8", errors="replace")
        rows = [(number, raw) for number, raw in enumerate(text.splitlines(), 1) if raw.strip()]
        if not rows:
            error(1, "empty_file", "the file holds no requests.")
        if len(rows) > limit:
            error(rows[limit][0], "too_many_requests", f"a batch holds at most {limit} requests.")
            rows = []
        for number, raw in rows:
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
            try:
                request = load_json(raw.encode())
            except InvalidInput as exc:
                error(number, "invalid_json", f"not valid JSON ({exc.message})")
                continue
            if not isinstance(request, dict):
                error(number, "invalid_request", "each line must be a JSON object.")
                continue
            custom_id, body = request.get("custom_id"), request.get("body")
            if not isinstance(custom_id, str) or not 0 < len(custom_id) <= 512:
                error(number, "invalid_custom_id", "`custom_id` must be a string of 1 to 512 characters.", "custom_id")
            elif custom_id in seen:
                error(
                    number,
                    "duplicate_custom_id",
                    f"custom_id {json.dumps(custom_id)[:80]} was used before.",
                    "custom_id",
                )
            elif request.get("method") != "POST":
                error(number, "invalid_method", "`method` must be POST.", "method")
            elif request.get("url") != endpoint:
                error(number, "mismatched_url", f"`url` must be the batch's endpoint, {endpoint}.", "url")
            elif not isinstance(body, dict):
                error(number, "invalid_body", "`body` must be an object.", "body")
            elif body.get("stream"):
                error(number, "invalid_body", "requests in a batch cannot stream.", "body.stream")
            elif (problem := self._model_problem(body.get("model"), endpoint)) is not None:
                error(number, "model_not_found", problem, "body.model")
            else:
                seen.add(custom_id)
                models.add(self._model_id(body.get("model")))
                lines.append((custom_id, body))
        if errors:
            return [], errors, None
        return lines, [], models.pop() if len(models) == 1 else None

    def _model_id(self, model: Any) -> str:
        if model is None and len(self.serving.models) == 1:
            return self.serving.models[0].id
        return str(model)

    def _model_problem(self, model: Any, endpoint: str) -> str | None:
        spec = self.serving.model(self._model_id(model))
        if spec is None:
            return f"model {json.dumps(model)[:80]} is not served here."
        if (spec.task == "embed") != (endpoint == "/v1/embeddings"):
            return f"model {spec.id} does not serve {endpoint}."
        return None

    async def retrieve(self, batch_id: str, request: Request) -> Response:
        tenant, subject = caller(await self.gateway.authenticate(request))
        batch = await self.store.get(batch_id, tenant, subject)
        if batch is None:
            raise batch_not_found(batch_id)
        return JSONResponse(batch.openai())

    async def cancel(self, batch_id: str, request: Request) -> Response:
        principal = await self.gateway.authenticate(request)
        tenant, subject = caller(principal)
        batch = await self.store.cancel(batch_id, tenant, subject, audit=actor(principal))
        if batch is None:
            raise batch_not_found(batch_id)
        return JSONResponse(batch.openai())

    async def listing(self, request: Request) -> Response:
        tenant, subject = caller(await self.gateway.authenticate(request))
        check_query(request.query_params.multi_items())
        raw = request.query_params.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise InvalidInput("`limit` must be an integer from 1 to 100.", param="limit")
        limit = int(raw)
        found = await self.store.page(tenant, subject, limit=limit + 1, after=request.query_params.get("after"))
        page = [b.openai() for b in found[:limit]]
        return JSONResponse(list_page(page, has_more=len(found) > limit))
