"""`agencyllm db upgrade|wait|bootstrap-admin`: the schema, the schema gate and the first admin key.

`db wait` (an init container of every Ray pod on a cluster) returns once the schema is at this
release's head. `db bootstrap-admin --new-key` prints a key for the agency to keep in a Secret;
the migrations Job registers it with `--key-file` (docs: the Helm install).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from agencyllm.serving.cli.common import DataDir, UsageError, exclusive, settings

app = typer.Typer(help="database schema", no_args_is_help=True)


@app.command("upgrade", help="apply migrations (AGENCYLLM_DATABASE_URL or the embedded server)")
def upgrade(data_dir: DataDir = None) -> int:
    from agencyllm.quotas.db import upgrade_schema
    from agencyllm.serving.ops.local_db import database_url

    url, postgres = database_url(settings(data_dir=data_dir))
    try:
        upgrade_schema(url)
        print("Database schema is up to date.")
    finally:
        if postgres is not None:
            postgres.stop()
    return 0


@app.command("wait", help="wait until the database schema is current (AGENCYLLM_DATABASE_URL)")
def wait(
    timeout: Annotated[float, typer.Option(help="seconds to wait before failing (default 600)")] = 600,
    interval: Annotated[float, typer.Option(help="seconds between checks (default 2)")] = 2,
) -> int:
    from agencyllm.serving.ops.cluster_init import wait_for_current_schema
    from agencyllm.serving.settings import Settings

    database_url = Settings().database_url
    if database_url is None:
        print(
            "agencyllm: db wait needs AGENCYLLM_DATABASE_URL (there is nothing to wait for otherwise)", file=sys.stderr
        )
        return 2
    ok = asyncio.run(wait_for_current_schema(database_url.get_secret_value(), timeout, interval))
    return 0 if ok else 1


@app.command("bootstrap-admin", help="register the first platform-admin key (cluster installs)")
def bootstrap_admin(
    data_dir: DataDir = None,
    key_file: Annotated[Path | None, typer.Option(help="file holding the key to register")] = None,
    new_key: Annotated[bool, typer.Option("--new-key", help="print a newly generated key (stores nothing)")] = False,
) -> int:
    from agencyllm.serving.ops import cluster_init
    from agencyllm.serving.ops.local_db import database_url

    exclusive(key_file=key_file, new_key=new_key)
    if new_key:
        print(cluster_init.new_key())
        return 0
    if key_file is None:
        raise UsageError("one of --key-file and --new-key is required")
    try:
        key = key_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        print(f"agencyllm: cannot read {key_file}: {exc.strerror}", file=sys.stderr)
        return 2
    url, postgres = database_url(settings(data_dir=data_dir))
    try:
        added = asyncio.run(cluster_init.register_admin_key_at(url, key))
    except cluster_init.BootstrapKeyError as exc:
        print(f"agencyllm: {exc}", file=sys.stderr)
        return 1
    finally:
        if postgres is not None:
            postgres.stop()
    print("Bootstrap platform-admin key registered." if added else "Bootstrap platform-admin key already registered.")
    return 0
