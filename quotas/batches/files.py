"""Uploaded files (`/v1/files`), stored in Postgres: owned by the tenant and the uploader, within
a per-tenant storage quota; batch output files are written here too.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agencyllm.quotas.audit import Actor, data_event, insert_records

UPLOAD_PURPOSES = ("batch", "user_data")
OUTPUT_PURPOSE = "batch_output"

_OWNED = "f.id = $1 AND f.subject = $3 AND f.tenant_id = (SELECT id FROM tenants WHERE name = $2)"
_COLUMNS = "f.id, f.purpose, f.filename, f.bytes, f.created_at, f.expires_at"
# Insert only while the tenant's stored bytes stay within `$8` (the row lock on the tenant
# serialises concurrent uploads of one tenant, so two cannot both fit the last bytes).
_SAVE_SQL = """
WITH tenant AS (SELECT id FROM tenants WHERE name = $2 FOR UPDATE),
used AS (SELECT coalesce(sum(bytes), 0) AS n FROM files WHERE tenant_id = (SELECT id FROM tenant))
INSERT INTO files (id, tenant_id, subject, purpose, filename, bytes, expires_at, content)
SELECT $1, tenant.id, $3, $4, $5, $6::bigint, $7, $9 FROM tenant, used WHERE used.n + $6::bigint <= $8::bigint
RETURNING created_at
"""


class StorageFull(Exception):
    pass


def new_file_id() -> str:
    return f"file-{secrets.token_hex(16)}"


@dataclass(frozen=True)
class StoredFile:
    id: str
    purpose: str
    filename: str
    size: int
    created_at: datetime
    expires_at: datetime | None

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.size,
            "created_at": int(self.created_at.timestamp()),
            "expires_at": int(self.expires_at.timestamp()) if self.expires_at else None,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


def _file(row: Any) -> StoredFile:
    return StoredFile(row["id"], row["purpose"], row["filename"], row["bytes"], row["created_at"], row["expires_at"])


class FileStore:
    def __init__(self, database: Any) -> None:
        self._database = database  # a quotas.db.Database

    async def save(
        self,
        tenant: str,
        subject: str,
        purpose: str,
        filename: str,
        content: bytes,
        *,
        expires_at: datetime | None,
        tenant_limit: int,
        file_id: str | None = None,
        connection: Any = None,
        audit: Actor | None = None,
    ) -> StoredFile:
        """Store a file; StorageFull if the tenant's files would then exceed `tenant_limit` bytes.
        With `audit`, a `file.upload` record by that caller is written in the same transaction."""
        file_id = file_id or new_file_id()
        args = (file_id, tenant, subject, purpose, filename, len(content), expires_at, tenant_limit, content)
        if connection is not None:
            created = await connection.fetchval(_SAVE_SQL, *args)
        else:
            async with (await self._database.pool()).acquire() as own, own.transaction():
                created = await own.fetchval(_SAVE_SQL, *args)
                if created is not None and audit is not None:
                    details = {"purpose": purpose, "bytes": len(content)}
                    await insert_records(own, [data_event(audit, "file.upload", tenant, "file", file_id, details)])
        if created is None:
            raise StorageFull(f"your organisation's files would exceed its storage quota of {tenant_limit} bytes")
        return StoredFile(file_id, purpose, filename, len(content), created, expires_at)

    async def get(self, file_id: str, tenant: str, subject: str) -> StoredFile | None:
        pool = await self._database.pool()
        row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM files f WHERE {_OWNED}", file_id, tenant, subject)
        return None if row is None else _file(row)

    async def content(self, file_id: str, tenant: str, subject: str) -> bytes | None:
        pool = await self._database.pool()
        data: bytes | None = await pool.fetchval(
            f"SELECT f.content FROM files f WHERE {_OWNED}", file_id, tenant, subject
        )
        return data

    async def delete(self, file_id: str, tenant: str, subject: str, *, audit: Actor | None = None) -> bool:
        async with (await self._database.pool()).acquire() as connection, connection.transaction():
            status: str = await connection.execute(f"DELETE FROM files f WHERE {_OWNED}", file_id, tenant, subject)
            deleted = status.endswith(" 1")
            if deleted and audit is not None:
                await insert_records(connection, [data_event(audit, "file.delete", tenant, "file", file_id)])
        return deleted

    async def page(
        self, tenant: str, subject: str, *, purpose: str | None, limit: int, after: str | None, ascending: bool
    ) -> list[StoredFile]:
        pool = await self._database.pool()
        order = "ASC" if ascending else "DESC"
        rows = await pool.fetch(
            f"""SELECT {_COLUMNS} FROM files f
                 WHERE f.tenant_id = (SELECT id FROM tenants WHERE name = $1) AND f.subject = $2
                   AND ($3::text IS NULL OR f.purpose = $3)
                   AND ($4::text IS NULL OR (f.created_at, f.id) {">" if ascending else "<"}
                        (SELECT created_at, id FROM files WHERE id = $4))
                 ORDER BY f.created_at {order}, f.id {order} LIMIT $5""",
            tenant,
            subject,
            purpose,
            after,
            limit,
        )
        return [_file(row) for row in rows]
