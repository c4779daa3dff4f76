"""The request path, Ray-free, one module per step:

    identity (who) → guards, inputs (what) → tokens (prompt count) → metering (admit: reserve quota)
    → engine port (`engines.Engines`) → streaming (relay, count usage) → metering (settle)

`pipeline.Gateway` runs that line for each OpenAI route, on the machinery of `core.GatewayCore`
(admission, the engine call and its settlement) and over the `services.Services` it shares with
the admin routes. The same line serves the Responses API (`responses`, `response_items`: one chat
completion per response, stored responses in Postgres), tool calling (`tools`), and Files and
Batch (`files`, `batches`; `batch_worker` runs batch lines leased from Postgres, in the batch
traffic class, charged once each). `bodies` prepares request bodies and model cards; `engine_health` keeps
models whose engine went away out of the line until it answers; `errors` is the one place that turns
domain errors into HTTP answers; `deps` holds the typed request dependencies the route layers use.
The engine side tells the gateway what its own exceptions mean through the port (`Engines.is_gone`,
`RequestModels.client_errors`), and the Ray side passes in where the ledger counts its metrics.

May import: `agencyllm.serving.config`, `agencyllm.serving.settings`, `agencyllm.quotas`,
`agencyllm.auth`. Never Ray, vLLM, or `admin`/`console`/`http`/`rayserve`/`ops`/`cli`.
"""
