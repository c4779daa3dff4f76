"""The request path, Ray-free, one module per step:

    identity (who) → guards, inputs (what) → tokens (prompt count) → metering (admit: reserve quota)
    → engine port (`engines.Engines`) → streaming (relay, count usage) → metering (settle)

`pipeline.Gateway` runs that line for each OpenAI route, over the `services.Services` it shares
with the admin routes; `bodies` prepares request bodies and model cards; `engine_health` keeps
models whose engine went away out of the line until it answers; `errors` is the one place that turns
domain errors into HTTP answers; `deps` holds the typed request dependencies the route layers use.
The engine side tells the gateway what its own exceptions mean through the port (`Engines.is_gone`,
`RequestModels.client_errors`), and the Ray side passes in where the ledger counts its metrics.

May import: `agencyllm.serving.config`, `agencyllm.serving.settings`, `agencyllm.quotas`,
`agencyllm.auth`. Never Ray, vLLM, or `admin`/`console`/`http`/`rayserve`/`ops`/`cli`.
"""
