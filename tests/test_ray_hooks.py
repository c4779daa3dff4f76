"""Contract of the Ray Serve LLM internals agencyllm relies on (serving/rayserve/hooks.py), against
the Ray release pinned in pyproject.toml. Nothing starts Ray: the classes are only inspected.

A failure here means the pinned Ray changed a hook: adapt hooks.py (and this contract) before
upgrading, or the replicas would silently fall back to Ray's own behaviour or fail at start."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
from ray.serve.llm import LLMConfig, LLMServer

from agencyllm.serving.rayserve.hooks import CoalescingLLMServer

# name -> the parameters (names, kinds, defaults; annotations aside) Ray's method had when hooks.py
# was written.
EXPECTED = {
    "_batch_output_stream": "(self, generator)",
    "_get_batch_interval_ms": "(self, stream=True)",
}


def _shape(function) -> str:
    parameters = inspect.signature(function).parameters.values()
    return str(inspect.Signature([p.replace(annotation=inspect.Parameter.empty) for p in parameters]))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_llm_server_hooks_keep_their_name_and_signature(name):
    hook = getattr(LLMServer, name, None)
    assert callable(hook), f"Ray changed LLMServer.{name}: it no longer exists (see serving/rayserve/hooks.py)"
    assert _shape(hook) == EXPECTED[name], (
        f"Ray changed LLMServer.{name}: its signature is now {_shape(hook)}, hooks.py expects {EXPECTED[name]}"
    )


def test_the_llm_server_still_batches_its_streams_through_the_hook():
    source = inspect.getsource(LLMServer._run_request)  # noqa: SLF001
    assert "self._batch_output_stream(" in source, (
        "Ray changed LLMServer._batch_output_stream: LLMServer._run_request no longer calls it, "
        "so CoalescingLLMServer's first-chunk-at-once grouping would be skipped"
    )


def test_the_coalescing_server_overrides_the_hook_with_the_same_signature():
    ours = CoalescingLLMServer._batch_output_stream  # noqa: SLF001
    assert ours is not LLMServer._batch_output_stream  # noqa: SLF001
    assert _shape(ours) == EXPECTED["_batch_output_stream"]


def test_the_callback_context_still_has_run_init_node():
    create = getattr(LLMConfig, "get_or_create_callback", None)
    assert callable(create), "Ray changed LLMConfig.get_or_create_callback: it no longer exists"
    returned = [t for t in typing.get_args(inspect.signature(create).return_annotation) if t is not type(None)]
    assert len(returned) == 1, f"Ray changed LLMConfig.get_or_create_callback: it returns {returned}"
    ctx = returned[0](llm_config=None).ctx
    fields = {f.name: f.default for f in dataclasses.fields(ctx)} if dataclasses.is_dataclass(ctx) else {}
    assert fields.get("run_init_node") is True, (
        f"Ray changed the callback context's run_init_node: its fields are now {sorted(fields)}"
    )
