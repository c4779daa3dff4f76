"""Prompt token counts before a request reaches its engine, with the model's own tokenizer.

Admission reserves prompt + completion budget up front, so the count must not fall short of what
the engine will charge: chat prompts are rendered with the model's chat template, like vLLM does.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

from agencyllm.serving.gateway.errors import OpenAIError

log = logging.getLogger("agencyllm.tokens")

# Per message: a role header and end-of-turn markers where the template could not be rendered.
_FALLBACK_TOKENS_PER_MESSAGE = 8


class PromptCounter:
    def __init__(self, model_path: Path, context_length: int, chat_template: Path | None = None) -> None:
        self.model_path = Path(model_path)
        self.context_length = context_length
        # The model's own template file, as the engine uses it (None: the weights' template).
        self._template = None if chat_template is None else Path(chat_template).read_text()

    @cached_property
    def _tokenizer(self) -> Any:  # transformers is untyped: a PreTrainedTokenizerBase
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)

    def warm(self, *, chat: bool) -> None:
        """Load the tokenizer and compile the chat template now, not in the first request."""
        if chat:
            self.chat([{"role": "user", "content": "Hello."}])
        else:
            self.prompts("Hello.")

    def _encode(self, text: str, *, special: bool) -> int:
        return len(self._tokenizer(text, add_special_tokens=special)["input_ids"])

    def chat(self, messages: list[Any], **template_kwargs: Any) -> int:
        messages = [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in messages]
        try:
            rendered = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, chat_template=self._template, **template_kwargs
            )
            return self._encode(rendered, special=False)
        except Exception as exc:  # a template that rejects the input: the engine will say why
            log.debug("chat template not rendered (%s); counting message text", type(exc).__name__)
            return sum(
                self._encode(_text_of(m.get("content")), special=False) + _FALLBACK_TOKENS_PER_MESSAGE for m in messages
            )

    def prompts(self, prompt: Any) -> list[int]:
        """Token counts of a completions/embeddings `prompt`/`input`: text, texts, ids or lists of ids."""
        if isinstance(prompt, str):
            return [self._encode(prompt, special=True)]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [len(prompt)]
        if isinstance(prompt, list):
            return [self.prompts(p)[0] for p in prompt] or [0]
        return [0]

    def check_fits(self, prompt_tokens: int, param: str) -> None:
        if prompt_tokens >= self.context_length:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {self.context_length} tokens. "
                f"However, your request has {prompt_tokens} input tokens. Please reduce the length of the input.",
                param=param,
                code="context_length_exceeded",
            )


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
