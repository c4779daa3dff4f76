"""Compliance commands of the `agencyllm` CLI:

    agencyllm audit verify                      walk the hash chain; exit 1 naming the first bad record
    agencyllm audit export --since 24h          JSON lines for a SIEM (file, stdout and/or syslog)
    agencyllm retention run                     purge what outlived its retention, audited
    agencyllm feedback list|export              the feedback channel, over the admin API
    agencyllm model card MODEL                  what the platform knows about a served model

`audit` and `retention` talk to the database directly and find it like every other command:
`AGENCYLLM_DATABASE_URL`, else the embedded server under `--data-dir`. Run `audit` as a user in
the `agencyllm_audit_reader` role (docs/compliance/audit.md).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import logging.handlers
import socket
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SYSLOG_FACILITIES = (
    "auth",
    "authpriv",
    "daemon",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
    "user",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _with_database(args: argparse.Namespace, work: Callable[[Any], Awaitable[int]]) -> int:
    """Run `work(conn)` on one asyncpg connection to the platform's database."""
    import asyncpg

    from agencyllm.quotas.db import asyncpg_connect_args
    from agencyllm.serving.cli.main import _settings
    from agencyllm.serving.ops.local_db import database_url

    url, postgres = database_url(_settings(args))

    async def run() -> int:
        conn = await asyncpg.connect(**asyncpg_connect_args(url))
        try:
            return await work(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(run())
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"error: database: {exc}", file=sys.stderr)
        return 1
    finally:
        if postgres is not None:
            postgres.stop()


# --- audit --------------------------------------------------------------------------------------


def audit_verify(args: argparse.Namespace) -> int:
    from agencyllm.quotas.audit import verify_chain

    async def work(conn) -> int:
        result = await verify_chain(conn)
        if args.format == "json":
            print(
                json.dumps(
                    {
                        "ok": result.ok,
                        "records": result.records,
                        "first_seq": result.first_seq,
                        "last_seq": result.last_seq,
                        "head_hash": result.head_hash,
                        "bad_seq": result.bad_seq,
                        "problem": result.problem,
                    }
                )
            )
        else:
            print(result.summary())
        return 0 if result.ok else 1

    return _with_database(args, work)


def syslog_handler(target: str, facility: str) -> logging.Handler:
    """`/dev/log` (a local socket path) or `host:port` (UDP; `tcp://host:port` for TCP)."""
    code = logging.handlers.SysLogHandler.facility_names[facility]
    if target.startswith("/"):
        return logging.handlers.SysLogHandler(address=target, facility=code)
    kind = socket.SOCK_DGRAM
    if target.startswith("tcp://"):
        kind, target = socket.SOCK_STREAM, target.removeprefix("tcp://")
    target = target.removeprefix("udp://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"syslog target must be /path/to/socket or host:port, not {target!r}")
    return logging.handlers.SysLogHandler(address=(host, int(port)), facility=code, socktype=kind)


def audit_export(args: argparse.Namespace) -> int:
    from agencyllm.quotas.audit import export_records, parse_since

    now = datetime.now(UTC)
    try:
        since = parse_since(args.since, now)
        until = parse_since(args.until, now) if args.until else now
    except ValueError:
        print("error: --since/--until take YYYY-MM-DD, an ISO date-time, or 30m/24h/7d", file=sys.stderr)
        return 2
    syslog = None
    if args.syslog:
        try:
            handler = syslog_handler(args.syslog, args.syslog_facility)
        except (OSError, ValueError) as exc:
            print(f"error: syslog: {exc}", file=sys.stderr)
            return 2
        handler.setFormatter(logging.Formatter("agencyllm-audit: %(message)s"))
        syslog = logging.Logger("agencyllm.audit.export")
        syslog.addHandler(handler)
    out = open(args.output, "w", encoding="utf-8") if args.output else (None if syslog else sys.stdout)

    async def work(conn) -> int:
        count = 0
        async for record in export_records(conn, since, until, args.tenant):
            line = json.dumps(record, separators=(",", ":"), sort_keys=True)
            if out is not None:
                out.write(line + "\n")
            if syslog is not None:
                syslog.info(line)
            count += 1
        print(f"exported {count} audit records from {since.isoformat()} to {until.isoformat()}", file=sys.stderr)
        return 0

    try:
        return _with_database(args, work)
    finally:
        if out is not None and out is not sys.stdout:
            out.close()
        if syslog is not None:
            for handler in syslog.handlers:
                handler.close()


# --- retention ----------------------------------------------------------------------------------


def retention_run(args: argparse.Namespace) -> int:
    from agencyllm.quotas.compliance.retention import Retention
    from agencyllm.quotas.db import Database
    from agencyllm.serving.cli.main import _settings
    from agencyllm.serving.ops.local_db import database_url

    settings = _settings(args)
    try:
        retention_args = {
            "audit_days": args.audit_days or settings.audit_retention_days,
            "ledger_days": args.ledger_days or settings.ledger_retention_days,
        }
        url, postgres = database_url(settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        database = Database(url, pool_size=1)
        try:
            report = await Retention(database, **retention_args).run()
        finally:
            await database.dispose()
        print(report.summary())
        return 0

    try:
        return asyncio.run(run())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if postgres is not None:
            postgres.stop()


# --- feedback (over the admin API) -----------------------------------------------------------------

FEEDBACK_COLUMNS = ("id", "created_at", "tenant", "username", "rating", "category", "request_id", "comment")


def feedback_list(args: argparse.Namespace) -> int:
    from agencyllm.serving.cli import admin as cli_admin

    params = {
        "tenant": args.tenant,
        "category": args.category,
        "from": args.since,
        "to": args.until,
        "limit": args.limit,
        "format": args.format if args.format in ("jsonl", "csv") else "json",
    }
    response = cli_admin.call(args, "GET", "/feedback", params={k: v for k, v in params.items() if v is not None})
    if args.format in ("jsonl", "csv"):
        sys.stdout.write(response.text)
    elif args.format == "json":
        print(json.dumps(response.json(), indent=2))
    else:
        rows = response.json()
        print(cli_admin.table(rows, FEEDBACK_COLUMNS) if rows else "(no feedback)")
    return 0


# --- model card ---------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card_data(spec: Any, *, cpu: bool) -> dict[str, Any]:
    from agencyllm.serving.ops.placeholder import is_placeholder
    from agencyllm.serving.rayserve.engines import llm_config

    path = Path(spec.path)
    weights = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    files = [{"file": str(p.relative_to(path)), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in weights]
    combined = hashlib.sha256("".join(f"{f['sha256']}  {f['file']}\n" for f in files).encode())
    config: dict[str, Any] = {}
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    tokenizer_config = {}
    if (path / "tokenizer_config.json").is_file():
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {
        "id": spec.id,
        "task": spec.task,
        "placeholder": is_placeholder(path),
        "weights_path": str(path.resolve()),
        "weights": files,
        "weights_sha256": combined.hexdigest() if files else None,
        "architecture": (config.get("architectures") or [None])[0],
        "model_type": config.get("model_type"),
        "parameters": {
            k: config.get(k)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if config.get(k) is not None
        },
        "context_length": spec.context_length(),
        "chat_template": bool(tokenizer_config.get("chat_template")),
        "engine_args": llm_config(spec, cpu=cpu).engine_kwargs,
        "replicas": spec.replicas.model_dump(),
        "accelerator": spec.accelerator.model_dump(),
        "generated_at": datetime.now(UTC).isoformat(),
    }


_TO_COMPLETE = "_(agency to complete)_"


def model_card_markdown(card: dict[str, Any]) -> str:
    lines = [f"# Model card: {card['id']}", ""]
    if card["placeholder"]:
        lines += ["> **Placeholder model**: random weights, gibberish output. Not for staff use.", ""]
    lines += [
        "## What the platform knows",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| model id (what staff send as `model`) | `{card['id']}` |",
        f"| task | {card['task']} |",
        f"| weights path | `{card['weights_path']}` |",
        f"| weights sha256 (over the files below) | `{card['weights_sha256']}` |",
        f"| architecture | {card['architecture']} ({card['model_type']}) |",
        f"| context length (tokens) | {card['context_length']} |",
        f"| chat template | {'yes' if card['chat_template'] else 'no'} |",
        f"| engine arguments (vLLM) | `{json.dumps(card['engine_args'], sort_keys=True)}` |",
        f"| replicas | `{json.dumps(card['replicas'])}` |",
        f"| accelerator | `{json.dumps(card['accelerator'])}` |",
        f"| card generated (UTC) | {card['generated_at']} |",
        "",
        "### Weight files",
        "",
        "| file | bytes | sha256 |",
        "| --- | --- | --- |",
        *[f"| `{f['file']}` | {f['bytes']} | `{f['sha256']}` |" for f in card["weights"]],
        "",
        "## What the agency records",
        "",
        f"- Provider, version and licence of the weights: {_TO_COMPLETE}",
        f"- Intended uses and users; uses that are out of scope: {_TO_COMPLETE}",
        f"- Training data summary as published by the provider: {_TO_COMPLETE}",
        f"- Evaluation before deployment (tasks, results, bias testing): {_TO_COMPLETE}",
        f"- Known limitations and risks; human oversight in place: {_TO_COMPLETE}",
        f"- Use-case inventory entries that rely on this model: {_TO_COMPLETE}",
        "",
    ]
    return "\n".join(lines)


def model_card(args: argparse.Namespace) -> int:
    from agencyllm.serving.cli.main import _settings
    from agencyllm.serving.config import ConfigError, cpu_only
    from agencyllm.serving.ops.stack import resolve_models

    try:
        settings = _settings(args)
        serving, _ = resolve_models(settings, args.model_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = serving.model(args.model)
    if spec is None:
        known = ", ".join(m.id for m in serving.models)
        print(f"error: no model '{args.model}' in the configuration (known: {known})", file=sys.stderr)
        return 1
    card = model_card_data(spec, cpu=cpu_only(settings.force_cpu))
    text = json.dumps(card, indent=2) if args.format == "json" else model_card_markdown(card)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0


# --- wiring -------------------------------------------------------------------------------------


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="state directory (default ~/.local/share/agencyllm)")


def _subcommands(parser: argparse.ArgumentParser) -> Any:
    for action in parser._actions:  # argparse keeps no public handle on a parser's subcommands
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="model_command", required=True)


def register(sub: Any) -> None:
    """Add `audit`, `retention`, `feedback` and `model card` to the main CLI."""
    from agencyllm.serving.cli import admin as cli_admin

    audit = sub.add_parser(
        "audit",
        help="verify and export the audit trail",
        description="verify and export the tamper-evident audit trail",
    )
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    p = audit_sub.add_parser("verify", help="walk the hash chain; exit 1 naming the first bad record")
    _data_dir_option(p)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=audit_verify)
    p = audit_sub.add_parser("export", help="audit records as JSON lines (for a SIEM)")
    _data_dir_option(p)
    p.add_argument(
        "--since",
        required=True,
        metavar="WHEN",
        help="YYYY-MM-DD, ISO date-time (UTC unless given), or 30m/24h/7d back from now",
    )
    p.add_argument("--until", metavar="WHEN", help="exclusive end (default: now)")
    p.add_argument("--tenant", help="only this tenant's records")
    p.add_argument("--format", choices=("jsonl",), default="jsonl")
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE (default: stdout)")
    p.add_argument(
        "--syslog", metavar="TARGET", help="also send each line to syslog: /dev/log, host:port (UDP) or tcp://host:port"
    )
    p.add_argument("--syslog-facility", choices=SYSLOG_FACILITIES, default="authpriv")
    p.set_defaults(func=audit_export)

    retention = sub.add_parser("retention", help="data retention")
    retention_sub = retention.add_subparsers(dest="retention_command", required=True)
    p = retention_sub.add_parser("run", help="purge expired content, ledger and audit records (audited)")
    _data_dir_option(p)
    p.add_argument(
        "--audit-days",
        type=int,
        metavar="N",
        help="keep audit records N days (default $AGENCYLLM_AUDIT_RETENTION_DAYS or 365; at least 90)",
    )
    p.add_argument(
        "--ledger-days",
        type=int,
        metavar="N",
        help="keep usage-ledger rows N days (default $AGENCYLLM_LEDGER_RETENTION_DAYS: for ever)",
    )
    p.set_defaults(func=retention_run)

    feedback = cli_admin._group(sub, "feedback", "the feedback channel")
    for name, help_text in (("list", "list feedback"), ("export", "export feedback (use --format jsonl or csv)")):
        p = cli_admin._command(
            feedback, name, feedback_list, help_text, parents=[cli_admin._common(("table", "json", "jsonl", "csv"))]
        )
        p.add_argument("--tenant")
        p.add_argument("--category", choices=("inaccurate", "harmful", "biased", "unhelpful", "helpful", "other"))
        p.add_argument("--since", metavar="DATE")
        p.add_argument("--until", metavar="DATE")
        p.add_argument("--limit", type=int)

    model_sub = _subcommands(sub.choices["model"])
    p = model_sub.add_parser("card", help="the model card: weights path and sha256, context length, engine arguments")
    p.add_argument("model", help="model id")
    _data_dir_option(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="models YAML file (default $AGENCYLLM_CONFIG)")
    source.add_argument("--model-dir", type=Path, help="one model directory")
    p.add_argument("--format", choices=("markdown", "json"), default="markdown")
    p.add_argument("--output", "-o", metavar="FILE")
    p.set_defaults(func=model_card)
