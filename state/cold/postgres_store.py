"""Workflow records and their audit trail in Postgres (the `ColdStateStore` port).

A record is one row: its sections as JSONB, a version for optimistic locking
and the highest fencing token seen. A write and its audit row are one SQL
statement (data-modifying CTEs), hence one transaction and one round trip:
the version check, the new section and the audit entry commit or fail
together, and a concurrent writer at the same version updates zero rows
instead of overwriting.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Jsonb

from ..errors import (
    BackendUnavailable,
    CorruptState,
    StaleFencingToken,
    VersionConflict,
    WorkflowExists,
    WorkflowNotFound,
)
from ..ports import (
    CREATED_SECTION,
    JSON,
    AuditEntry,
    SectionWrite,
    TierHealth,
    WorkflowRecord,
    acting_caller,
    check_distinct,
    timed_probe,
)
from ..schema import CURRENT, check_readable, upcast
from .postgres_client import PostgresConnection

RECORD_COLUMNS = "thread_id, version, sections, schema_version, fence, created_at, updated_at"

# Creation is audited too: one entry (section CREATED_SECTION) from null to all sections.
CREATE_SQL = f"""
WITH created AS (
    INSERT INTO workflow_records ({RECORD_COLUMNS})
    VALUES (%(thread_id)s, 1, %(sections)s, %(schema_version)s, 0, now(), now())
    ON CONFLICT (thread_id) DO NOTHING
    RETURNING {RECORD_COLUMNS}
), audited AS (
    INSERT INTO state_audit_log
        (thread_id, version, agent_id, section, before, after, at, schema_version, caller)
    SELECT thread_id, version, %(agent_id)s, %(created_section)s, 'null'::jsonb, sections,
           created_at, %(audit_schema_version)s, %(caller)s::jsonb
    FROM created
)
SELECT {RECORD_COLUMNS} FROM created
"""

# `previous` reads the section before the update from the statement's snapshot.
# A concurrent writer that commits first bumps the version, so when this
# statement gets the row lock Postgres re-checks `version = expected`, finds it
# false and updates nothing. A fencing token lower than the highest seen also
# updates nothing; an equal one is the same lock holder writing again. The row
# must still be in the schema the caller read (`read_schema_version`); a row
# from older code is rewritten whole, upcast (`base_sections`), in the current one.
UPDATE_SECTION_SQL = f"""
WITH previous AS (
    SELECT COALESCE(%(base_sections)s::jsonb, sections) -> %(section)s AS before
    FROM workflow_records WHERE thread_id = %(thread_id)s
), updated AS (
    UPDATE workflow_records AS r
    SET sections = COALESCE(%(base_sections)s::jsonb, r.sections)
                   || jsonb_build_object(%(section)s::text, %(value)s::jsonb),
        schema_version = %(schema_version)s,
        version = r.version + 1,
        fence = GREATEST(r.fence, COALESCE(%(fence)s::bigint, 0)),
        updated_at = now()
    FROM previous
    WHERE r.thread_id = %(thread_id)s
      AND r.version = %(expected_version)s
      AND r.schema_version = %(read_schema_version)s
      AND r.fence <= COALESCE(%(fence)s::bigint, r.fence)
      AND jsonb_typeof(r.sections) = 'object'
    RETURNING r.thread_id, r.version, r.sections, r.schema_version, r.fence,
              r.created_at, r.updated_at, previous.before
), audited AS (
    INSERT INTO state_audit_log
        (thread_id, version, agent_id, section, before, after, at, schema_version, caller)
    SELECT u.thread_id, u.version, %(agent_id)s, %(section)s,
           COALESCE(u.before, 'null'::jsonb), u.sections -> %(section)s,
           u.updated_at, %(audit_schema_version)s, %(caller)s::jsonb
    FROM updated AS u
)
SELECT {RECORD_COLUMNS} FROM updated
"""

# Several distinct sections in one statement: the record moves by one version per
# section, and each gets its audit entry (in order: same time, ascending ids).
UPDATE_SECTIONS_SQL = f"""
WITH changes AS (
    SELECT ord, c ->> 'section' AS section, c -> 'value' AS value, c ->> 'agent_id' AS agent_id
    FROM jsonb_array_elements(%(writes)s::jsonb) WITH ORDINALITY AS t(c, ord)
), previous AS (
    SELECT sections FROM workflow_records WHERE thread_id = %(thread_id)s
), updated AS (
    UPDATE workflow_records AS r
    SET sections = r.sections || %(merged)s::jsonb,
        schema_version = %(schema_version)s,
        version = r.version + %(count)s,
        fence = GREATEST(r.fence, COALESCE(%(fence)s::bigint, 0)),
        updated_at = now()
    WHERE r.thread_id = %(thread_id)s
      AND r.version = %(expected_version)s
      AND r.schema_version = %(schema_version)s
      AND r.fence <= COALESCE(%(fence)s::bigint, r.fence)
      AND jsonb_typeof(r.sections) = 'object'
    RETURNING {RECORD_COLUMNS}
), audited AS (
    INSERT INTO state_audit_log
        (thread_id, version, agent_id, section, before, after, at, schema_version, caller)
    SELECT u.thread_id, %(expected_version)s + c.ord, c.agent_id, c.section,
           COALESCE(p.sections -> c.section, 'null'::jsonb), c.value,
           u.updated_at, %(audit_schema_version)s, %(caller)s::jsonb
    FROM updated AS u CROSS JOIN previous AS p CROSS JOIN changes AS c
    ORDER BY c.ord
)
SELECT {RECORD_COLUMNS} FROM updated
"""

# The whole sections replaced, whatever they hold (a repair of a record `get` refuses),
# under the same version check as a section's update; the fence stays as it is.
REPLACE_DAMAGED_SQL = f"""
WITH previous AS (
    SELECT sections AS before FROM workflow_records WHERE thread_id = %(thread_id)s
), updated AS (
    UPDATE workflow_records AS r
    SET sections = %(sections)s,
        schema_version = %(schema_version)s,
        version = r.version + 1,
        updated_at = now()
    FROM previous
    WHERE r.thread_id = %(thread_id)s
      AND r.version = %(expected_version)s
      AND r.schema_version <= %(schema_version)s
    RETURNING r.thread_id, r.version, r.sections, r.schema_version, r.fence,
              r.created_at, r.updated_at, previous.before
), audited AS (
    INSERT INTO state_audit_log
        (thread_id, version, agent_id, section, before, after, at, schema_version, caller)
    SELECT u.thread_id, u.version, %(agent_id)s, %(created_section)s,
           COALESCE(u.before, 'null'::jsonb), u.sections,
           u.updated_at, %(audit_schema_version)s, %(caller)s::jsonb
    FROM updated AS u
)
SELECT {RECORD_COLUMNS} FROM updated
"""

SELECT_VERSION_SQL = "SELECT version, schema_version FROM workflow_records WHERE thread_id = %s"

SELECT_RECORD_SQL = f"SELECT {RECORD_COLUMNS} FROM workflow_records WHERE thread_id = %s"

# One statement: the record and its trail go together or not at all.
DELETE_SQL = """
WITH dropped_trail AS (
    DELETE FROM state_audit_log WHERE thread_id = %(thread_id)s
)
DELETE FROM workflow_records WHERE thread_id = %(thread_id)s
"""

AUDIT_TRAIL_SQL = """
SELECT thread_id, version, agent_id, section, before, after, at, schema_version, caller
FROM state_audit_log
WHERE thread_id = %s
ORDER BY at DESC, id DESC
LIMIT %s
"""


class PostgresStateStore:
    """`ColdStateStore` on Postgres: one row per workflow, one append-only row per change."""

    name = "postgres"

    def __init__(self, connection: PostgresConnection) -> None:
        self._pg = connection

    async def setup(self) -> None:
        await self._pg.setup()

    async def create(
        self, thread_id: str, sections: dict[str, JSON], *, agent_id: str
    ) -> WorkflowRecord:
        async with self._pg.connection("create") as conn:
            cursor = await conn.execute(
                CREATE_SQL,
                {
                    "thread_id": thread_id,
                    "sections": Jsonb(sections),
                    "schema_version": CURRENT["workflow"],
                    "agent_id": agent_id,
                    "created_section": CREATED_SECTION,
                    "audit_schema_version": CURRENT["audit"],
                    "caller": _caller(),
                },
            )
            row = await cursor.fetchone()
        if row is None:
            raise WorkflowExists(thread_id)
        return _record(row)

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        async with self._pg.connection("get") as conn:
            cursor = await conn.execute(SELECT_RECORD_SQL, (thread_id,))
            row = await cursor.fetchone()
        return _record(row) if row is not None else None

    async def update_section(
        self,
        thread_id: str,
        section: str,
        value: JSON,
        *,
        expected_version: int,
        agent_id: str,
        fencing_token: int | None = None,
    ) -> WorkflowRecord:
        params: dict[str, Any] = {
            "thread_id": thread_id,
            "section": section,
            "value": Jsonb(value),
            "expected_version": expected_version,
            "fence": fencing_token,
            "agent_id": agent_id,
            "schema_version": CURRENT["workflow"],
            "read_schema_version": CURRENT["workflow"],
            "base_sections": None,
            "audit_schema_version": CURRENT["audit"],
            "caller": _caller(),
        }
        async with self._pg.connection("update_section") as conn:
            cursor = await conn.execute(UPDATE_SECTION_SQL, params)
            row = await cursor.fetchone()
            if row is not None:
                return _record(row)
            # Nothing was written; read why.
            cursor = await conn.execute(SELECT_RECORD_SQL, (thread_id,))
            current = await cursor.fetchone()
            refusal = _refusal(thread_id, current, expected_version, fencing_token)
            if (
                refusal is None
                and current is not None
                and current["schema_version"] != CURRENT["workflow"]
            ):
                # Written by older code: upcast the whole record (newer code's raises
                # UnsupportedSchemaVersion), so the row is stored in the current schema.
                upgraded = _record(current)
                cursor = await conn.execute(
                    UPDATE_SECTION_SQL,
                    {
                        **params,
                        "base_sections": Jsonb(upgraded.sections),
                        "read_schema_version": current["schema_version"],
                    },
                )
                row = await cursor.fetchone()
                if row is not None:
                    return _record(row)
                cursor = await conn.execute(SELECT_RECORD_SQL, (thread_id,))
                current = await cursor.fetchone()
                refusal = _refusal(thread_id, current, expected_version, fencing_token)
        # Changed again meanwhile (deleted and re-created): a conflict all the same.
        raise refusal or VersionConflict(
            thread_id, expected_version, current["version"] if current else None
        )

    async def update_sections(
        self,
        thread_id: str,
        writes: Sequence[SectionWrite],
        *,
        expected_version: int,
        fencing_token: int | None = None,
    ) -> WorkflowRecord:
        check_distinct(self.name, writes)
        params: dict[str, Any] = {
            "thread_id": thread_id,
            "writes": Jsonb(
                [{"section": w.section, "value": w.value, "agent_id": w.agent_id} for w in writes]
            ),
            "merged": Jsonb({write.section: write.value for write in writes}),
            "count": len(writes),
            "expected_version": expected_version,
            "fence": fencing_token,
            "schema_version": CURRENT["workflow"],
            "audit_schema_version": CURRENT["audit"],
            "caller": _caller(),
        }
        async with self._pg.connection("update_sections") as conn:
            cursor = await conn.execute(UPDATE_SECTIONS_SQL, params)
            row = await cursor.fetchone()
            if row is not None:
                return _record(row)
            cursor = await conn.execute(SELECT_RECORD_SQL, (thread_id,))
            current = await cursor.fetchone()
        refusal = _refusal(thread_id, current, expected_version, fencing_token)
        if refusal is not None:
            raise refusal
        # A record written by older code: the one-section path upcasts it first; the
        # writes then go one by one (each audited; the record ends where one write would).
        for offset, write in enumerate(writes):
            record = await self.update_section(
                thread_id,
                write.section,
                write.value,
                expected_version=expected_version + offset,
                agent_id=write.agent_id,
                fencing_token=fencing_token,
            )
        return record  # `check_distinct` refused an empty list: the loop ran

    async def stored_version(self, thread_id: str) -> int | None:
        async with self._pg.connection("stored_version") as conn:
            cursor = await conn.execute(SELECT_VERSION_SQL, (thread_id,))
            row = await cursor.fetchone()
        if row is None:
            return None
        check_readable("workflow", row["schema_version"])
        return int(row["version"])

    async def replace_damaged(
        self, thread_id: str, sections: dict[str, JSON], *, expected_version: int, agent_id: str
    ) -> WorkflowRecord:
        params: dict[str, Any] = {
            "thread_id": thread_id,
            "sections": Jsonb(sections),
            "expected_version": expected_version,
            "agent_id": agent_id,
            "created_section": CREATED_SECTION,
            "schema_version": CURRENT["workflow"],
            "audit_schema_version": CURRENT["audit"],
            "caller": _caller(),
        }
        async with self._pg.connection("replace_damaged") as conn:
            cursor = await conn.execute(REPLACE_DAMAGED_SQL, params)
            row = await cursor.fetchone()
            if row is not None:
                return _record(row)
            cursor = await conn.execute(SELECT_VERSION_SQL, (thread_id,))
            current = await cursor.fetchone()
        if current is None:
            raise WorkflowNotFound(thread_id)
        if current["version"] == expected_version:
            # Written by newer code (the statement's other condition), or changed again
            # meanwhile (deleted and re-created): a conflict all the same.
            check_readable("workflow", current["schema_version"])
        raise VersionConflict(thread_id, expected_version, current["version"])

    async def audit_trail(self, thread_id: str, *, limit: int = 50) -> list[AuditEntry]:
        if limit <= 0:
            return []
        async with self._pg.connection("audit_trail") as conn:
            cursor = await conn.execute(AUDIT_TRAIL_SQL, (thread_id, limit))
            rows = await cursor.fetchall()
        return [_audit_entry(row) for row in rows]

    async def delete(self, thread_id: str) -> None:
        """Remove the record and its audit trail together (the thread's checkpoints stay)."""
        async with self._pg.connection("delete") as conn:
            await conn.execute(DELETE_SQL, {"thread_id": thread_id})

    async def record_ids(self) -> list[str]:
        async with self._pg.connection("record_ids") as conn:
            cursor = await conn.execute("SELECT thread_id FROM workflow_records ORDER BY thread_id")
            return [str(row["thread_id"]) for row in await cursor.fetchall()]

    async def health(self) -> TierHealth:
        return await timed_probe(self.name, self._select_one, errors=(BackendUnavailable,))

    async def _select_one(self) -> None:
        async with self._pg.connection("health") as conn:
            await conn.execute("SELECT 1")

    async def close(self) -> None:
        """The shared connection is closed by whoever opened it (the backend factory)."""


def _refusal(
    thread_id: str,
    current: dict[str, Any] | None,
    expected_version: int,
    fencing_token: int | None,
) -> Exception | None:
    """Why a write at `expected_version` cannot apply to `current`; None if it could."""
    if current is None:
        return WorkflowNotFound(thread_id)
    # The same precedence as the other backends: a stale version first, then the fence.
    if current["version"] != expected_version:
        return VersionConflict(thread_id, expected_version, current["version"])
    if fencing_token is not None and fencing_token < current["fence"]:
        return StaleFencingToken(thread_id, fencing_token, current["fence"])
    if not isinstance(current["sections"], dict):
        # Stored by hand as something else: a section merged in would keep it so (`||` of
        # an array); only `replace_damaged` writes over it.
        return CorruptState(f"workflow record {thread_id!r} is damaged: sections not an object")
    return None


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _record(row: dict[str, Any]) -> WorkflowRecord:
    document = upcast(
        "workflow",
        {
            "thread_id": row["thread_id"],
            "version": row["version"],
            "sections": row["sections"],
            "schema_version": row["schema_version"],
            "fence": row["fence"],
            "created_at": _iso(row["created_at"]),
            "updated_at": _iso(row["updated_at"]),
        },
    )
    return WorkflowRecord.from_document(document)


def _caller() -> Jsonb | None:
    caller = acting_caller()
    return Jsonb(caller.to_json()) if caller else None


def _audit_entry(row: dict[str, Any]) -> AuditEntry:
    return AuditEntry.from_document(upcast("audit", {**row, "at": _iso(row["at"])}))
