"""Tool calling on a chat request: whether the model can honour its `tool_choice`, and the tool
definitions the prompt is counted with (the chat template renders them into the prompt, so the
engine charges them; admission must reserve them too).

vLLM decides `none` / `auto` / `required` / a named function from the request (tools without a
`tool_choice` mean `auto`). `required` and named choices are enforced by guided decoding on every
model (rayserve/engines.py gives a model without a parser one that needs nothing of it); `auto` is
the model's own decision, read back by its tool-call parser, so a model without one refuses it
here with a 400 that names the model setting (vLLM would name its command-line flags).
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
    definitions = [tool.model_dump(exclude_none=True) for tool in body.tools]
    if body.tool_choice not in (None, "auto"):
        return definitions  # none, required or a named function: every model serves them
    if spec.tool_call_parser is None:
        raise InvalidInput(
            f"Model '{spec.id}' cannot decide itself whether to call a tool (tool_choice auto, the default "
            'when tools are sent): its configuration sets no tool_call_parser. Send tool_choice "required" '
            'or a named function (enforced for every model), or "none"; or ask the platform\'s administrators '
            "to set the model's tool_call_parser.",
            param="tool_choice",
            code="tool_choice_unsupported",
        )
    if not spec.auto_tool_choice:
        raise InvalidInput(
            f"Model '{spec.id}' does not choose tools itself (its auto_tool_choice setting is off): send "
            'tool_choice "required" or a named function, or "none".',
            param="tool_choice",
            code="tool_choice_unsupported",
        )
    return definitions
