"""Everything that imports Ray or vLLM: the Serve application builder (`app.build_app`), the
ingress deployment that serves the gateway (`ingress`), the engines (`engines.FairLLMServer`),
the direct-ingress port (`ray_env`), CPU placement, output batching, the start-up heap freeze,
and every use of Ray Serve LLM's internals (`hooks`, pinned by tests/test_ray_hooks.py).

May import: `http` and everything below it. Kept free of eager imports: `offline` is read before
Ray starts, without importing vLLM.
"""
