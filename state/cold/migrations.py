"""The Postgres schema, as ordered migrations recorded in `schema_migrations`.

`migrate` applies, in one transaction, every migration the database has not
recorded yet, in id order. It first takes a transaction-scoped advisory lock,
so two processes starting at once queue instead of racing (the second sees the
first one's records and applies nothing); running it again is a no-op, and one
that finds every migration recorded takes no lock at all. A statement waits for a
table's lock LOCK_WAIT_SECONDS at most (a long transaction of the running release
holding it), then the migration rolls back and tries again: queued for the lock, it
would stall every later query of that table behind it. A deadlock with such a
transaction is given way to alike.

To change the schema, append a migration with the next id; never edit or
reorder one that has shipped (databases have already applied it). A migration only
adds (tables, columns with defaults, indexes, triggers that older code satisfies): in a
rolling deploy the previous release runs against the new schema for minutes, and an app
meeting a database migrated past what it knows applies nothing and goes on.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from psycopg.errors import DeadlockDetected, LockNotAvailable
from psycopg.rows import tuple_row

# Any fixed 64-bit number works; it only has to be the same in every process of the app.
MIGRATION_LOCK_KEY = 7_146_320_551_820_913_731

# How long a migration statement waits for a table lock (`lock_timeout`) before the
# migration gives way: while it waits, every query of that table queues behind it.
LOCK_WAIT_SECONDS = 2.0
# Pause before trying again (jittered up to twice this): the app's queries run meanwhile.
RETRY_PAUSE_SECONDS = 1.0

log = logging.getLogger(__name__)

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    id integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

SCHEMA_MIGRATIONS_EXISTS = """
SELECT EXISTS (
    SELECT FROM pg_catalog.pg_class AS c
    JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
    WHERE c.relname = 'schema_migrations' AND n.nspname = ANY (current_schemas(false))
)
"""


@dataclass(frozen=True)
class Migration:
    id: int
    name: str
    sql: str


# Checkpoint ids are compared as plain strings ("newest first" in LangGraph's
# sense), so id columns use the "C" collation whatever the database locale is.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "workflow_records_and_audit_log",
        """
        CREATE TABLE workflow_records (
            thread_id text PRIMARY KEY,
            version bigint NOT NULL CHECK (version >= 1),
            sections jsonb NOT NULL,
            schema_version integer NOT NULL,
            fence bigint NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL
        );
        CREATE TABLE state_audit_log (
            id bigserial PRIMARY KEY,
            thread_id text NOT NULL,
            version bigint NOT NULL,
            agent_id text NOT NULL,
            section text NOT NULL,
            before jsonb NOT NULL,
            after jsonb NOT NULL,
            at timestamptz NOT NULL,
            schema_version integer NOT NULL
        );
        CREATE INDEX state_audit_log_thread_at ON state_audit_log (thread_id, at);
        CREATE INDEX state_audit_log_thread_version ON state_audit_log (thread_id, version);
        CREATE FUNCTION state_audit_log_reject_update() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'state_audit_log is append-only';
            END
            $$;
        CREATE TRIGGER state_audit_log_append_only
            BEFORE UPDATE ON state_audit_log
            FOR EACH ROW EXECUTE FUNCTION state_audit_log_reject_update();
        """,
    ),
    Migration(
        2,
        "checkpoints_blobs_writes",
        """
        CREATE TABLE cp_checkpoints (
            thread_id text NOT NULL,
            checkpoint_ns text NOT NULL,
            checkpoint_id text COLLATE "C" NOT NULL,
            parent_checkpoint_id text COLLATE "C",
            type text NOT NULL,
            checkpoint bytea NOT NULL,
            metadata jsonb NOT NULL,
            channel_versions jsonb NOT NULL,
            schema_version integer NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            -- Scanned backwards, this key also serves "latest of (thread, namespace)".
            PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id)
        );
        -- Listing a thread across namespaces, newest first, page by page.
        CREATE INDEX cp_checkpoints_thread_order
            ON cp_checkpoints (thread_id, checkpoint_id, checkpoint_ns);
        -- delete_for_runs finds a run's checkpoints without scanning every thread.
        CREATE INDEX cp_checkpoints_run_id ON cp_checkpoints ((metadata ->> 'run_id'));
        CREATE TABLE cp_blobs (
            thread_id text NOT NULL,
            checkpoint_ns text NOT NULL,
            channel text NOT NULL,
            version text NOT NULL,
            type text NOT NULL,
            blob bytea NOT NULL,
            schema_version integer NOT NULL,
            PRIMARY KEY (thread_id, checkpoint_ns, channel, version)
        );
        CREATE TABLE cp_writes (
            thread_id text NOT NULL,
            checkpoint_ns text NOT NULL,
            checkpoint_id text COLLATE "C" NOT NULL,
            task_id text COLLATE "C" NOT NULL,
            idx integer NOT NULL,
            task_path text NOT NULL,
            channel text NOT NULL,
            type text NOT NULL,
            blob bytea NOT NULL,
            schema_version integer NOT NULL,
            PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id, task_id, idx)
        );
        """,
    ),
    Migration(
        3,
        "retention_holds_and_activity_indexes",
        """
        -- A thread with a held row never expires; a released one (held = false) counts
        -- its inactivity from `changed_at` at the earliest. Removed with the thread.
        CREATE TABLE retention_holds (
            thread_id text PRIMARY KEY,
            held boolean NOT NULL,
            changed_at timestamptz NOT NULL DEFAULT now()
        );
        -- The sweep walks records oldest first, checks a thread for recent checkpoints,
        -- and finds threads that have checkpoints only.
        CREATE INDEX workflow_records_updated_at ON workflow_records (updated_at);
        CREATE INDEX cp_checkpoints_thread_created_at ON cp_checkpoints (thread_id, created_at);
        CREATE INDEX cp_checkpoints_created_at ON cp_checkpoints (created_at);
        """,
    ),
    Migration(
        4,
        "lz4_compression_for_checkpoint_payloads",
        """
        -- Postgres compresses a payload over ~2 KB on write and decompresses it on every
        -- read; pglz spends far longer on a megabyte of messages than the rest of the
        -- statement (lz4: several times faster both ways, at a lower ratio). Values
        -- already stored keep pglz until rewritten. A server built without lz4 keeps
        -- the default: EXECUTE defers the statements so that is an error to catch.
        DO $$
        BEGIN
            EXECUTE 'ALTER TABLE cp_blobs ALTER COLUMN blob SET COMPRESSION lz4';
            EXECUTE 'ALTER TABLE cp_writes ALTER COLUMN blob SET COMPRESSION lz4';
            EXECUTE 'ALTER TABLE cp_checkpoints ALTER COLUMN checkpoint SET COMPRESSION lz4';
        EXCEPTION WHEN feature_not_supported OR syntax_error THEN
            RAISE NOTICE 'lz4 is not available: checkpoint payloads keep pglz';
        END
        $$;
        """,
    ),
    Migration(
        5,
        "audit_caller",
        """
        -- The authenticated HTTP caller ({"id", "name"}) a change was made for; NULL for
        -- the system's own writes and for entries written before callers were recorded.
        ALTER TABLE state_audit_log ADD COLUMN caller jsonb;
        """,
    ),
    Migration(
        6,
        "checkpoint_chunks",
        """
        -- Content-addressed chunks of large checkpoint blobs, shared by every version of
        -- a thread's values (state.cold.chunks): a leaf (compressed bytes) or a node (the
        -- digests of its children). A blob whose type starts with 'chunked+' is a manifest.
        CREATE TABLE cp_chunks (
            thread_id text NOT NULL,
            digest bytea NOT NULL,
            node boolean NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (thread_id, digest)
        );
        """,
    ),
    Migration(
        7,
        "archive_owner_index",
        """
        -- Retention deletes a thread with the archive records it owns ('<owner>~archive~<n>',
        -- state.size.ARCHIVE_SEPARATOR). The expressions are the ones its statement uses
        -- (state.cold.postgres_retention): without an index it read every record.
        CREATE INDEX workflow_records_archive_owner
            ON workflow_records (split_part(thread_id, '~archive~', 1))
            WHERE strpos(thread_id, '~archive~') > 0;
        """,
    ),
    Migration(
        8,
        "checkpoint_flush_fences",
        """
        -- The highest flush-lock fencing token each thread was flushed or deleted under
        -- (state.checkpoint.flusher). The trigger refuses to lower it, which aborts the
        -- statement of a write-behind batch from a flusher paused past its lock: a later
        -- holder, or a delete under the lock, has raised it meanwhile. A deleted thread
        -- keeps its row, so a late batch cannot bring the thread back.
        CREATE TABLE cp_flush_fences (
            thread_id text PRIMARY KEY,
            token bigint NOT NULL
        );
        CREATE FUNCTION cp_refuse_stale_flush() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.token < OLD.token THEN
                RAISE EXCEPTION 'stale flush of %: fencing token % after %',
                    NEW.thread_id, NEW.token, OLD.token
                    USING ERRCODE = 'SF001', DETAIL = OLD.token::text;
            END IF;
            RETURN NEW;
        END
        $$;
        CREATE TRIGGER cp_flush_fences_forward_only BEFORE UPDATE ON cp_flush_fences
            FOR EACH ROW EXECUTE FUNCTION cp_refuse_stale_flush();
        """,
    ),
    Migration(
        9,
        "spared_checkpoints",
        """
        -- A checkpoint of a run delete_for_runs deleted, kept only because a surviving
        -- checkpoint's DeltaChannel history runs through it: the next maintenance of the
        -- thread deletes it once nothing needs it (a constant default: no table rewrite).
        ALTER TABLE cp_checkpoints ADD COLUMN spared boolean NOT NULL DEFAULT false;
        -- Few rows are spared: a partial index finds a thread's without reading its others.
        CREATE INDEX cp_checkpoints_spared ON cp_checkpoints (thread_id) WHERE spared;
        """,
    ),
    Migration(
        10,
        "deleted_thread_markers",
        """
        -- Threads deleted whole (delete_thread, prune "delete", the retention sweep) and
        -- when: a put_writes that lands after the delete (LangGraph does not order it after
        -- its checkpoint's put) leaves writes of a thread with no checkpoint, which only
        -- this row leads the retention sweep to, a TTL after the delete. Those of
        -- checkpoints older than the delete only (ids are time-ordered): a new run's first
        -- writes may land before its first checkpoint, on a thread id used again.
        CREATE TABLE cp_deleted_threads (
            thread_id text PRIMARY KEY,
            deleted_at timestamptz NOT NULL,
            before_checkpoint_id text NOT NULL
        );
        CREATE INDEX cp_deleted_threads_deleted_at ON cp_deleted_threads (deleted_at);
        """,
    ),
)


async def migrate(
    conn: AsyncConnection[Any], *, statement_timeout_seconds: float | None = None
) -> list[Migration]:
    """Apply the migrations this database lacks, in order; return the ones applied now.

    A database that has them all is only read: no lock is taken, so an app starting
    while another process migrates further (a newer release, the deploy hook) does not
    wait for it. `statement_timeout_seconds` bounds each statement of the migration
    transaction server-side (waiting for another process's migration included) in place
    of the session's own `statement_timeout`, and the tries at it (`LOCK_WAIT_SECONDS`)
    together; None keeps the session's and tries until the tables are free."""
    recorded = await _recorded_ids(conn)
    if recorded is not None and all(migration.id in recorded for migration in MIGRATIONS):
        return []
    started = time.monotonic()
    while True:
        try:
            return await _apply(conn, statement_timeout_seconds)
        except (LockNotAvailable, DeadlockDetected) as exc:
            # Rolled back: the tables it locked are free again until the next try. A deadlock
            # with an app transaction (a table an earlier migration locked, written while
            # this one waits) fails the migration, which waited first: given way to alike.
            pause = RETRY_PAUSE_SECONDS * (1 + random.random())
            if (
                statement_timeout_seconds is not None
                and time.monotonic() - started + pause >= statement_timeout_seconds
            ):
                raise
            log.warning(
                "migration gave way to another transaction (%s), tries again in %.1f s",
                exc.diag.message_primary or type(exc).__name__,
                pause,
            )
            await asyncio.sleep(pause)


async def _apply(
    conn: AsyncConnection[Any], statement_timeout_seconds: float | None
) -> list[Migration]:
    """One try at the migrations not recorded yet, in one transaction."""
    applied_now: list[Migration] = []
    async with conn.transaction():
        if statement_timeout_seconds is not None:
            await conn.execute(
                "SELECT set_config('statement_timeout', %s, true)",
                (str(int(statement_timeout_seconds * 1000)),),
            )
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        # Only once the migration lock is taken: another process's migration is waited for.
        await conn.execute(
            "SELECT set_config('lock_timeout', %s, true)", (str(int(LOCK_WAIT_SECONDS * 1000)),)
        )
        recorded = await _recorded_ids(conn)
        if recorded is None:
            await conn.execute(CREATE_MIGRATIONS_TABLE)
            recorded = set()
        for migration in MIGRATIONS:
            if migration.id in recorded:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (id, name) VALUES (%s, %s)",
                (migration.id, migration.name),
            )
            applied_now.append(migration)
    return applied_now


async def _recorded_ids(conn: AsyncConnection[Any]) -> set[int] | None:
    """The ids in `schema_migrations`; None when the table does not exist yet."""
    async with conn.cursor(row_factory=tuple_row) as cursor:
        # Looked up rather than CREATE TABLE IF NOT EXISTS, which needs CREATE on the
        # schema even when the table exists; an app role without it (least privilege in
        # Azure, where the administrator applies the migrations) must still start. Read
        # from pg_class, not with to_regclass: its name lookup caches "missing" for the
        # session, and a process that waited on the lock while another created the
        # table would still find it missing.
        await cursor.execute(SCHEMA_MIGRATIONS_EXISTS)
        found = await cursor.fetchone()
        if found is None or not found[0]:
            return None
        await cursor.execute("SELECT id FROM schema_migrations")
        return {int(row[0]) for row in await cursor.fetchall()}


async def recorded_migrations(conn: AsyncConnection[Any]) -> list[tuple[int, str]]:
    """(id, name) of every migration the database has recorded, in id order."""
    async with conn.cursor(row_factory=tuple_row) as cursor:
        await cursor.execute("SELECT id, name FROM schema_migrations ORDER BY id")
        return [(int(row[0]), str(row[1])) for row in await cursor.fetchall()]
