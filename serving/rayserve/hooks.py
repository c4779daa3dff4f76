"""Every place agencyllm relies on Ray Serve LLM's internals, in one module, each pinned by
tests/test_ray_hooks.py against the exact Ray release in pyproject.toml (a Ray upgrade that
renames or reshapes one fails there, with its name, before anything starts).

- `LLMServer._batch_output_stream(generator)` and `LLMServer._get_batch_interval_ms()`: how a
  replica groups its engine's streamed chunks into deployment-handle items. Every handle item
  costs the same Python CPU in Ray Serve, so grouping is what keeps a streaming replica fast;
  Ray's own grouping waits one whole interval before the first item, which adds the interval to
  every request's time to first token. No public API replaces the grouping: the public
  `stream_batching_interval_ms` only sets Ray's interval, and at 0 Ray still wraps each chunk in
  an item of its own, so regrouping in the public `chat`/`completions` would pay one more
  generator hop per chunk on the replica's busiest loop. `CoalescingLLMServer` overrides the
  hook with the leading-edge grouping of `stream_batch.coalesce` (first chunk at once).
- `LLMConfig.get_or_create_callback().ctx.run_init_node`: a public method and a documented
  field, but the callback classes behind them are not exported from a public module. Setting it
  to False skips Ray Serve LLM's per-node download task for weights already on a local path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray.serve.llm import LLMConfig, LLMServer

from agencyllm.serving.rayserve.stream_batch import coalesce


class CoalescingLLMServer(LLMServer):
    """`LLMServer` whose streamed output leaves as soon as the engine makes its first chunk; later
    chunks made within the model's `stream_coalesce_ms` travel as one handle item."""

    def _batch_output_stream(self, generator: AsyncIterator[Any]) -> AsyncIterator[list[Any]]:
        # Ray Serve LLM private hook (see the module docstring); pinned by tests/test_ray_hooks.py.
        return coalesce(generator, self._get_batch_interval_ms())


def skip_node_download(llm_config: LLMConfig) -> None:
    """Weights on a local path need no download: skip Ray Serve LLM's per-node download task,
    which starts a worker process (importing torch and transformers) only to return the path."""
    source = llm_config.model_loading_config.model_source
    # A KV connector changes the engine arguments after this point: leave those configs alone.
    if isinstance(source, str) and Path(source).is_dir() and "kv_transfer_config" not in llm_config.engine_kwargs:
        llm_config.get_or_create_callback().ctx.run_init_node = False
