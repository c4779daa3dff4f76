"""The Responses API (`/v1/responses`) on the gateway's request path.

    authenticate → parse → conversation (stored responses) → chat request → count prompt → admit
    → engine (one chat completion) → settle → the answer as a response, stored if asked

Stored responses live in Postgres (quotas/compliance/responses.py), owned by the tenant and the
caller. They follow the tenant's data governance: a tenant that keeps no content stores nothing
(`store` is off for it; `store: true` and `previous_response_id` are refused with the reason).
One engine call per response, so one usage-ledger row (endpoint `responses`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from fastapi import Request
from pydantic import TypeAdapter, ValidationError
from starlette.responses import JSONResponse, Response

from agencyllm.auth.principal import Principal
from agencyllm.quotas.compliance.responses import ChainTooLong, ResponseStore
from agencyllm.serving.gateway.bodies import body_checks, list_page
from agencyllm.serving.gateway.errors import OpenAIError, validation_error
from agencyllm.serving.gateway.fairshare import Ticket
from agencyllm.serving.gateway.guards import parse_body
from agencyllm.serving.gateway.inputs import InvalidInput, check_query
from agencyllm.serving.gateway.pipeline import Gateway
from agencyllm.serving.gateway.response_items import (
    NamedFunction,
    ResponsesRequest,
    chat_body,
    chat_messages,
    input_items,
    new_id,
    output_items,
    usage_of,
)

_REQUEST = TypeAdapter(ResponsesRequest)
NO_CONTENT_KEPT = (
    "Your organisation keeps no content on this platform (its data-governance setting), so responses "
    "cannot be stored here"
)


def _not_found(response_id: str) -> OpenAIError:
    return OpenAIError(
        404, f"Response with id '{response_id[:80]}' not found.", param="response_id", code="response_not_found"
    )


class Responses:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.store = ResponseStore(gateway.services.database)
        self._content = gateway.services.governance.content

    async def create(self, request: Request) -> Response:
        principal = await self.gateway.authenticate(request)
        body: ResponsesRequest = await parse_body(
            request, _REQUEST, check=body_checks(self.gateway.settings, "responses")
        )
        return await self.respond(principal, body, lambda chat: self.gateway.ticket(principal, request, chat))

    async def respond(
        self,
        principal: Principal,
        body: ResponsesRequest,
        ticket_for: Callable[[Any], Ticket],
        *,
        request_id: str | None = None,
        uncharged: bool = False,
    ) -> Response:
        """One response for `principal`: an HTTP request's, or a batch line's (`request_id`; with
        `uncharged`, a line whose interrupted attempt was charged already)."""
        gateway = self.gateway
        if body.background:
            raise InvalidInput(
                "Background responses are not served here: leave `background` unset.", param="background"
            )
        keeps_content = (
            principal.tenant is not None and await self._content.retention_days(principal.tenant) is not None
        )
        if body.store and not keeps_content:
            raise InvalidInput(f"{NO_CONTENT_KEPT}: send `store: false`.", param="store", code="store_not_allowed")
        store = keeps_content and body.store is not False
        spec = gateway.spec(body.model)
        gateway.require_engine(spec)
        history = await self._history(principal, body.previous_response_id, keeps_content)
        items = input_items(body.input)
        chat = gateway.chat_request(chat_body(body, spec.id, chat_messages(history + items)))
        ticket = ticket_for(chat)

        async def save(response: dict[str, Any]) -> None:
            if store and principal.tenant is not None:
                await self.store.save(
                    response["id"], principal.tenant, principal.subject, body.previous_response_id, items, response
                )

        shape = ResponseShape(describe(body, spec.id, store), save)
        if uncharged:
            return JSONResponse(await shape.whole(await gateway.answer_uncharged(chat, "chat", ticket)))
        return await gateway.run_chat(
            principal,
            chat,
            ticket,
            True,
            endpoint="responses",
            prompt_param="input",
            request_id=request_id,
            shape=shape,
        )

    async def _history(self, principal: Principal, previous: str | None, keeps_content: bool) -> list[dict[str, Any]]:
        """Input and output items of the conversation `previous` ends, oldest first."""
        if previous is None:
            return []
        if not keeps_content:
            raise InvalidInput(
                f"{NO_CONTENT_KEPT}, and `previous_response_id` needs a stored response: send the whole "
                "conversation in `input` instead.",
                param="previous_response_id",
                code="store_not_allowed",
            )
        try:
            chain = await self.store.conversation(previous, principal.tenant or "", principal.subject)
        except ChainTooLong as exc:
            raise InvalidInput(f"{exc}: start a new one.", param="previous_response_id") from None
        if chain is None:
            raise _not_found(previous)
        return [item for stored in chain for item in (*stored.input_items, *stored.response.get("output", []))]

    async def retrieve(self, response_id: str, request: Request) -> Response:
        principal = await self.gateway.authenticate(request)
        stored = await self.store.get(response_id, principal.tenant or "", principal.subject)
        if stored is None:
            raise _not_found(response_id)
        return JSONResponse(stored.response)

    async def delete(self, response_id: str, request: Request) -> Response:
        principal = await self.gateway.authenticate(request)
        if not await self.store.delete(response_id, principal.tenant or "", principal.subject):
            raise _not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def input_items(self, response_id: str, request: Request) -> Response:
        principal = await self.gateway.authenticate(request)
        check_query(request.query_params.multi_items())
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidInput("`order` must be asc or desc.", param="order")
        limit = _limit(request.query_params.get("limit"))
        stored = await self.store.get(response_id, principal.tenant or "", principal.subject)
        if stored is None:
            raise _not_found(response_id)
        items = stored.input_items if order == "asc" else list(reversed(stored.input_items))
        after = request.query_params.get("after")
        if after is not None:
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        return JSONResponse(list_page(page, has_more=len(items) > limit))


def _limit(raw: str | None) -> int:
    if raw is None:
        return 20
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise InvalidInput("`limit` must be an integer from 1 to 100.", param="limit")
    return int(raw)


def describe(body: ResponsesRequest, model: str, store: bool) -> dict[str, Any]:
    """The response object's fields that echo the request."""
    choice = body.tool_choice
    return {
        "id": new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "instructions": body.instructions,
        "metadata": body.metadata or {},
        "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "previous_response_id": body.previous_response_id,
        "tool_choice": choice.model_dump() if isinstance(choice, NamedFunction) else (choice or "auto"),
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
        "text": body.text.model_dump(by_alias=True, exclude_none=True) if body.text else {"format": {"type": "text"}},
        "truncation": "disabled",
        "store": store,
        "background": False,
        "user": body.user,
        "error": None,
        "incomplete_details": None,
    }


class ResponseShape:
    """The engine's chat answer as a response object, or its stream as the Responses events."""

    def __init__(self, base: dict[str, Any], save: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.base = base
        self._save = save
        self._sequence = 0

    def finished(
        self, output: list[dict[str, Any]], usage: dict[str, Any] | None, finish: str | None
    ) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        status = "incomplete" if incomplete else "completed"
        return {**self.base, "status": status, "output": output, "usage": usage_of(usage),
                "incomplete_details": incomplete, "completed_at": int(time.time())}  # fmt: skip

    async def whole(self, chat: dict[str, Any]) -> dict[str, Any]:
        choice = (chat.get("choices") or [{}])[0]
        response = self.finished(
            output_items(choice.get("message") or {}), chat.get("usage"), choice.get("finish_reason")
        )
        await self._save(response)
        return response

    def event(self, kind: str, **data: Any) -> str:
        payload = {"type": kind, **data, "sequence_number": self._sequence}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    async def stream(self, events: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
        started = {**self.base, "status": "in_progress", "output": [], "usage": None}
        yield self.event("response.created", response=started)
        yield self.event("response.in_progress", response=started)
        reader = _ChatStream(self)
        try:
            async for event in events:
                for out in reader.read(event):
                    yield out
                if reader.done:
                    break
        finally:
            await events.aclose()  # ends (and settles) the engine call if the client left
        for out in reader.close():
            yield out
        if reader.error is not None:
            failed = {**self.finished(reader.output, reader.usage, None), "status": "failed", "error": reader.error}
            yield self.event("response.failed", response=failed)
            return
        response = self.finished(reader.output, reader.usage, reader.finish)
        await self._save(response)
        yield self.event(f"response.{response['status']}", response=response)


class _ChatStream:
    """Reads chat completion chunks; says what happened as Responses events."""

    def __init__(self, shape: ResponseShape) -> None:
        self.event = shape.event
        self.output: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.finish: str | None = None
        self.error: dict[str, Any] | None = None
        self.done = False
        self._text: dict[str, Any] | None = None
        self._calls: dict[int, dict[str, Any]] = {}

    def read(self, event: str) -> list[str]:
        if not event.startswith("data: "):
            return []
        data = event[6:].strip()
        if data == "[DONE]":
            self.done = True
            return []
        chunk = json.loads(data)
        if "error" in chunk:
            error = chunk["error"] or {}
            self.error = {"code": error.get("type") or "server_error", "message": error.get("message", "")}
            return []
        self.usage = chunk.get("usage") or self.usage
        out: list[str] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._text_delta(delta["content"])
            for call in delta.get("tool_calls") or []:
                out += self._call_delta(call)
            self.finish = choice.get("finish_reason") or self.finish
        return out

    def _text_delta(self, text: str) -> list[str]:
        out = []
        if self._text is None:
            self._text = {"type": "message", "id": new_id("msg"), "status": "in_progress", "role": "assistant",
                          "content": []}  # fmt: skip
            self.output.append(self._text)
            index = len(self.output) - 1
            out.append(self.event("response.output_item.added", output_index=index, item=dict(self._text)))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self._text["content"].append(part)
            out.append(self.event("response.content_part.added", item_id=self._text["id"], output_index=index,
                                  content_index=0, part=dict(part)))  # fmt: skip
        self._text["content"][0]["text"] += text
        index = self.output.index(self._text)
        out.append(self.event("response.output_text.delta", item_id=self._text["id"], output_index=index,
                              content_index=0, delta=text, logprobs=[]))  # fmt: skip
        return out

    def _call_delta(self, call: dict[str, Any]) -> list[str]:
        out = []
        function = call.get("function") or {}
        item = self._calls.get(call.get("index", 0))
        if item is None:
            item = {"type": "function_call", "id": new_id("fc"), "call_id": call.get("id") or new_id("call"),
                    "name": function.get("name") or "", "arguments": "", "status": "in_progress"}  # fmt: skip
            self._calls[call.get("index", 0)] = item
            self.output.append(item)
            out.append(self.event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)))
        if function.get("arguments"):
            item["arguments"] += function["arguments"]
            out.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                  output_index=self.output.index(item), delta=function["arguments"]))  # fmt: skip
        return out

    def close(self) -> list[str]:
        """The `.done` events of every item, in output order."""
        out = []
        for index, item in enumerate(self.output):
            item["status"] = "completed" if self.error is None else "incomplete"
            if item["type"] == "message":
                part = item["content"][0]
                out.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                      content_index=0, text=part["text"], logprobs=[]))  # fmt: skip
                out.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                      content_index=0, part=part))  # fmt: skip
            else:
                out.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, arguments=item["arguments"], name=item["name"]))  # fmt: skip
            out.append(self.event("response.output_item.done", output_index=index, item=item))
        return out


async def run_response(
    gateway: Gateway, principal: Principal, ticket: Ticket, data: dict[str, Any], *, request_id: str, uncharged: bool
) -> tuple[int, Any]:
    """A batch line of the Responses API: its status and body (never streamed)."""
    body_checks(gateway.settings, "responses")(data)
    try:
        body = _REQUEST.validate_python({**data, "stream": False})
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False, include_input=False)) from None
    answer = await Responses(gateway).respond(
        principal, body, lambda _: ticket, request_id=request_id, uncharged=uncharged
    )
    return answer.status_code, json.loads(bytes(answer.body))
