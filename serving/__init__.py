"""The serving side of agencyllm, in layers (high → low; each may import only what is below it,
enforced by import-linter, see `[tool.importlinter]` in pyproject.toml):

- `cli`       the `agencyllm` command line (Typer): talks to `ops` and to the admin REST API;
- `ops`       running the platform: supervisor, local stack, cluster init, air-gap bundle;
- `rayserve`  everything that imports Ray or vLLM: the Serve application, ingress deployment,
              engines (`FairLLMServer`), Ray environment and placement;
- `http`      the FastAPI application a replica serves: OpenAI routes, admin, console, metrics;
- `console`   the web console's pages;
- `admin`     the admin REST API's routes (`/admin/v1`) and the feedback routes;
- `gateway`   the request path as plain Python: identity → inputs → admission → engine port →
              streaming → settlement; no Ray, no vLLM, no routes of the layers above;
- `config`, `settings`  the models config and the one `Settings` object.

Below `serving` sit `agencyllm.quotas` (ledger, store, compliance records in Postgres) and
`agencyllm.auth` (identity, which imports nothing internal).
"""
