"""Batch jobs (`/v1/batches`) and their lines, in Postgres.

A batch's lines are rows that workers lease (`lease`: `FOR UPDATE SKIP LOCKED`, a lease that
runs out when its worker dies), so any worker on any replica takes over a line whose worker was
lost, and a restart of the whole platform resumes every batch where it stopped. A line ends once
(`finish` only moves a line its lease still holds); the worker that ends the last line writes the
output and error files (`finalize`, guarded by the batch's status, so exactly one does).

Each line's engine call is admitted and settled under the request id `line_request_id`: the
usage ledger's unique request id is what keeps a line from being charged twice.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agencyllm.quotas.audit import Actor, data_event, insert_records
from agencyllm.quotas.batches.files import OUTPUT_PURPOSE, FileStore

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses")
STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled")
LINE_STATUSES = ("pending", "running", "done", "failed")
# Each line's output (or error) record is kept on its row until the batch is finalised.
_BATCH_COLUMNS = """b.id, b.endpoint, b.input_file_id, b.completion_window, b.status, b.created_at, b.expires_at,
 b.in_progress_at, b.finalizing_at, b.completed_at, b.failed_at, b.expired_at, b.cancelling_at, b.cancelled_at,
 b.output_file_id, b.error_file_id, b.errors, b.metadata, b.total, b.completed, b.failed, b.input_tokens,
 b.output_tokens, b.model, t.name AS tenant, b.owner"""
_OWNED = "b.id = $1 AND b.subject = $3 AND t.name = $2"

_LEASE_SQL = """
UPDATE batch_lines l SET status = 'running', lease_until = now() + make_interval(secs => $2),
       attempts = l.attempts + 1, lease_owner = $3
  FROM (SELECT l2.batch_id, l2.line_no FROM batch_lines l2 JOIN batches b ON b.id = l2.batch_id
         WHERE b.status = 'in_progress'
           AND ((l2.status = 'pending' AND (l2.not_before IS NULL OR l2.not_before <= now()))
                OR (l2.status = 'running' AND l2.lease_until < now()))
         ORDER BY b.created_at, l2.line_no
         LIMIT $1 FOR UPDATE OF l2 SKIP LOCKED) AS pick
 WHERE l.batch_id = pick.batch_id AND l.line_no = pick.line_no
RETURNING l.batch_id, l.line_no, l.custom_id, l.body, l.attempts
"""
_FINISH_SQL = """
WITH line AS (
    UPDATE batch_lines SET status = $4::text, result = $5, lease_until = NULL, finished_at = now()
     WHERE batch_id = $1 AND line_no = $2 AND status = 'running' AND lease_owner = $3
    RETURNING batch_id
)
UPDATE batches SET completed = completed + CASE WHEN $4::text = 'done' THEN 1 ELSE 0 END,
                   failed = failed + CASE WHEN $4::text = 'failed' THEN 1 ELSE 0 END,
                   input_tokens = input_tokens + $6, output_tokens = output_tokens + $7
 WHERE id = (SELECT batch_id FROM line)
RETURNING id
"""
_REQUEUE_SQL = """
UPDATE batch_lines SET status = 'pending', lease_until = NULL, not_before = $4
 WHERE batch_id = $1 AND line_no = $2 AND status = 'running' AND lease_owner = $3
"""
_RENEW_SQL = """
UPDATE batch_lines SET lease_until = now() + make_interval(secs => $2)
 WHERE lease_owner = $1 AND status = 'running' AND (batch_id, line_no) IN (SELECT * FROM unnest($3::text[], $4::int[]))
"""


def output_record(custom_id: str, request_id: str, status_code: int, body: Any) -> str:
    """One line of a batch's output or error file, in OpenAI's format."""
    return json.dumps(
        {
            "id": f"batch_req_{secrets.token_hex(12)}",
            "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body},
            "error": None,
        }
    )


def error_record(custom_id: str, code: str, message: str) -> str:
    return json.dumps(
        {
            "id": f"batch_req_{secrets.token_hex(12)}",
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }  # fmt: skip
    )


def expired_record(custom_id: str) -> str:
    return error_record(custom_id, "batch_expired", "The batch's completion window ended before this request ran.")


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(16)}"


def line_request_id(batch_id: str, line_no: int) -> str:
    return f"{batch_id}-{line_no}"


@dataclass(frozen=True)
class Line:
    batch_id: str
    line_no: int
    custom_id: str
    body: dict[str, Any]
    attempts: int


@dataclass(frozen=True)
class Batch:
    row: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.row["id"])

    @property
    def owner(self) -> dict[str, Any]:
        owner: dict[str, Any] = json.loads(self.row["owner"])
        return owner

    def openai(self) -> dict[str, Any]:
        row = self.row

        def stamp(name: str) -> int | None:
            return int(row[name].timestamp()) if row[name] is not None else None

        return {
            "id": row["id"],
            "object": "batch",
            "endpoint": row["endpoint"],
            "input_file_id": row["input_file_id"],
            "completion_window": row["completion_window"],
            "status": row["status"],
            "output_file_id": row["output_file_id"],
            "error_file_id": row["error_file_id"],
            "errors": json.loads(row["errors"]) if row["errors"] else None,
            "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
            "model": row["model"],
            "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
            "usage": {
                "input_tokens": row["input_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": row["output_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": row["input_tokens"] + row["output_tokens"],
            },
            **{
                name: stamp(name)
                for name in (
                    "created_at",
                    "expires_at",
                    "in_progress_at",
                    "finalizing_at",
                    "completed_at",
                    "failed_at",
                    "expired_at",
                    "cancelling_at",
                    "cancelled_at",
                )  # fmt: skip
            },
        }


class BatchStore:
    def __init__(self, database: Any, files: FileStore) -> None:
        self._database = database  # a quotas.db.Database
        self._files = files

    async def create(
        self,
        *,
        tenant: str,
        owner: dict[str, Any],
        endpoint: str,
        input_file_id: str,
        window_seconds: int,
        metadata: dict[str, str] | None,
        lines: list[tuple[str, dict[str, Any]]],
        errors: list[dict[str, Any]],
        model: str | None,
        audit: Actor | None = None,
    ) -> Batch:
        """A batch in progress with `lines` (custom_id, body) to run, or failed with `errors`; with
        `audit`, a `batch.create` record by that caller in the same transaction."""
        batch_id = new_batch_id()
        status = "failed" if errors else "in_progress"
        pool = await self._database.pool()
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute(
                """INSERT INTO batches (id, tenant_id, subject, owner, endpoint, input_file_id, completion_window,
                                        status, expires_at, in_progress_at, failed_at, errors, metadata, total, model)
                   SELECT $1, id, $3, $4::jsonb, $5, $6, '24h', $7::text, now() + make_interval(secs => $8::int),
                          CASE WHEN $7::text = 'in_progress' THEN now() END,
                          CASE WHEN $7::text = 'failed' THEN now() END,
                          $9::jsonb, $10::jsonb, $11, $12
                     FROM tenants WHERE name = $2""",
                batch_id,
                tenant,
                owner["subject"],
                json.dumps(owner),
                endpoint,
                input_file_id,
                status,
                window_seconds,
                json.dumps({"object": "list", "data": errors}) if errors else None,
                json.dumps(metadata) if metadata else None,
                0 if errors else len(lines),
                model,
            )
            if not errors:
                await connection.copy_records_to_table(
                    "batch_lines",
                    records=[
                        (batch_id, no, custom_id, json.dumps(body)) for no, (custom_id, body) in enumerate(lines, 1)
                    ],
                    columns=["batch_id", "line_no", "custom_id", "body"],
                )
            if audit is not None:
                details = {"endpoint": endpoint, "input_file_id": input_file_id, "lines": len(lines), "status": status}
                await insert_records(
                    connection, [data_event(audit, "batch.create", tenant, "batch", batch_id, details)]
                )
        batch = await self.get(batch_id, tenant, owner["subject"])
        assert batch is not None
        return batch

    async def get(self, batch_id: str, tenant: str, subject: str) -> Batch | None:
        pool = await self._database.pool()
        row = await pool.fetchrow(
            f"SELECT {_BATCH_COLUMNS} FROM batches b JOIN tenants t ON t.id = b.tenant_id WHERE {_OWNED}",
            batch_id,
            tenant,
            subject,
        )
        return None if row is None else Batch(dict(row))

    async def by_id(self, batch_id: str) -> Batch | None:
        """For the workers: any batch, whoever owns it."""
        pool = await self._database.pool()
        row = await pool.fetchrow(
            f"SELECT {_BATCH_COLUMNS} FROM batches b JOIN tenants t ON t.id = b.tenant_id WHERE b.id = $1", batch_id
        )
        return None if row is None else Batch(dict(row))

    async def page(self, tenant: str, subject: str | None, *, limit: int, after: str | None) -> list[Batch]:
        """The caller's batches (or, with `subject` None, the whole tenant's), newest first."""
        pool = await self._database.pool()
        rows = await pool.fetch(
            f"""SELECT {_BATCH_COLUMNS} FROM batches b JOIN tenants t ON t.id = b.tenant_id
                 WHERE t.name = $1 AND ($2::text IS NULL OR b.subject = $2)
                   AND ($3::text IS NULL OR (b.created_at, b.id) < (SELECT created_at, id FROM batches WHERE id = $3))
                 ORDER BY b.created_at DESC, b.id DESC LIMIT $4""",
            tenant,
            subject,
            after,
            limit,
        )
        return [Batch(dict(row)) for row in rows]

    async def cancel(self, batch_id: str, tenant: str, subject: str, *, audit: Actor | None = None) -> Batch | None:
        """Ask a batch to stop: no new line starts; running lines end, then it is `cancelled`.
        With `audit`, a `batch.cancel` record when this call stopped it."""
        async with (await self._database.pool()).acquire() as connection, connection.transaction():
            status: str = await connection.execute(
                """UPDATE batches b SET status = 'cancelling', cancelling_at = now()
                    FROM tenants t WHERE t.id = b.tenant_id AND b.id = $1 AND t.name = $2 AND b.subject = $3
                     AND b.status IN ('validating', 'in_progress')""",
                batch_id,
                tenant,
                subject,
            )
            if status.endswith(" 1") and audit is not None:
                await insert_records(connection, [data_event(audit, "batch.cancel", tenant, "batch", batch_id)])
        return await self.get(batch_id, tenant, subject)

    # ---- workers ------------------------------------------------------------------------

    async def lease(self, worker: str, count: int, lease_seconds: float) -> list[Line]:
        pool = await self._database.pool()
        rows = await pool.fetch(_LEASE_SQL, count, lease_seconds, worker)
        return [Line(r["batch_id"], r["line_no"], r["custom_id"], json.loads(r["body"]), r["attempts"]) for r in rows]

    async def renew(self, worker: str, lines: list[Line], lease_seconds: float) -> None:
        if lines:
            pool = await self._database.pool()
            await pool.execute(
                _RENEW_SQL, worker, lease_seconds, [line.batch_id for line in lines], [line.line_no for line in lines]
            )

    async def finish(
        self, worker: str, line: Line, record: str, *, ok: bool, input_tokens: int, output_tokens: int
    ) -> bool:
        """Record a line's output (`ok`) or error `record` (`output_record`, `error_record`); False
        if its lease was lost meanwhile (another worker took the line, or the batch closed)."""
        pool = await self._database.pool()
        done = await pool.fetchval(
            _FINISH_SQL,
            line.batch_id,
            line.line_no,
            worker,
            "done" if ok else "failed",
            record,
            input_tokens,
            output_tokens,
        )
        return done is not None

    async def requeue(self, worker: str, line: Line, not_before: datetime | None) -> None:
        pool = await self._database.pool()
        await pool.execute(_REQUEUE_SQL, line.batch_id, line.line_no, worker, not_before)

    async def charged(self, batch_id: str, line_no: int) -> tuple[str | None, str]:
        """Where the line's earlier attempts stand in the ledger, and the request id its next one
        runs under: ('settled', …) if an attempt was charged (a ledger row for work the engine
        did), ('reserved', …) if an attempt's reservation is still open, else (None, id). An
        attempt the engine refused before running (its queue was full: a zero-token
        `client_error` row, nothing charged) is not a charge: the next runs as `ID-rN`."""
        base = line_request_id(batch_id, line_no)
        pool = await self._database.pool()
        rows = await pool.fetch(
            """SELECT status, total_tokens FROM usage_ledger WHERE request_id = $1 OR request_id LIKE $1 || '-r%'
               UNION ALL
               SELECT 'reserved', 0 FROM quota_reservations WHERE request_id = $1 OR request_id LIKE $1 || '-r%'""",
            base,
        )
        refused = sum(1 for r in rows if r["status"] == "client_error" and r["total_tokens"] == 0)
        state = (
            "reserved" if any(r["status"] == "reserved" for r in rows) else "settled" if len(rows) > refused else None
        )
        return state, base if refused == 0 else f"{base}-r{refused}"

    async def sweep(self, tenant_limit: int) -> list[str]:
        """Move batches on: an in-progress one with no line left to run becomes `finalizing` (past
        its window: `expired`); a cancelling one whose running lines ended is closed. Then write
        the files of each (one worker per batch: `_write_files` locks it). Returns their ids."""
        pool = await self._database.pool()
        moved = await pool.fetch(
            """UPDATE batches b
                  SET status = CASE WHEN b.expires_at < now() THEN 'expired' ELSE 'finalizing' END,
                      finalizing_at = now()
                WHERE b.status = 'in_progress'
                  AND (b.expires_at < now() OR NOT EXISTS (
                        SELECT 1 FROM batch_lines l WHERE l.batch_id = b.id AND l.status IN ('pending', 'running')))
               RETURNING b.id"""
        )
        cancelled = await pool.fetch(
            """SELECT b.id FROM batches b WHERE b.status = 'cancelling' AND NOT EXISTS (
                   SELECT 1 FROM batch_lines l WHERE l.batch_id = b.id AND l.status = 'running'
                      AND l.lease_until >= now())"""
        )
        ids = [row["id"] for row in (*moved, *cancelled)]
        for batch_id in ids:
            await self._write_files(batch_id, tenant_limit)
        return ids

    async def _write_files(self, batch_id: str, tenant_limit: int) -> None:
        """Exactly one worker gets here per batch: the output and error files, then its end status."""
        pool = await self._database.pool()
        async with pool.acquire() as connection, connection.transaction():
            batch = await connection.fetchrow(
                "SELECT b.*, t.name AS tenant FROM batches b JOIN tenants t ON t.id = b.tenant_id"
                " WHERE b.id = $1 FOR UPDATE OF b",
                batch_id,
            )
            if batch["status"] not in ("finalizing", "expired", "cancelling"):
                return  # another worker closed it first
            lines = await connection.fetch(
                "SELECT line_no, custom_id, status, result FROM batch_lines WHERE batch_id = $1 ORDER BY line_no",
                batch_id,
            )
            ok = [r["result"] for r in lines if r["status"] == "done"]
            bad = [r["result"] for r in lines if r["status"] == "failed"]
            if batch["status"] == "expired":  # what the window left undone: an error line each
                bad += [expired_record(r["custom_id"]) for r in lines if r["status"] in ("pending", "running")]
            ids: dict[str, str | None] = {"output": None, "error": None}
            for kind, records in (("output", ok), ("error", bad)):
                if records:
                    stored = await self._files.save(
                        batch["tenant"],
                        batch["subject"],
                        OUTPUT_PURPOSE,
                        f"{batch_id}_{kind}.jsonl",
                        ("\n".join(records) + "\n").encode(),
                        expires_at=None,
                        tenant_limit=tenant_limit * 2,  # outputs of admitted work are never refused for space
                        connection=connection,
                    )
                    ids[kind] = stored.id
            final = {"cancelling": "cancelled", "expired": "expired"}.get(batch["status"], "completed")
            # No line of a closed batch runs again (a worker still holding one finds its lease gone).
            await connection.execute(
                "UPDATE batch_lines SET lease_owner = NULL WHERE batch_id = $1 AND status IN ('pending', 'running')",
                batch_id,
            )
            await connection.execute(
                """UPDATE batches SET output_file_id = $2, error_file_id = $3, status = $4::text,
                          completed_at = CASE WHEN $4::text = 'completed' THEN now() END,
                          cancelled_at = CASE WHEN $4::text = 'cancelled' THEN now() END
                    WHERE id = $1""",
                batch_id,
                ids["output"],
                ids["error"],
                final,
            )
