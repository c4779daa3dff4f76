"""The HTTP application each replica serves: `app.create_app` (error shape, limits, CORS, the admin,
feedback and metrics routes, the console) and `openai.http_app(gateway)`, which adds the OpenAI
and health routes, each one line into the gateway.

May import: `admin`, `console`, `gateway` and what is below them. Never Ray or vLLM.
"""
