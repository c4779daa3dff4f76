"""Tool calling on a chat request: whether the model can honour its `tool_choice`, and the tool
definitions the prompt is counted with (the chat template renders them into the prompt, so the
engine charges them; admission must reserve them too).

vLLM decides `none` / `auto` / `required` / a named function from the request (tools without a
`tool_choice` mean `auto`). `required` and named choices are enforced by guided decoding, `auto`
by the model itself, read back by the model's tool-call parser; without a parser vLLM can do
neither, and would answer with its own command-line flags. Here the answer names the model setting.
"""

from __future__ import annotations

from typing import Any

from agencyllm.serving.config import ModelSpec
from agencyllm.serving.gateway.inputs import InvalidInput


def tool_definitions(spec: ModelSpec, body: Any) -> list[dict[str, Any]] | None:
    """The request's tools as the chat template takes them (None without tools), after checking
    that `spec` can serve its `tool_choice` (InvalidInput, a 400 naming the model setting)."""
    if not body.tools:
        return None
    choice = body.tool_choice
    if choice == "none":
        return [tool.model_dump(exclude_none=True) for tool in body.tools]
    wanted = "auto" if choice in (None, "auto") else "required" if choice == "required" else "a named function"
    if spec.tool_call_parser is None:
        raise InvalidInput(
            f"Model '{spec.id}' cannot call tools (tool_choice {wanted}): its configuration sets no "
            "tool_call_parser. Ask the platform's administrators to set the model's tool_call_parser, "
            'or send tool_choice "none".',
            param="tool_choice",
            code="tool_choice_unsupported",
        )
    if wanted == "auto" and not spec.auto_tool_choice:
        raise InvalidInput(
            f"Model '{spec.id}' does not choose tools itself (its auto_tool_choice setting is off): send "
            'tool_choice "required" or a named function, or "none".',
            param="tool_choice",
            code="tool_choice_unsupported",
        )
    return [tool.model_dump(exclude_none=True) for tool in body.tools]
