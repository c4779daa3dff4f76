"""The request path, Ray-free, one module per step:

    identity (who) → guards, inputs (what) → tokens (prompt count) → metering (admit: reserve quota)
    → engine port (`pipeline.Engines`) → streaming (relay, count usage) → metering (settle)

`pipeline.Gateway` runs that line for each OpenAI route; `errors` is the one place that turns
domain errors into HTTP answers; `deps` holds the typed request dependencies the route layers use.

May import: `agencyllm.serving.config`, `agencyllm.serving.settings`, `agencyllm.quotas`,
`agencyllm.auth`. Never Ray, vLLM, or `admin`/`console`/`http`/`rayserve`/`ops`/`cli`.
"""
