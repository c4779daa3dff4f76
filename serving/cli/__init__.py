"""The `agencyllm` command line, on Typer: `main` assembles the app from one module per command
group (`up`, `model`, `db`, `tenants`, `quota`, `keys`, `usage`, `login`, `audit`, `retention`,
`feedback`, `bundle`); `admin` is the admin REST API client, `output` the tables and JSON.

The top layer: may import anything in `agencyllm.serving`; nothing imports it.
"""
