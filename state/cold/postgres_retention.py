"""Retention in Postgres (`ColdRetention`): holds in a table, a sweep deletes expired threads.

Postgres expires nothing by itself, so `sweep` expires whole threads (the Cosmos
sweep does the same): a thread whose workflow record was last updated, and
whose newest checkpoint was written, more than STATE_COLD_TTL_SECONDS ago
(database clock, or the `now` given) is deleted whole: record, audit trail,
checkpoints, blobs, writes, and its archive records (`<thread>~archive~...`:
offloaded and archived sections, `state.size`). Threads that have checkpoints
but no record expire the same way. Since a whole thread goes at once, nothing
its latest checkpoint or record names (a blob written at step 1, an archived
section) can expire before it.

Archive records are rows of `workflow_records` too, but never expire on their
own: only with their owner, or, when no owner is left (an offload whose record
write failed), once they are themselves older than the TTL.

`retention_holds` (migration 3) exempts a thread while `held`; a released row
stays until the thread is swept, so inactivity counts from the release at the
earliest, as on Cosmos, where the release is itself a write. A hold of a thread
that stores nothing (taken as the sweep deleted it) goes once a TTL old.

Flush fences (`cp_flush_fences`) go once their token is older than the TTL, whether
their thread was deleted or lives on (its next flush writes the fence again).

A thread deleted whole (delete_thread, prune "delete", this sweep) or left with no
checkpoint by delete_for_runs is marked (`cp_deleted_threads`): a put_writes landing
after the delete leaves writes of a thread with no checkpoint nor record, which the
queries above never find. Once the mark is a TTL old the sweep deletes them, if the
thread still has no checkpoint; one with checkpoints again (a new run) only loses its
mark, and its leftovers go when it expires whole.

Each batch is one transaction. Expired records are locked (SKIP LOCKED: two
sweepers take different threads), so a writer that comes back to one waits for
the sweep and then finds it gone (`WorkflowNotFound`) instead of half-deleted.
Threads with checkpoints alone have no record to lock: two sweepers may both find
one, and only the one whose delete removed it counts it. Before deleting, the sweep
tries each thread's maintenance lock (the one delete_thread takes and a write-through
put shares, `LOCK_EXPIRED_SQL`) and spares a thread whose lock is held: a put under way
is never deleted from under, nor survives the delete its parent gone. A thread a batch
spares (`spared`) is not looked at again by the sweep's next batches, though it may
still read expired.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Mapping

from langgraph.checkpoint.base.id import uuid6

from ..size import ARCHIVE_SEPARATOR
from .postgres_checkpoints import RAISE_FENCE_SQL, THREAD_MAINTENANCE_LOCK
from .postgres_client import CountedConnection, PostgresConnection

# Threads per transaction: keeps each sweep's locks and WAL burst small.
SWEEP_BATCH = 100

# Takes the thread's maintenance lock, shared (as a write-through put does, so holds and puts
# never wait for each other): a sweep holding it (`LOCK_EXPIRED_SQL`) has looked at the thread
# a last time and is about to delete it; a hold landing in between was deleted with the
# thread, the case under review gone. It now waits for that sweep, and lands after the
# delete (a lone hold, which `LONE_HOLDS_SQL` drops a TTL later); a hold taken first holds
# the lock (the sweep spares the thread) or is committed (its last look sees it). The row
# takes its values from `turn` (Postgres never runs a CTE nothing reads).
HOLD_SQL = f"""
WITH turn AS (
    SELECT pg_advisory_xact_lock_shared({THREAD_MAINTENANCE_LOCK}, hashtext(%(thread_id)s))
)
INSERT INTO retention_holds AS h (thread_id, held, changed_at)
SELECT %(thread_id)s, true, now() FROM turn
ON CONFLICT (thread_id) DO UPDATE SET held = true, changed_at = now() WHERE NOT h.held
"""

RELEASE_SQL = """
UPDATE retention_holds SET held = false, changed_at = now() WHERE thread_id = %s AND held
"""

_EXEMPT = """
EXISTS (
    SELECT 1 FROM retention_holds AS h
    WHERE h.thread_id = {thread}.thread_id AND (h.held OR h.changed_at >= {cutoff})
)
OR EXISTS (
    SELECT 1 FROM cp_checkpoints AS n
    WHERE n.thread_id = {thread}.thread_id AND n.created_at >= {cutoff}
)
OR {thread}.thread_id = ANY(%(spare)s::text[])
"""
_CUTOFF = "coalesce(to_timestamp(%(now)s::float8), now()) - %(ttl)s * interval '1 second'"
_IS_ARCHIVE = "strpos({thread_id}, '" + ARCHIVE_SEPARATOR + "') > 0"
_OWNER = "split_part({thread_id}, '" + ARCHIVE_SEPARATOR + "', 1)"

EXPIRED_RECORDS_SQL = f"""
SELECT r.thread_id FROM workflow_records AS r
WHERE r.updated_at < {_CUTOFF}
  AND NOT {_IS_ARCHIVE.format(thread_id="r.thread_id")}
  AND NOT ({_EXEMPT.format(thread="r", cutoff=_CUTOFF)})
ORDER BY r.updated_at
LIMIT %(limit)s
FOR UPDATE OF r SKIP LOCKED
"""

# Rows, not threads: DISTINCT would read every old checkpoint before the LIMIT applied.
EXPIRED_CHECKPOINT_ONLY_SQL = f"""
SELECT c.thread_id FROM cp_checkpoints AS c
WHERE c.created_at < {_CUTOFF}
  AND NOT EXISTS (SELECT 1 FROM workflow_records AS r WHERE r.thread_id = c.thread_id)
  AND NOT ({_EXEMPT.format(thread="c", cutoff=_CUTOFF)})
ORDER BY c.created_at
LIMIT %(limit)s
"""

# Archive records whose owner has neither a record nor a checkpoint left.
EXPIRED_ORPHAN_ARCHIVES_SQL = f"""
SELECT r.thread_id FROM workflow_records AS r
WHERE {_IS_ARCHIVE.format(thread_id="r.thread_id")}
  AND r.updated_at < {_CUTOFF}
  AND NOT EXISTS (
    SELECT 1 FROM workflow_records AS o WHERE o.thread_id = {_OWNER.format(thread_id="r.thread_id")}
  )
  AND NOT EXISTS (
    SELECT 1 FROM cp_checkpoints AS c WHERE c.thread_id = {_OWNER.format(thread_id="r.thread_id")}
  )
ORDER BY r.updated_at
LIMIT %(limit)s
FOR UPDATE OF r SKIP LOCKED
"""

# Of the threads found expired, those whose maintenance lock (THREAD_MAINTENANCE_LOCK, as
# delete_thread takes it) this sweep takes: a write-through put holding its parent row
# (`PARENT_KEPT_CTE`, the lock shared) would commit after the delete's snapshot and bring
# the thread back as one checkpoint whose parent is gone. The others are spared (a thread
# being written is not idle). A statement of its own, before the second look: a put that
# committed before it is seen there; one arriving later waits for the sweep, then finds
# its parent gone. Tried, never waited for: the sweep holds records and fences by now, and
# a fenced delete_thread holding the lock waits for its fence row (a cycle).
LOCK_EXPIRED_SQL = f"""
SELECT t.thread_id FROM unnest(%(thread_ids)s::text[]) AS t(thread_id)
WHERE pg_try_advisory_xact_lock({THREAD_MAINTENANCE_LOCK}, hashtext(t.thread_id))
"""

# Of the threads found expired, those still expired now: asked again once their records are
# locked and their flush fences raised (a flush batch landing after that waits, then is
# refused), so a step a run flushed (or wrote through) since the first look spares its
# thread instead of being deleted after it was acknowledged.
STILL_EXPIRED_SQL = f"""
SELECT t.thread_id FROM unnest(%(thread_ids)s::text[]) AS t(thread_id)
WHERE NOT ({_EXEMPT.format(thread="t", cutoff=_CUTOFF)})
  AND NOT EXISTS (
    SELECT 1 FROM workflow_records AS r
    WHERE r.thread_id = t.thread_id AND r.updated_at >= {_CUTOFF}
  )
"""
# The threads, and the archive records they own; counts the threads whose record or
# checkpoints this statement removed: a thread with no record to lock (checkpoints alone)
# may be deleted by another sweep first, and must not be counted twice. Each thread is
# marked deleted as delete_thread marks it (`cp_deleted_threads`): a put_writes racing the
# delete leaves writes no other query finds. On the sweep's clock, so the marker waits a
# TTL from this delete, not expired by the same sweep's EXPIRED_DELETIONS_SQL.
DELETE_THREADS_SQL = f"""
WITH doomed AS (
    SELECT unnest(%(thread_ids)s::text[]) AS thread_id
    UNION
    SELECT w.thread_id FROM workflow_records AS w
    WHERE {_IS_ARCHIVE.format(thread_id="w.thread_id")}
      AND {_OWNER.format(thread_id="w.thread_id")} = ANY(%(thread_ids)s)
), dropped_audit AS (
    DELETE FROM state_audit_log WHERE thread_id IN (SELECT thread_id FROM doomed)
), dropped_writes AS (
    DELETE FROM cp_writes WHERE thread_id = ANY(%(thread_ids)s)
), dropped_blobs AS (
    DELETE FROM cp_blobs WHERE thread_id = ANY(%(thread_ids)s)
), dropped_chunks AS (
    DELETE FROM cp_chunks WHERE thread_id = ANY(%(thread_ids)s)
), dropped_checkpoints AS (
    DELETE FROM cp_checkpoints WHERE thread_id = ANY(%(thread_ids)s) RETURNING thread_id
), dropped_holds AS (
    DELETE FROM retention_holds WHERE thread_id = ANY(%(thread_ids)s)
), marked AS (
    INSERT INTO cp_deleted_threads AS d (thread_id, deleted_at, before_checkpoint_id)
    SELECT DISTINCT t.thread_id, coalesce(to_timestamp(%(now)s::float8), now()), %(before_id)s
    FROM unnest(%(thread_ids)s::text[]) AS t(thread_id)
    WHERE NOT {_IS_ARCHIVE.format(thread_id="t.thread_id")}
    ON CONFLICT (thread_id) DO UPDATE
    SET deleted_at = greatest(d.deleted_at, EXCLUDED.deleted_at),
        before_checkpoint_id = greatest(d.before_checkpoint_id, EXCLUDED.before_checkpoint_id)
), dropped_records AS (
    DELETE FROM workflow_records WHERE thread_id IN (SELECT thread_id FROM doomed)
    RETURNING thread_id
)
SELECT count(*) AS deleted FROM (
    SELECT thread_id FROM dropped_checkpoints UNION SELECT thread_id FROM dropped_records
) AS gone
WHERE thread_id = ANY(%(thread_ids)s)
"""


# Flush fences (`cp_flush_fences`, migration 8) of threads not flushed for a TTL, deleted
# or not: a fence guards against a flusher paused mid-batch, never for that long. Its
# token is the flush lock's time in microseconds.
EXPIRED_FENCES_SQL = f"""
DELETE FROM cp_flush_fences
WHERE token < (extract(epoch FROM {_CUTOFF}) * 1000000)::bigint
"""

# Holds of threads that store nothing (a hold that waited for the sweep deleting its thread,
# `HOLD_SQL`, or taken on no thread), held or not, once older than the TTL, as Cosmos drops
# a lone hold marker: kept, one would exempt a new case of that id from expiring for good.
# Their threads' maintenance locks tried, as `HOLD_SQL` takes them (a hold under way is
# skipped), only once the lone holds are found (MATERIALIZED): tried on every row first,
# they could fill the server's lock table. A batch per sweep; the rest go with the next.
LONE_HOLDS_SQL = f"""
WITH lone AS MATERIALIZED (
    SELECT h.thread_id FROM retention_holds AS h
    WHERE h.changed_at < {_CUTOFF}
      AND NOT EXISTS (SELECT 1 FROM workflow_records AS r WHERE r.thread_id = h.thread_id)
      AND NOT EXISTS (SELECT 1 FROM cp_checkpoints AS c WHERE c.thread_id = h.thread_id)
    LIMIT %(limit)s
)
DELETE FROM retention_holds AS h
WHERE h.thread_id IN (
    SELECT l.thread_id FROM lone AS l
    WHERE pg_try_advisory_xact_lock({THREAD_MAINTENANCE_LOCK}, hashtext(l.thread_id))
)
"""

# Marks (`cp_deleted_threads`, migration 10) a TTL old, with the pending writes their
# threads were left with (of checkpoints older than the delete), unless a new run stored
# checkpoints since (its writes may land before its checkpoint's put: LangGraph does not
# order them; newer than the delete, they are never taken). Only writes: a put's blobs
# and chunks go in the statement of its checkpoint, never left without it, and a new put
# may name an old chunk it found stored. A thread whose maintenance lock is held (a delete
# of it again) is skipped, as one another sweep took; tried, never waited for.
EXPIRED_DELETIONS_SQL = f"""
WITH expired AS (
    DELETE FROM cp_deleted_threads AS d
    WHERE d.thread_id IN (
        SELECT m.thread_id FROM cp_deleted_threads AS m
        WHERE m.deleted_at < {_CUTOFF}
          AND pg_try_advisory_xact_lock({THREAD_MAINTENANCE_LOCK}, hashtext(m.thread_id))
        ORDER BY m.deleted_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    RETURNING d.thread_id, d.before_checkpoint_id
), dropped_writes AS (
    DELETE FROM cp_writes AS w USING expired AS e
    WHERE w.thread_id = e.thread_id
      AND w.checkpoint_id < e.before_checkpoint_id
      AND NOT EXISTS (SELECT 1 FROM cp_checkpoints AS c WHERE c.thread_id = e.thread_id)
)
SELECT count(*) AS expired FROM expired
"""


class PostgresRetention:
    """`ColdRetention` on the Postgres pool shared through a `PostgresConnection`."""

    name = "postgres"

    def __init__(self, connection: PostgresConnection, *, ttl_seconds: int) -> None:
        self._pg = connection
        self._ttl_seconds = ttl_seconds

    async def hold(self, thread_id: str) -> None:
        async with self._pg.connection("hold") as conn:
            await conn.execute(HOLD_SQL, {"thread_id": thread_id})

    async def release(self, thread_id: str) -> None:
        async with self._pg.connection("release") as conn:
            await conn.execute(RELEASE_SQL, (thread_id,))

    async def sweep(
        self,
        *,
        limit: int,
        now: float | None = None,
        expiring: Callable[[str], Awaitable[int | None]] | None = None,
        spare: Collection[str] = (),
        deadline: float | None = None,
        deleting: Callable[[str], Awaitable[bool]] | None = None,
        spared: Callable[[str], Awaitable[None]] | None = None,
    ) -> int:
        if self._ttl_seconds < 0:
            return 0
        swept = 0
        # Spared by this sweep's batches: still expired (`deleting` said no), the next batch
        # would list one again, and forgetting it again (`expiring`) would refuse its run's
        # appends anew.
        kept: list[str] = []

        async def keep(thread_id: str) -> None:
            kept.append(thread_id)
            if spared is not None:
                await spared(thread_id)

        while swept < limit and (deadline is None or time.monotonic() < deadline):
            found, deleted = await self._sweep_batch(
                min(SWEEP_BATCH, limit - swept), now, expiring, [*spare, *kept], deleting, keep
            )
            # Until a batch finds none: one whose threads were all spared (kept out of the
            # next batches) must not end the sweep, or a batch's worth of threads that are
            # spared every time would keep every thread behind them from expiring.
            if not found:
                break
            swept += deleted
        async with self._pg.connection("sweep") as conn:
            await conn.execute(EXPIRED_FENCES_SQL, {"ttl": self._ttl_seconds, "now": now})
            await conn.execute(
                LONE_HOLDS_SQL, {"ttl": self._ttl_seconds, "now": now, "limit": SWEEP_BATCH}
            )
        await self._sweep_deletions(now, deadline)
        return swept

    async def _sweep_deletions(self, now: float | None, deadline: float | None) -> None:
        """The marks of deleted threads a TTL old, with their leftover writes (not counted:
        their threads were deleted, not swept), a batch per statement until one is short;
        one batch past the deadline too, as the fences, so a busy sweep still gets to them."""
        params = {"ttl": self._ttl_seconds, "now": now, "limit": SWEEP_BATCH}
        while True:
            async with self._pg.connection("sweep") as conn:
                cursor = await conn.execute(EXPIRED_DELETIONS_SQL, params)
                row = await cursor.fetchone()
            if row is None or row["expired"] < SWEEP_BATCH:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return

    async def _sweep_batch(
        self,
        limit: int,
        now: float | None,
        expiring: Callable[[str], Awaitable[int | None]] | None,
        spare: list[str],
        deleting: Callable[[str], Awaitable[bool]] | None,
        spared: Callable[[str], Awaitable[None]],
    ) -> tuple[int, int]:
        """How many expired threads the batch found, and how many it deleted."""
        params: dict[str, int | float | list[str] | None] = {
            "ttl": self._ttl_seconds,
            "limit": limit,
            "now": now,
            "spare": spare,
        }
        async with self._pg.transaction("sweep") as conn:
            expired = await _expired(conn, params, limit)
            if expiring is not None:
                # Inside the transaction, the records locked: a writer of one of these
                # threads waits, then finds it gone. A failure rolls the batch back.
                for thread_id in expired:
                    fence = await expiring(thread_id)
                    if fence is not None:
                        await conn.execute(
                            RAISE_FENCE_SQL, {"thread_id": thread_id, "token": fence}
                        )
            still: list[str] = []
            if expired:
                locked = await _thread_ids(conn, LOCK_EXPIRED_SQL, {"thread_ids": expired})
                still = await _thread_ids(conn, STILL_EXPIRED_SQL, {**params, "thread_ids": locked})
            doomed: list[str] = []
            for thread_id in expired:
                if thread_id in still and (deleting is None or await deleting(thread_id)):
                    doomed.append(thread_id)
                else:
                    await spared(thread_id)
            if not doomed:
                return len(expired), 0
            cursor = await conn.execute(
                DELETE_THREADS_SQL,
                # A checkpoint id of the delete's real time, even on a sweep told another `now`:
                # the writes it bounds were made on real clocks.
                {"thread_ids": doomed, "now": now, "before_id": str(uuid6(clock_seq=-1))},
            )
            row = await cursor.fetchone()
        return len(expired), int(row["deleted"]) if row else 0


async def _expired(
    conn: CountedConnection, params: dict[str, int | float | list[str] | None], limit: int
) -> list[str]:
    """Up to `limit` expired threads: with records, checkpoints only, orphan archives."""
    expired = await _thread_ids(conn, EXPIRED_RECORDS_SQL, params)
    for query in (EXPIRED_CHECKPOINT_ONLY_SQL, EXPIRED_ORPHAN_ARCHIVES_SQL):
        if len(expired) < limit:
            more = await _thread_ids(conn, query, {**params, "limit": limit - len(expired)})
            expired += [thread_id for thread_id in more if thread_id not in expired]
    return expired


async def _thread_ids(
    conn: CountedConnection, query: str, params: Mapping[str, object]
) -> list[str]:
    """Distinct thread ids in the order the query returns them."""
    cursor = await conn.execute(query, params)
    return list(dict.fromkeys(str(row["thread_id"]) for row in await cursor.fetchall()))
