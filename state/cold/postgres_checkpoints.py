"""LangGraph checkpoint storage in Postgres (the `CheckpointStore` port).

Three tables: `cp_checkpoints` (one row per checkpoint, channel values left
out), `cp_blobs` (one row per channel version, written only when it changes)
and `cp_writes` (pending writes per task). Payloads are bytea, so values of
any size fit. The latest checkpoint, with its blobs and pending writes, is one
statement led by a backward scan of the primary key; `list_checkpoints` pages
with keyset pagination, never loading a whole thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from psycopg.types.json import Jsonb

from ..ports import (
    JSON,
    CheckpointPut,
    FlushOp,
    PruneStrategy,
    StoredBlob,
    StoredCheckpoint,
    StoredWrite,
)
from ..schema import CURRENT, upcast
from ..settings import Settings
from .postgres_client import CountedConnection, PostgresConnection

# Checkpoints (with their blobs and writes) per round trip when listing; a caller's
# `limit` below it fetches only that many.
LIST_PAGE_SIZE = 50

CHECKPOINT_COLUMNS = (
    "thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, type, checkpoint,"
    " metadata, channel_versions, schema_version"
)

# A checkpoint with its blobs and pending writes in the same round trip, as
# arrays of bytea arrays (text fields via convert_to, which never reinterprets
# backslashes the way a ::bytea cast would). Each blob is a primary-key lookup
# (LATERAL ... LIMIT 1), never a join over every blob version of the thread.
SELECT_CHECKPOINTS_SQL = f"""
SELECT {CHECKPOINT_COLUMNS},
    (
        SELECT array_agg(ARRAY[convert_to(b.channel, 'UTF8'), convert_to(b.type, 'UTF8'),
                               b.blob, convert_to(b.schema_version::text, 'UTF8')])
        FROM jsonb_each_text(c.channel_versions) AS v
        CROSS JOIN LATERAL (
            SELECT channel, type, blob, schema_version FROM cp_blobs
            WHERE thread_id = c.thread_id AND checkpoint_ns = c.checkpoint_ns
              AND channel = v.key AND version = v.value
            LIMIT 1
        ) AS b
    ) AS blob_rows,
    (
        SELECT array_agg(ARRAY[convert_to(w.task_id, 'UTF8'), convert_to(w.task_path, 'UTF8'),
                               convert_to(w.idx::text, 'UTF8'), convert_to(w.channel, 'UTF8'),
                               convert_to(w.type, 'UTF8'), w.blob,
                               convert_to(w.schema_version::text, 'UTF8')]
                         ORDER BY w.task_id, w.idx)
        FROM cp_writes AS w
        WHERE w.thread_id = c.thread_id AND w.checkpoint_ns = c.checkpoint_ns
            AND w.checkpoint_id = c.checkpoint_id
    ) AS write_rows
FROM cp_checkpoints AS c
"""

# Every write below is one statement, hence atomic on its own and one round
# trip: rows arrive as parallel arrays and data-modifying CTEs do the rest.

# The new blobs and the checkpoint commit together: never a checkpoint without its blobs.
PUT_CHECKPOINT_SQL = f"""
WITH new_blobs AS (
    INSERT INTO cp_blobs
        (thread_id, checkpoint_ns, channel, version, type, blob, schema_version)
    SELECT %(thread_id)s, %(checkpoint_ns)s, b.channel, b.version, b.type, b.blob,
           %(blob_schema_version)s
    FROM unnest(%(channels)s::text[], %(versions)s::text[], %(types)s::text[],
                %(payloads)s::bytea[]) AS b (channel, version, type, blob)
    ON CONFLICT (thread_id, checkpoint_ns, channel, version) DO NOTHING
)
INSERT INTO cp_checkpoints ({CHECKPOINT_COLUMNS})
VALUES (%(thread_id)s, %(checkpoint_ns)s, %(checkpoint_id)s, %(parent_checkpoint_id)s,
        %(type)s, %(checkpoint)s, %(metadata)s, %(channel_versions)s, %(schema_version)s)
ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE SET
    parent_checkpoint_id = EXCLUDED.parent_checkpoint_id,
    type = EXCLUDED.type,
    checkpoint = EXCLUDED.checkpoint,
    metadata = EXCLUDED.metadata,
    channel_versions = EXCLUDED.channel_versions,
    schema_version = EXCLUDED.schema_version
"""

WRITE_COLUMNS = "task_id, task_path, idx, channel, type, blob, schema_version"

PUT_WRITES_SQL = f"""
INSERT INTO cp_writes (thread_id, checkpoint_ns, checkpoint_id, {WRITE_COLUMNS})
SELECT %(thread_id)s, %(checkpoint_ns)s, %(checkpoint_id)s,
       w.task_id, w.task_path, w.idx, w.channel, w.type, w.blob, %(schema_version)s
FROM unnest(%(task_ids)s::text[], %(task_paths)s::text[], %(idxs)s::integer[],
            %(channels)s::text[], %(types)s::text[], %(payloads)s::bytea[])
    AS w (task_id, task_path, idx, channel, type, blob)
ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx)
"""
INSERT_WRITES_SQL = PUT_WRITES_SQL + "DO NOTHING"
UPSERT_WRITES_SQL = (
    PUT_WRITES_SQL
    + """DO UPDATE SET
    task_path = EXCLUDED.task_path,
    channel = EXCLUDED.channel,
    type = EXCLUDED.type,
    blob = EXCLUDED.blob,
    schema_version = EXCLUDED.schema_version
"""
)

GET_BLOBS_SQL = """
SELECT b.channel, b.version, b.type, b.blob, b.schema_version
FROM unnest(%s::text[], %s::text[]) AS wanted (channel, version)
CROSS JOIN LATERAL (
    SELECT channel, version, type, blob, schema_version FROM cp_blobs
    WHERE thread_id = %s AND checkpoint_ns = %s
      AND channel = wanted.channel AND version = wanted.version
    LIMIT 1
) AS b
"""

DELETE_THREADS_SQL = """
WITH dropped_writes AS (
    DELETE FROM cp_writes WHERE thread_id = ANY(%(thread_ids)s)
), dropped_blobs AS (
    DELETE FROM cp_blobs WHERE thread_id = ANY(%(thread_ids)s)
)
DELETE FROM cp_checkpoints WHERE thread_id = ANY(%(thread_ids)s)
"""

COPY_THREAD_SQL = f"""
WITH copied_blobs AS (
    INSERT INTO cp_blobs
        (thread_id, checkpoint_ns, channel, version, type, blob, schema_version)
    SELECT %(target)s, checkpoint_ns, channel, version, type, blob, schema_version
    FROM cp_blobs WHERE thread_id = %(source)s
    ON CONFLICT DO NOTHING
), copied_writes AS (
    INSERT INTO cp_writes (thread_id, checkpoint_ns, checkpoint_id, {WRITE_COLUMNS})
    SELECT %(target)s, checkpoint_ns, checkpoint_id, {WRITE_COLUMNS}
    FROM cp_writes WHERE thread_id = %(source)s
    ON CONFLICT DO NOTHING
)
INSERT INTO cp_checkpoints ({CHECKPOINT_COLUMNS})
SELECT %(target)s, checkpoint_ns, checkpoint_id, parent_checkpoint_id, type, checkpoint,
       metadata, channel_versions, schema_version
FROM cp_checkpoints WHERE thread_id = %(source)s
ON CONFLICT DO NOTHING
"""

DELETE_RUN_CHECKPOINTS_SQL = """
DELETE FROM cp_checkpoints WHERE metadata ->> 'run_id' = ANY(%s)
RETURNING thread_id, checkpoint_ns, checkpoint_id, channel_versions
"""

# Everything but the newest checkpoint of each (thread, namespace).
DELETE_ALL_BUT_LATEST_SQL = """
DELETE FROM cp_checkpoints AS c
WHERE c.thread_id = ANY(%s)
  AND c.checkpoint_id < (
      SELECT max(m.checkpoint_id) FROM cp_checkpoints AS m
      WHERE m.thread_id = c.thread_id AND m.checkpoint_ns = c.checkpoint_ns
  )
RETURNING thread_id, checkpoint_ns, checkpoint_id, channel_versions
"""

# Runs after the checkpoints were deleted (same transaction), so `NOT EXISTS`
# sees only the checkpoints that remain: a blob goes once none of them uses it.
DELETE_DEPENDENTS_SQL = """
WITH deleted AS (
    SELECT * FROM unnest(%(thread_ids)s::text[], %(namespaces)s::text[],
                         %(checkpoint_ids)s::text[], %(channel_versions)s::jsonb[])
        AS d (thread_id, checkpoint_ns, checkpoint_id, channel_versions)
), dropped_writes AS (
    DELETE FROM cp_writes AS w USING deleted AS d
    WHERE w.thread_id = d.thread_id
      AND w.checkpoint_ns = d.checkpoint_ns
      AND w.checkpoint_id = d.checkpoint_id
), freed AS (
    SELECT DISTINCT d.thread_id, d.checkpoint_ns, v.key AS channel, v.value AS version
    FROM deleted AS d CROSS JOIN LATERAL jsonb_each_text(d.channel_versions) AS v
)
DELETE FROM cp_blobs AS b USING freed AS f
WHERE b.thread_id = f.thread_id
  AND b.checkpoint_ns = f.checkpoint_ns
  AND b.channel = f.channel
  AND b.version = f.version
  AND NOT EXISTS (
      SELECT 1 FROM cp_checkpoints AS c
      WHERE c.thread_id = f.thread_id
        AND c.checkpoint_ns = f.checkpoint_ns
        AND c.channel_versions ->> f.channel = f.version
  )
"""


class PostgresCheckpointStore:
    """`CheckpointStore` on Postgres; every multi-row change is one transaction."""

    name = "postgres"

    def __init__(self, connection: PostgresConnection, settings: Settings) -> None:
        self._pg = connection
        self._settings = settings

    async def setup(self) -> None:
        await self._pg.setup()

    async def put_checkpoint(
        self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]
    ) -> None:
        # A repeated (channel, version) keeps its first value, as ON CONFLICT DO NOTHING would.
        unique = list(
            {(blob.channel, str(blob.version)): blob for blob in reversed(blobs)}.values()
        )
        async with self._pg.connection("put_checkpoint") as conn:
            await conn.execute(
                PUT_CHECKPOINT_SQL,
                {
                    "thread_id": checkpoint.thread_id,
                    "checkpoint_ns": checkpoint.checkpoint_ns,
                    "checkpoint_id": checkpoint.checkpoint_id,
                    "parent_checkpoint_id": checkpoint.parent_checkpoint_id,
                    "type": checkpoint.checkpoint[0],
                    "checkpoint": checkpoint.checkpoint[1],
                    "metadata": Jsonb(checkpoint.metadata),
                    "channel_versions": Jsonb(checkpoint.channel_versions),
                    "schema_version": CURRENT["checkpoint"],
                    "channels": [blob.channel for blob in unique],
                    "versions": [str(blob.version) for blob in unique],
                    "types": [blob.value[0] for blob in unique],
                    "payloads": [blob.value[1] for blob in unique],
                    "blob_schema_version": CURRENT["blob"],
                },
            )

    async def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None:
        if not writes:
            return
        # One statement may not touch a row twice: a repeated (task_id, idx) in one call
        # keeps the last write when upserting, the first otherwise.
        ordered = writes if upsert else list(reversed(writes))
        unique = list({(write.task_id, write.idx): write for write in ordered}.values())
        async with self._pg.connection("put_writes") as conn:
            await conn.execute(
                UPSERT_WRITES_SQL if upsert else INSERT_WRITES_SQL,
                {
                    "thread_id": thread_id,
                    "checkpoint_ns": checkpoint_ns,
                    "checkpoint_id": checkpoint_id,
                    "schema_version": CURRENT["write"],
                    "task_ids": [write.task_id for write in unique],
                    "task_paths": [write.task_path for write in unique],
                    "idxs": [write.idx for write in unique],
                    "channels": [write.channel for write in unique],
                    "types": [write.value[0] for write in unique],
                    "payloads": [write.value[1] for write in unique],
                },
            )

    async def apply_batch(self, ops: Sequence[FlushOp]) -> None:
        for op in ops:
            if isinstance(op, CheckpointPut):
                await self.put_checkpoint(op.checkpoint, op.blobs)
            else:
                await self.put_writes(
                    op.thread_id, op.checkpoint_ns, op.checkpoint_id, op.writes, upsert=op.upsert
                )

    async def get_checkpoint(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> StoredCheckpoint | None:
        async with self._pg.connection("get_checkpoint") as conn:
            if checkpoint_id is None:
                cursor = await conn.execute(
                    f"{SELECT_CHECKPOINTS_SQL} WHERE thread_id = %s AND checkpoint_ns = %s"
                    " ORDER BY checkpoint_id DESC LIMIT 1",
                    (thread_id, checkpoint_ns),
                )
            else:
                cursor = await conn.execute(
                    f"{SELECT_CHECKPOINTS_SQL}"
                    " WHERE thread_id = %s AND checkpoint_ns = %s AND checkpoint_id = %s",
                    (thread_id, checkpoint_ns, checkpoint_id),
                )
            row = await cursor.fetchone()
        return _stored_checkpoint(row) if row is not None else None

    async def get_blobs(
        self, thread_id: str, checkpoint_ns: str, versions: dict[str, str | int | float]
    ) -> dict[str, tuple[str, bytes]]:
        if not versions:
            return {}
        async with self._pg.connection("get_blobs") as conn:
            cursor = await conn.execute(
                GET_BLOBS_SQL,
                (
                    list(versions),
                    [str(version) for version in versions.values()],
                    thread_id,
                    checkpoint_ns,
                ),
            )
            rows = await cursor.fetchall()
        blobs = (upcast("blob", row) for row in rows)
        return {blob["channel"]: (blob["type"], bytes(blob["blob"])) for blob in blobs}

    async def get_writes(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str
    ) -> list[StoredWrite]:
        async with self._pg.connection("get_writes") as conn:
            cursor = await conn.execute(
                f"SELECT {WRITE_COLUMNS} FROM cp_writes"
                " WHERE thread_id = %s AND checkpoint_ns = %s AND checkpoint_id = %s"
                " ORDER BY task_id, idx",
                (thread_id, checkpoint_ns, checkpoint_id),
            )
            rows = await cursor.fetchall()
        return [_stored_write(row) for row in rows]

    async def list_checkpoints(
        self,
        *,
        thread_id: str | None,
        checkpoint_ns: str | None,
        before: str | None,
        limit: int | None,
        metadata_filter: dict[str, JSON] | None,
    ) -> AsyncIterator[StoredCheckpoint]:
        # The sort key is the checkpoint id plus whichever of thread and namespace
        # is not fixed by the filter: unique, so a page resumes exactly after the last row.
        key_columns = ["checkpoint_id"]
        conditions: list[str] = []
        params: list[Any] = []
        if thread_id is not None:
            conditions.append("thread_id = %s")
            params.append(thread_id)
        else:
            key_columns.append("thread_id")
        if checkpoint_ns is not None:
            conditions.append("checkpoint_ns = %s")
            params.append(checkpoint_ns)
        else:
            key_columns.append("checkpoint_ns")
        if before is not None:
            conditions.append("checkpoint_id < %s")
            params.append(before)
        if metadata_filter:
            conditions.append("metadata @> %s")
            params.append(Jsonb(metadata_filter))
        key = ", ".join(key_columns)
        order = ", ".join(f"{column} DESC" for column in key_columns)

        remaining = limit
        last_key: list[Any] | None = None
        while remaining is None or remaining > 0:
            page_size = LIST_PAGE_SIZE if remaining is None else min(LIST_PAGE_SIZE, remaining)
            page_conditions = list(conditions)
            page_params = list(params)
            if last_key is not None:
                page_conditions.append(f"({key}) < ({', '.join(['%s'] * len(last_key))})")
                page_params.extend(last_key)
            where = f" WHERE {' AND '.join(page_conditions)}" if page_conditions else ""
            async with self._pg.connection("list_checkpoints") as conn:
                cursor = await conn.execute(
                    f"{SELECT_CHECKPOINTS_SQL}{where} ORDER BY {order} LIMIT %s",
                    [*page_params, page_size],
                )
                rows = await cursor.fetchall()
            # Yielded after the connection went back to the pool: a slow consumer holds none.
            for row in rows:
                yield _stored_checkpoint(row)
            if len(rows) < page_size:
                return
            if remaining is not None:
                remaining -= len(rows)
            last_key = [rows[-1][column] for column in key_columns]

    async def delete_thread(self, thread_id: str) -> None:
        async with self._pg.connection("delete_thread") as conn:
            await conn.execute(DELETE_THREADS_SQL, {"thread_ids": [thread_id]})

    async def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        if not run_ids:
            return
        async with self._pg.transaction("delete_for_runs") as conn:
            cursor = await conn.execute(DELETE_RUN_CHECKPOINTS_SQL, (list(run_ids),))
            await _delete_dependents(conn, await cursor.fetchall())

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        async with self._pg.connection("copy_thread") as conn:
            await conn.execute(
                COPY_THREAD_SQL, {"source": source_thread_id, "target": target_thread_id}
            )

    async def prune(self, thread_ids: Sequence[str], *, strategy: PruneStrategy) -> None:
        if not thread_ids:
            return
        if strategy == "delete":
            async with self._pg.connection("prune") as conn:
                await conn.execute(DELETE_THREADS_SQL, {"thread_ids": list(thread_ids)})
            return
        async with self._pg.transaction("prune") as conn:
            cursor = await conn.execute(DELETE_ALL_BUT_LATEST_SQL, (list(thread_ids),))
            await _delete_dependents(conn, await cursor.fetchall())

    async def close(self) -> None:
        """The shared connection is closed by whoever opened it (the backend factory)."""


async def _delete_dependents(conn: CountedConnection, deleted: list[dict[str, Any]]) -> None:
    """Writes of the deleted checkpoints, and blobs that no remaining checkpoint uses."""
    if not deleted:
        return
    await conn.execute(
        DELETE_DEPENDENTS_SQL,
        {
            "thread_ids": [row["thread_id"] for row in deleted],
            "namespaces": [row["checkpoint_ns"] for row in deleted],
            "checkpoint_ids": [row["checkpoint_id"] for row in deleted],
            "channel_versions": [Jsonb(row["channel_versions"]) for row in deleted],
        },
    )


def _stored_checkpoint(row: dict[str, Any]) -> StoredCheckpoint:
    """A checkpoint row, with the blobs and writes its query loaded alongside it."""
    document = upcast("checkpoint", row)
    blobs = {}
    for channel, type_, blob, schema_version in row["blob_rows"] or ():
        loaded = upcast(
            "blob",
            {
                "channel": channel.decode(),
                "type": type_.decode(),
                "blob": blob,
                "schema_version": int(schema_version),
            },
        )
        blobs[loaded["channel"]] = (loaded["type"], bytes(loaded["blob"]))
    writes = [
        _stored_write(
            {
                "task_id": task_id.decode(),
                "task_path": task_path.decode(),
                "idx": int(idx),
                "channel": channel.decode(),
                "type": type_.decode(),
                "blob": blob,
                "schema_version": int(schema_version),
            }
        )
        for task_id, task_path, idx, channel, type_, blob, schema_version in row["write_rows"] or ()
    ]
    return StoredCheckpoint(
        thread_id=document["thread_id"],
        checkpoint_ns=document["checkpoint_ns"],
        checkpoint_id=document["checkpoint_id"],
        parent_checkpoint_id=document["parent_checkpoint_id"],
        checkpoint=(document["type"], bytes(document["checkpoint"])),
        metadata=document["metadata"],
        channel_versions=document["channel_versions"],
        blobs=blobs,
        writes=writes,
    )


def _stored_write(row: dict[str, Any]) -> StoredWrite:
    document = upcast("write", row)
    return StoredWrite(
        task_id=document["task_id"],
        task_path=document["task_path"],
        idx=document["idx"],
        channel=document["channel"],
        value=(document["type"], bytes(document["blob"])),
    )
