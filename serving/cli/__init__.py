"""The `agencyllm` command line: `main` (up, model, db), `admin` (tenants, quota, keys, usage,
login over the admin REST API), `audit` (audit, retention, feedback, model card), `bundle`.

The top layer: may import anything in `agencyllm.serving`; nothing imports it.
"""
