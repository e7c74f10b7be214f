"""LangGraph checkpoint storage in Postgres (the `CheckpointStore` port).

Three tables: `cp_checkpoints` (one row per checkpoint, channel values left
out), `cp_blobs` (one row per channel version, written only when it changes)
and `cp_writes` (pending writes per task). Payloads are bytea, so values of
any size fit. The latest checkpoint, with its blobs and pending writes, is one
statement led by a backward scan of the primary key; `list_checkpoints` pages
with keyset pagination, never loading a whole thread. Payloads cross the wire
in binary both ways (parameters and results): text format would hex-escape
every blob and cost more than the statement itself once a thread holds a
megabyte of messages. Every write, and any write-behind batch, is one statement.

A large blob is stored as a manifest over the thread's chunks in `cp_chunks`
(`state.cold.chunks`: what a version that only grew stores is what it added).
Chunk rows go in the statement that writes their manifest; a read that meets
manifests fetches their chunks with one more statement (a recursive walk down
the nodes). Deleting a thread drops its chunks; pruning and `delete_for_runs`
then delete the chunks no remaining manifest reaches, in their transaction.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

import psycopg
from langgraph.checkpoint.base.id import uuid6
from psycopg.types.json import Jsonb

from ..errors import (
    BackendUnavailable,
    CorruptState,
    ParentGone,
    RequestRejected,
    RunsPartlyDeleted,
    RunsStillWriting,
    StaleFencingToken,
)
from ..ports import (
    JSON,
    ChannelHistory,
    CheckpointPut,
    FlushOp,
    PruneStrategy,
    StoredBlob,
    StoredCheckpoint,
    StoredWrite,
    WritesPut,
)
from ..schema import CURRENT, upcast
from .chunks import (
    DIGEST_BYTES,
    MANIFEST_HEADER,
    MANIFEST_TYPE_PREFIX,
    Chunk,
    Chunker,
    Fetch,
    Known,
    PendingSplits,
    chunked,
    fetched_first,
    reachable,
    resolve,
    resolve_checkpoints,
)
from .metadata_filters import compared_here, equal_scalars
from .postgres_client import (
    CountedConnection,
    CountingBlockingRawCursor,
    CountingRawCursor,
    PostgresConnection,
    dump_json,
)

T = TypeVar("T")

# Threads this process remembers as using a DeltaChannel (see `_delta_threads`).
DELTA_THREADS_MEMO_SIZE = 10_000
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
# Executed with binary results, so blobs arrive as raw bytes.
SELECT_CHECKPOINTS_SQL = f"""
SELECT {CHECKPOINT_COLUMNS},
    (
        SELECT array_agg(ARRAY[convert_to(b.channel, 'UTF8'), convert_to(b.type, 'UTF8'),
                               b.blob, convert_to(b.schema_version::text, 'UTF8')])
        -- A damaged (non-object) column reads as no blobs, refused as damage after.
        FROM jsonb_each_text(CASE jsonb_typeof(c.channel_versions)
                             WHEN 'object' THEN c.channel_versions END) AS v
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

WRITE_COLUMNS = "task_id, task_path, idx, channel, type, blob, schema_version"

# Writes are multi-row VALUES with one bind parameter per field: payloads travel as
# binary bytea parameters, never escaped into text nor packed into an array the
# server must take apart again (both cost more than the insert itself at 1 MB).
# Each data-modifying CTE inserts one kind of row, so a batch of any mix is one
# statement: atomic on its own and one round trip. Its text varies with the batch,
# so it is written with the server's own placeholders (`$1`) and sent by a raw
# cursor: psycopg parses (and caches) only short statements of up to 50 parameters,
# and re-parsing a flush's statement cost more CPU than the rest of the flush's
# client side (about 1.3 ms per batch of a support case).
BLOB_TABLE = "cp_blobs (thread_id, checkpoint_ns, channel, version, type, blob, schema_version)"
# A blob version never changes once written, so a repeat is ignored.
BLOB_CONFLICT = "ON CONFLICT (thread_id, checkpoint_ns, channel, version) DO NOTHING"

CHECKPOINT_TABLE = f"cp_checkpoints ({CHECKPOINT_COLUMNS})"
CHECKPOINT_CONFLICT = """ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE SET
    parent_checkpoint_id = EXCLUDED.parent_checkpoint_id,
    type = EXCLUDED.type,
    checkpoint = EXCLUDED.checkpoint,
    metadata = EXCLUDED.metadata,
    channel_versions = EXCLUDED.channel_versions,
    schema_version = EXCLUDED.schema_version"""

CHUNK_TABLE = "cp_chunks (thread_id, digest, node, data)"
# A chunk is named by its content: a repeat is the same row.
CHUNK_CONFLICT = "ON CONFLICT (thread_id, digest) DO NOTHING"

WRITE_TABLE = f"cp_writes (thread_id, checkpoint_ns, checkpoint_id, {WRITE_COLUMNS})"
WRITE_KEY = "(thread_id, checkpoint_ns, checkpoint_id, task_id, idx)"
INSERT_WRITE_CONFLICT = f"ON CONFLICT {WRITE_KEY} DO NOTHING"
UPSERT_WRITE_CONFLICT = f"""ON CONFLICT {WRITE_KEY} DO UPDATE SET
    task_path = EXCLUDED.task_path,
    channel = EXCLUDED.channel,
    type = EXCLUDED.type,
    blob = EXCLUDED.blob,
    schema_version = EXCLUDED.schema_version"""

# In the order they are inserted: the chunks a manifest blob names and the blobs a
# checkpoint references come first, so a batch split over several statements (in one
# transaction) keeps that order too.
# Each with the number of columns its rows carry.
ROW_KINDS: tuple[tuple[str, int, str], ...] = (
    (CHUNK_TABLE, 4, CHUNK_CONFLICT),
    (BLOB_TABLE, 7, BLOB_CONFLICT),
    (CHECKPOINT_TABLE, 9, CHECKPOINT_CONFLICT),
    (WRITE_TABLE, 10, INSERT_WRITE_CONFLICT),
    (WRITE_TABLE, 10, UPSERT_WRITE_CONFLICT),
)
# Postgres takes at most 65,535 bind parameters per statement.
MAX_STATEMENT_PARAMETERS = 65_535

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

# Every chunk the manifests' roots reach in a thread: down the nodes, one statement.
GET_CHUNKS_SQL = f"""
WITH RECURSIVE wanted (digest) AS (
    SELECT unnest(%(roots)s::bytea[])
  UNION
    SELECT substring(c.data FROM n * {DIGEST_BYTES} + 1 FOR {DIGEST_BYTES})
    FROM wanted AS w
    JOIN cp_chunks AS c ON c.thread_id = %(thread_id)s AND c.digest = w.digest AND c.node
    CROSS JOIN LATERAL generate_series(0, length(c.data) / {DIGEST_BYTES} - 1) AS n
)
SELECT c.digest, c.node, c.data FROM cp_chunks AS c
WHERE c.thread_id = %(thread_id)s AND c.digest IN (SELECT digest FROM wanted)
"""

# What the chunk collection after a prune needs: the manifests and the nodes of threads.
CHUNK_MANIFESTS_SQL = f"""
SELECT thread_id, blob FROM cp_blobs
WHERE thread_id = ANY(%(thread_ids)s) AND type LIKE '{MANIFEST_TYPE_PREFIX}%%'
"""
CHUNK_NODES_SQL = """
SELECT thread_id, digest, data FROM cp_chunks WHERE thread_id = ANY(%(thread_ids)s) AND node
"""
DELETE_UNREACHED_CHUNKS_SQL = """
DELETE FROM cp_chunks WHERE thread_id = %(thread_id)s AND NOT (digest = ANY(%(kept)s))
"""

# With `mark`, each thread is marked deleted (migration 10): writes a put_writes lands
# after the delete stay, and the retention sweep removes them once the mark is a TTL old,
# those of checkpoints older than `before_id` (a checkpoint id made at the delete). Without
# a retention sweep nothing would ever remove the marks.
DELETE_THREADS_SQL = """
WITH dropped_writes AS (
    DELETE FROM cp_writes WHERE thread_id = ANY(%(thread_ids)s)
), dropped_blobs AS (
    DELETE FROM cp_blobs WHERE thread_id = ANY(%(thread_ids)s)
), dropped_chunks AS (
    DELETE FROM cp_chunks WHERE thread_id = ANY(%(thread_ids)s)
), marked AS (
    INSERT INTO cp_deleted_threads (thread_id, deleted_at, before_checkpoint_id)
    SELECT DISTINCT unnest(%(thread_ids)s::text[]), now(), %(before_id)s WHERE %(mark)s
    ON CONFLICT (thread_id) DO UPDATE
    SET deleted_at = EXCLUDED.deleted_at, before_checkpoint_id = EXCLUDED.before_checkpoint_id
)
DELETE FROM cp_checkpoints WHERE thread_id = ANY(%(thread_ids)s)
"""

# SQLSTATE the fence trigger raises (migration 8, `checkpoint_flush_fences`).
STALE_FLUSH_SQLSTATE = "SF001"

FENCE_INSERT = """INSERT INTO cp_flush_fences AS f (thread_id, token) VALUES ($1, $2)
    ON CONFLICT (thread_id) DO UPDATE SET token = EXCLUDED.token"""

RAISE_FENCE_SQL = """
INSERT INTO cp_flush_fences AS f (thread_id, token) VALUES (%(thread_id)s, %(token)s)
ON CONFLICT (thread_id) DO UPDATE SET token = GREATEST(f.token, EXCLUDED.token)
"""

COPY_THREAD_SQL = f"""
WITH copied_chunks AS (
    INSERT INTO cp_chunks (thread_id, digest, node, data)
    SELECT %(target)s, digest, node, data FROM cp_chunks WHERE thread_id = %(source)s
    ON CONFLICT DO NOTHING
), copied_blobs AS (
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
INSERT INTO cp_checkpoints ({CHECKPOINT_COLUMNS}, spared)
SELECT %(target)s, checkpoint_ns, checkpoint_id, parent_checkpoint_id, type, checkpoint,
       metadata, channel_versions, schema_version, spared
FROM cp_checkpoints WHERE thread_id = %(source)s
ON CONFLICT DO NOTHING
"""

# LangGraph's DeltaChannel keeps no value in most checkpoints: a channel's value is its
# seed (the value stored at the nearest ancestor that has one) replayed with the writes
# of the ancestors from there on. `DELTA_CHAIN_CTE` walks those chains in SQL: from
# `delta_starts` rows (thread, namespace, parent id to start at, channel) up the parent
# links, a row per (checkpoint, channel) whose writes count, until the checkpoint stores a
# value of the channel (`seeded`). UNION keeps each (checkpoint, channel) once, so many
# starts sharing ancestors cost no more than the ancestors, and a corrupt cyclic chain
# ends. Every step is a primary-key lookup: the cost follows the chains, not the thread.
DELTA_CHAIN_CTE = """
delta_chain AS (
    SELECT c.thread_id, c.checkpoint_ns, c.checkpoint_id, c.parent_checkpoint_id,
           c.channel_versions ->> s.channel AS version, s.channel,
           EXISTS (
               SELECT 1 FROM cp_blobs AS b
               WHERE b.thread_id = c.thread_id AND b.checkpoint_ns = c.checkpoint_ns
                 AND b.channel = s.channel AND b.version = c.channel_versions ->> s.channel
                 AND b.type <> 'empty'
           ) AS seeded
    FROM delta_starts AS s
    JOIN cp_checkpoints AS c
      ON c.thread_id = s.thread_id AND c.checkpoint_ns = s.checkpoint_ns
     AND c.checkpoint_id = s.parent_checkpoint_id
  UNION
    SELECT c.thread_id, c.checkpoint_ns, c.checkpoint_id, c.parent_checkpoint_id,
           c.channel_versions ->> p.channel, p.channel,
           EXISTS (
               SELECT 1 FROM cp_blobs AS b
               WHERE b.thread_id = c.thread_id AND b.checkpoint_ns = c.checkpoint_ns
                 AND b.channel = p.channel AND b.version = c.channel_versions ->> p.channel
                 AND b.type <> 'empty'
           )
    FROM delta_chain AS p
    JOIN cp_checkpoints AS c
      ON c.thread_id = p.thread_id AND c.checkpoint_ns = p.checkpoint_ns
     AND c.checkpoint_id = p.parent_checkpoint_id
    WHERE NOT p.seeded
)
"""

# The chunks of the seeds `delta_chain` stopped at that are stored as manifests (chunked
# DeltaChannel snapshots, `state.cold.chunks`), every node and leaf of them: so a history
# and the seed it starts from come in one statement. A manifest names its roots after a
# fixed header (`MANIFEST_HEADER`), the root count in its last two bytes, big-endian.
# `{{thread}}` is the one thread the statement reads: the planner guesses a thousand
# digests per manifest or node, and with only the CTE's thread column to go by it chose
# to hash a sequential scan of every thread's chunks once the table was large.
SEED_CHUNKS_CTE = f"""
seed_manifests AS (
    SELECT b.thread_id, b.blob
    FROM delta_chain AS ch
    JOIN cp_blobs AS b
      ON b.thread_id = ch.thread_id AND b.checkpoint_ns = ch.checkpoint_ns
     AND b.channel = ch.channel AND b.version = ch.version
    WHERE ch.seeded AND b.type LIKE '{MANIFEST_TYPE_PREFIX}%%'
), seed_chunks (thread_id, digest) AS (
    SELECT m.thread_id, substring(m.blob FROM {MANIFEST_HEADER.size} + n * {DIGEST_BYTES} + 1
                                  FOR {DIGEST_BYTES})
    FROM seed_manifests AS m
    CROSS JOIN LATERAL generate_series(
        0,
        get_byte(m.blob, {MANIFEST_HEADER.size - 2}) * 256
            + get_byte(m.blob, {MANIFEST_HEADER.size - 1}) - 1
    ) AS n
  UNION
    SELECT c.thread_id, substring(c.data FROM n * {DIGEST_BYTES} + 1 FOR {DIGEST_BYTES})
    FROM seed_chunks AS w
    JOIN cp_chunks AS c ON c.thread_id = {{thread}} AND c.digest = w.digest AND c.node
    CROSS JOIN LATERAL generate_series(0, length(c.data) / {DIGEST_BYTES} - 1) AS n
)
"""
SEED_CHUNK_ROWS = """
SELECT CASE WHEN c.node THEN 'n' ELSE 'l' END, '', '', '', 0, '', '', c.data, 0, c.digest
FROM cp_chunks AS c
WHERE c.thread_id = {thread} AND c.digest IN (SELECT digest FROM seed_chunks)
"""

# Starts for the checkpoints `checkpoint` names: each channel its metadata counts as
# updated since its last DeltaChannel snapshot (LangGraph's own record of the delta
# channels whose value at this checkpoint is rebuilt from ancestors).
DELTA_STARTS_OF = """
SELECT {checkpoint}.thread_id, {checkpoint}.checkpoint_ns,
       {checkpoint}.parent_checkpoint_id, counted.channel
FROM {source}
CROSS JOIN LATERAL jsonb_object_keys(
    COALESCE({checkpoint}.metadata -> 'counters_since_delta_snapshot', '{{}}'::jsonb)
) AS counted (channel)
WHERE {checkpoint}.channel_versions ? counted.channel
"""

# The delta history of one checkpoint in one statement: the chain's writes of each
# channel asked for, the seed where its walk stopped, and the seed's chunks (kind `n`
# for a node, `l` for a leaf) if it is stored as a manifest.
DELTA_HISTORY_SQL = f"""
WITH RECURSIVE delta_starts AS (
    SELECT thread_id, checkpoint_ns, parent_checkpoint_id, channel
    FROM cp_checkpoints CROSS JOIN unnest(%(channels)s::text[]) AS wanted (channel)
    WHERE thread_id = %(thread_id)s AND checkpoint_ns = %(checkpoint_ns)s
      AND checkpoint_id = %(checkpoint_id)s
), {DELTA_CHAIN_CTE}, {SEED_CHUNKS_CTE.format(thread="%(thread_id)s")}
SELECT 'w' AS kind, ch.checkpoint_id, w.task_id, w.task_path, w.idx, w.channel, w.type,
       w.blob, w.schema_version, NULL::bytea AS digest
FROM delta_chain AS ch
JOIN cp_writes AS w
  ON w.thread_id = ch.thread_id AND w.checkpoint_ns = ch.checkpoint_ns
 AND w.checkpoint_id = ch.checkpoint_id AND w.channel = ch.channel
UNION ALL
SELECT 'b' AS kind, ch.checkpoint_id, '' AS task_id, '' AS task_path, 0 AS idx, b.channel,
       b.type, b.blob, b.schema_version, NULL
FROM delta_chain AS ch
JOIN cp_blobs AS b
  ON b.thread_id = ch.thread_id AND b.checkpoint_ns = ch.checkpoint_ns
 AND b.channel = ch.channel AND b.version = ch.version
WHERE ch.seeded
UNION ALL
{SEED_CHUNK_ROWS.format(thread="%(thread_id)s")}
"""

# A checkpoint with its blobs, its writes and the delta history of the channels its
# metadata names as rebuilt (LangGraph's `counters_since_delta_snapshot`), all in one
# statement: the history rows (`s` one per channel walked, `w` writes, `b` seeds, `n` and
# `l` the seeds' chunks) as arrays of bytea arrays, like the blobs and writes.
SELECT_CHECKPOINT_WITH_HISTORY_SQL = f"""
SELECT q.*, (
    WITH RECURSIVE delta_starts AS (
        {DELTA_STARTS_OF.format(checkpoint="q", source="(SELECT 1) AS one")}
    ), {DELTA_CHAIN_CTE}, {SEED_CHUNKS_CTE.format(thread="q.thread_id")}
    SELECT array_agg(ARRAY[convert_to(h.kind, 'UTF8'), convert_to(h.checkpoint_id, 'UTF8'),
                           convert_to(h.task_id, 'UTF8'), convert_to(h.task_path, 'UTF8'),
                           convert_to(h.idx::text, 'UTF8'), convert_to(h.channel, 'UTF8'),
                           convert_to(h.type, 'UTF8'), h.blob,
                           convert_to(h.schema_version::text, 'UTF8'), h.digest])
    FROM (
        SELECT DISTINCT 's' AS kind, '' AS checkpoint_id, '' AS task_id, '' AS task_path,
               0 AS idx, s.channel, '' AS type, ''::bytea AS blob, 0 AS schema_version,
               ''::bytea AS digest
        FROM delta_starts AS s
        UNION ALL
        SELECT 'w', ch.checkpoint_id, w.task_id, w.task_path, w.idx, w.channel, w.type,
               w.blob, w.schema_version, ''::bytea
        FROM delta_chain AS ch
        JOIN cp_writes AS w
          ON w.thread_id = ch.thread_id AND w.checkpoint_ns = ch.checkpoint_ns
         AND w.checkpoint_id = ch.checkpoint_id AND w.channel = ch.channel
        UNION ALL
        SELECT 'b', ch.checkpoint_id, '', '', 0, b.channel, b.type, b.blob, b.schema_version,
               ''::bytea
        FROM delta_chain AS ch
        JOIN cp_blobs AS b
          ON b.thread_id = ch.thread_id AND b.checkpoint_ns = ch.checkpoint_ns
         AND b.channel = ch.channel AND b.version = ch.version
        WHERE ch.seeded
        UNION ALL
        {SEED_CHUNK_ROWS.format(thread="q.thread_id")}
    ) AS h
) AS history_rows
FROM ({SELECT_CHECKPOINTS_SQL} {{where}}) AS q
"""

# get_checkpoint's statements, built once: a statement text made per call is parsed
# for placeholders per call too.
_LATEST = "WHERE thread_id = %s AND checkpoint_ns = %s ORDER BY checkpoint_id DESC LIMIT 1"
_BY_ID = "WHERE thread_id = %s AND checkpoint_ns = %s AND checkpoint_id = %s"
LATEST_SQL = f"{SELECT_CHECKPOINTS_SQL} {_LATEST}"
BY_ID_SQL = f"{SELECT_CHECKPOINTS_SQL} {_BY_ID}"
LATEST_WITH_HISTORY_SQL = SELECT_CHECKPOINT_WITH_HISTORY_SQL.replace("{where}", _LATEST)
BY_ID_WITH_HISTORY_SQL = SELECT_CHECKPOINT_WITH_HISTORY_SQL.replace("{where}", _BY_ID)
# By id for a caller, to whom a checkpoint delete_for_runs kept only for a later one's
# DeltaChannel history is deleted (a latest never is one).
_BY_ID_UNSPARED = f"{_BY_ID} AND NOT spared"
UNSPARED_BY_ID_SQL = f"{SELECT_CHECKPOINTS_SQL} {_BY_ID_UNSPARED}"
UNSPARED_BY_ID_WITH_HISTORY_SQL = SELECT_CHECKPOINT_WITH_HISTORY_SQL.replace(
    "{where}", _BY_ID_UNSPARED
)

# A thread's maintenance lock. Two delete_for_runs of one thread take turns: each works out
# from its own snapshot which checkpoints survive, so one marking a checkpoint spared for a
# run the other is deleting would keep it for good. Threads deleted whole (delete_thread,
# prune "delete") take it too: a put that holds its parent row when the delete starts would
# commit after the delete's snapshot and survive it, its parent gone. Taken in a statement
# of its own before the delete's, so the delete waits for such a put and then deletes its
# checkpoint; a put arriving later waits for the delete and finds its parent gone. Locked
# in the order of the keys (two calls never wait for each other in a cycle, threads whose
# keys collide included); OFFSET 0 keeps that order. (The retention sweep tries it
# instead: postgres_retention.LOCK_EXPIRED_SQL.)
THREAD_MAINTENANCE_LOCK = 8842
LOCK_THREADS_SQL = """
SELECT pg_advisory_xact_lock(%(lock)s, t.key) FROM (
    SELECT DISTINCT hashtext(thread_id) AS key FROM unnest(%(thread_ids)s::text[]) AS thread_id
    ORDER BY key OFFSET 0
) AS t
"""
# Threads a prune (or delete_for_runs) locks and prunes per transaction: the lock table
# holds max_locks_per_transaction (64 by default) per server connection, shared by all.
PRUNE_BATCH = 500

# The threads delete_for_runs deletes from, to lock and delete a batch of them at a time.
RUN_THREADS_SQL = """
SELECT DISTINCT thread_id FROM cp_checkpoints WHERE metadata ->> 'run_id' = ANY(%(run_ids)s)
"""
# The threads holding a checkpoint of the runs that a delete_for_runs left (spared ones
# aside, which it keeps on purpose): one the runs first wrote to after its listing, or a
# put with no parent (nothing to refuse it) that waited for its batch's lock.
LATE_RUN_THREADS_SQL = """
SELECT DISTINCT thread_id FROM cp_checkpoints
WHERE metadata ->> 'run_id' = ANY(%(run_ids)s) AND NOT spared
"""
# The threads delete_for_runs left with no checkpoint, marked as a delete of a whole thread
# marks them (`DELETE_THREADS_SQL`): a put_writes of a deleted run landing after it leaves
# writes of a thread with no checkpoint, which only the retention sweep of marks removes.
MARK_EMPTIED_SQL = """
INSERT INTO cp_deleted_threads (thread_id, deleted_at, before_checkpoint_id)
SELECT t.thread_id, now(), %(before_id)s FROM unnest(%(thread_ids)s::text[]) AS t (thread_id)
WHERE NOT EXISTS (SELECT 1 FROM cp_checkpoints AS c WHERE c.thread_id = t.thread_id)
ON CONFLICT (thread_id) DO UPDATE
SET deleted_at = EXCLUDED.deleted_at, before_checkpoint_id = EXCLUDED.before_checkpoint_id
"""
# Looks again delete_for_runs takes for a run still writing to threads, before it gives up.
LATE_RUN_ROUNDS = 3

# A write-through put goes on from its parent only if the parent is still stored and not
# spared (a deleted run's): else delete_for_runs deleted the run writing it, and its step
# would be the thread's latest again. Checked in the put's own statement (no round trip
# more): its checkpoint row takes its id from `parent_kept`, which is empty without the
# parent, so the insert fails on the NULL id (NOT NULL, the whole statement undone). The
# thread's maintenance lock, shared, serializes it with delete_for_runs and the deletes of
# whole threads: waited for by the delete, whose statement after the lock then sees (and
# deletes) this checkpoint; waiting for the delete, the row lock, taken after it, finds
# the parent gone or spared.
# `$thread`, `$ns` and `$parent` are the checkpoint row's own placeholders.
PARENT_KEPT_CTE = f"""parent_kept AS (
    SELECT 1 FROM cp_checkpoints AS p
    CROSS JOIN (
        SELECT pg_advisory_xact_lock_shared({THREAD_MAINTENANCE_LOCK}, hashtext($thread))
    ) AS turn
    WHERE p.thread_id = $thread AND p.checkpoint_ns = $ns AND p.checkpoint_id = $parent
      AND NOT p.spared
    FOR KEY SHARE OF p
)"""
# A write-through put with no parent takes the thread's maintenance lock, shared, too: the
# retention sweep, which locks a thread and asks whether it is still idle before its delete
# statement, deleted such a put committed in between (acknowledged after the sweep's last
# look). Waiting for the sweep instead, it lands after the delete. Its checkpoint row takes
# its id from `turn` (Postgres never runs a CTE nothing reads). No round trip more.
TURN_CTE = f"""turn AS (
    SELECT pg_advisory_xact_lock_shared({THREAD_MAINTENANCE_LOCK}, hashtext($thread))
)"""
# The column the guard leaves NULL (`parent_kept`): its violation is a refused parent.
GUARDED_COLUMN = "checkpoint_id"
NOT_NULL_SQLSTATE = "23502"

# A run's checkpoints, but those on the DeltaChannel chain of a checkpoint that stays
# (another run's descendant): deleting them would silently empty its delta channels.
# Those are marked `spared` instead, and doomed again by the thread's next such delete,
# so once the checkpoints that needed them go too, they do not become the thread's
# latest state again.
DELETE_RUN_CHECKPOINTS_SQL = f"""
WITH RECURSIVE runs AS (
    SELECT thread_id, checkpoint_ns, checkpoint_id FROM cp_checkpoints
    WHERE metadata ->> 'run_id' = ANY(%(run_ids)s) AND thread_id = ANY(%(thread_ids)s)
), threads AS (
    SELECT DISTINCT thread_id FROM runs
), doomed AS (
    -- The runs' checkpoints, and those an earlier call spared in the same threads.
    SELECT * FROM runs
    UNION
    SELECT c.thread_id, c.checkpoint_ns, c.checkpoint_id FROM threads AS t
    CROSS JOIN LATERAL (
        SELECT * FROM cp_checkpoints AS c WHERE c.thread_id = t.thread_id AND c.spared OFFSET 0
    ) AS c
), survivors AS (
    -- A lookup per thread (OFFSET 0 keeps the subquery from being flattened): joined
    -- as a set, the planner hashed a scan of every thread's checkpoints.
    SELECT c.* FROM threads AS t
    CROSS JOIN LATERAL (
        SELECT * FROM cp_checkpoints AS c
        WHERE c.thread_id = t.thread_id AND NOT c.spared
          AND NOT COALESCE(c.metadata ->> 'run_id' = ANY(%(run_ids)s), false)
        OFFSET 0
    ) AS c
), delta_starts AS (
    {DELTA_STARTS_OF.format(checkpoint="survivors", source="survivors")}
), {DELTA_CHAIN_CTE}, kept AS (
    SELECT DISTINCT d.* FROM doomed AS d
    JOIN delta_chain AS k
      ON k.thread_id = d.thread_id AND k.checkpoint_ns = d.checkpoint_ns
     AND k.checkpoint_id = d.checkpoint_id
), marked AS (
    UPDATE cp_checkpoints AS c SET spared = true
    FROM kept AS k
    WHERE c.thread_id = k.thread_id AND c.checkpoint_ns = k.checkpoint_ns
      AND c.checkpoint_id = k.checkpoint_id AND NOT c.spared
)
DELETE FROM cp_checkpoints AS c
USING doomed AS d
WHERE c.thread_id = d.thread_id AND c.checkpoint_ns = d.checkpoint_ns
  AND c.checkpoint_id = d.checkpoint_id
  AND NOT EXISTS (
      SELECT 1 FROM kept AS k
      WHERE k.thread_id = c.thread_id AND k.checkpoint_ns = c.checkpoint_ns
        AND k.checkpoint_id = c.checkpoint_id
  )
RETURNING c.thread_id, c.checkpoint_ns, c.checkpoint_id, c.channel_versions
"""

# Everything but the newest checkpoint of each (thread, namespace) and the ancestors its
# DeltaChannel values are rebuilt from (back to each channel's nearest snapshot).
DELETE_ALL_BUT_LATEST_SQL = f"""
WITH RECURSIVE latest AS (
    SELECT DISTINCT ON (thread_id, checkpoint_ns) *
    FROM cp_checkpoints WHERE thread_id = ANY(%(thread_ids)s)
    ORDER BY thread_id, checkpoint_ns, checkpoint_id DESC
), delta_starts AS (
    {DELTA_STARTS_OF.format(checkpoint="latest", source="latest")}
), {DELTA_CHAIN_CTE}
DELETE FROM cp_checkpoints AS c
USING latest AS l
WHERE c.thread_id = ANY(%(thread_ids)s)
  AND c.thread_id = l.thread_id AND c.checkpoint_ns = l.checkpoint_ns
  AND c.checkpoint_id < l.checkpoint_id
  AND NOT EXISTS (
      SELECT 1 FROM delta_chain AS k
      WHERE k.thread_id = c.thread_id AND k.checkpoint_ns = c.checkpoint_ns
        AND k.checkpoint_id = c.checkpoint_id
  )
RETURNING c.thread_id, c.checkpoint_ns, c.checkpoint_id, c.channel_versions
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
    WHERE w.thread_id = ANY(%(threads)s)
      AND w.thread_id = d.thread_id
      AND w.checkpoint_ns = d.checkpoint_ns
      AND w.checkpoint_id = d.checkpoint_id
), freed AS (
    SELECT DISTINCT d.thread_id, d.checkpoint_ns, v.key AS channel, v.value AS version
    FROM deleted AS d CROSS JOIN LATERAL jsonb_each_text(d.channel_versions) AS v
)
DELETE FROM cp_blobs AS b USING freed AS f
WHERE b.thread_id = ANY(%(threads)s)
  AND b.thread_id = f.thread_id
  AND b.checkpoint_ns = f.checkpoint_ns
  AND b.channel = f.channel
  AND b.version = f.version
  AND NOT EXISTS (
      SELECT 1 FROM cp_checkpoints AS c
      WHERE c.thread_id = ANY(%(threads)s)
        AND c.thread_id = f.thread_id
        AND c.checkpoint_ns = f.checkpoint_ns
        AND c.channel_versions ->> f.channel = f.version
  )
"""


class PostgresCheckpointStore:
    """`CheckpointStore` on Postgres; every multi-row change is one transaction."""

    name = "postgres"

    def __init__(self, connection: PostgresConnection, *, marks_deletions: bool = True) -> None:
        self._pg = connection
        # Whether a retention sweep runs, to take the leftovers of deleted threads (and
        # their marks) a TTL later.
        self._marks_deletions = marks_deletions
        # Threads seen with DeltaChannel counters (a put or a read of this process): their
        # checkpoints are read with their delta history. Others skip that part of the
        # statement: planning it makes an ordinary read measurably slower.
        self._delta_threads: OrderedDict[str, None] = OrderedDict()
        # `_note` runs on the sync API's callers' threads too.
        self._delta_lock = threading.Lock()
        self._chunker = Chunker()

    async def setup(self) -> None:
        await self._pg.setup()

    def _deletion_mark(self) -> dict[str, Any]:
        return {"mark": self._marks_deletions, "before_id": str(uuid6(clock_seq=-1))}

    async def put_checkpoint(
        self,
        checkpoint: StoredCheckpoint,
        blobs: Sequence[StoredBlob],
        *,
        parent_vouched: bool = False,
    ) -> None:
        guarded = checkpoint.parent_checkpoint_id is None or not parent_vouched
        try:
            await self._write("put_checkpoint", [CheckpointPut(checkpoint, blobs)], guarded=guarded)
        except RequestRejected as exc:
            if checkpoint.parent_checkpoint_id is not None and _refused_parent(exc):
                raise _parent_gone(checkpoint) from exc
            raise

    async def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None:
        await self._write(
            "put_writes", [WritesPut(thread_id, checkpoint_ns, checkpoint_id, writes, upsert)]
        )

    def check_checkpoint(self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]) -> None:
        """A row has no item limit a checkpoint could reach; its metadata's jsonb refuses
        what JSON cannot carry (`InvalidValue`)."""
        dump_json(checkpoint.metadata)

    async def apply_batch(self, ops: Sequence[FlushOp], *, fence: int | None = None) -> None:
        if fence is None or not ops:
            await self._write("apply_batch", ops)
            return
        thread_id = ops[0].thread_id
        if any(op.thread_id != thread_id for op in ops):
            raise ValueError("a fenced batch holds the operations of one thread")
        try:
            await self._write("apply_batch", ops, fence=(thread_id, fence))
        except RequestRejected as exc:
            if exc.code != STALE_FLUSH_SQLSTATE:
                raise
            raise StaleFencingToken(thread_id, fence, _fence_of(exc)) from exc

    def _note(self, thread_id: str, metadata: dict[str, JSON]) -> None:
        if "counters_since_delta_snapshot" not in metadata:
            return
        with self._delta_lock:
            self._delta_threads[thread_id] = None
            self._delta_threads.move_to_end(thread_id)
            while len(self._delta_threads) > DELTA_THREADS_MEMO_SIZE:
                self._delta_threads.popitem(last=False)

    def _prepared(
        self, ops: Sequence[FlushOp], fence: tuple[str, int] | None = None, *, guarded: bool
    ) -> tuple[list[tuple[str, list[Any]]], PendingSplits]:
        for op in ops:
            if isinstance(op, CheckpointPut):
                self._note(op.checkpoint.thread_id, op.checkpoint.metadata)
        pending = PendingSplits(self._chunker)
        return _statements(_fold(ops, pending), fence, guarded=guarded), pending

    async def _write(
        self,
        operation: str,
        ops: Sequence[FlushOp],
        *,
        fence: tuple[str, int] | None = None,
        guarded: bool = False,
    ) -> None:
        statements, pending = self._prepared(ops, fence, guarded=guarded)
        if not statements:
            return
        if len(statements) == 1:
            async with self._pg.connection(operation) as conn, CountingRawCursor(conn) as cursor:
                await cursor.execute(*statements[0])
        else:
            # Past the parameter limit: several statements, still atomic and, pipelined
            # (BEGIN and COMMIT included), one round trip.
            async with (
                self._pg.connection(operation) as conn,
                conn.pipeline(),
                conn.transaction(),
                CountingRawCursor(conn) as cursor,
            ):
                for query, params in statements:
                    await cursor.execute(query, params)
        self._chunker.confirm(pending)

    # The saver's sync API (`BlockingCheckpointStore`): the same statements on the caller's
    # own thread, through the connection's blocking pool.

    @property
    def blocking_available(self) -> bool:
        return self._pg.blocking_available

    def put_checkpoint_blocking(
        self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]
    ) -> None:
        try:
            self._write_blocking("put_checkpoint", [CheckpointPut(checkpoint, blobs)], guarded=True)
        except RequestRejected as exc:
            if checkpoint.parent_checkpoint_id is not None and _refused_parent(exc):
                raise _parent_gone(checkpoint) from exc
            raise

    def put_writes_blocking(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None:
        self._write_blocking(
            "put_writes", [WritesPut(thread_id, checkpoint_ns, checkpoint_id, writes, upsert)]
        )

    def _write_blocking(
        self, operation: str, ops: Sequence[FlushOp], *, guarded: bool = False
    ) -> None:
        statements, pending = self._prepared(ops, guarded=guarded)
        if not statements:
            return
        with self._pg.blocking_connection(operation) as conn:
            if len(statements) == 1:
                with CountingBlockingRawCursor(conn) as cursor:
                    cursor.execute(*statements[0])
            else:
                with conn.pipeline(), conn.transaction(), CountingBlockingRawCursor(conn) as cursor:
                    for query, params in statements:
                        cursor.execute(query, params)
        self._chunker.confirm(pending)

    def get_checkpoint_blocking(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str | None,
        *,
        with_history: bool,
        spared: bool = True,
    ) -> StoredCheckpoint | None:
        with self._pg.blocking_connection("get_checkpoint") as conn:
            row = conn.execute(
                *self._checkpoint_query(
                    thread_id, checkpoint_ns, checkpoint_id, with_history, spared
                ),
                binary=True,
            ).fetchone()
            if row is None:
                return None
            loaded, chunks = _stored_checkpoint(row)

            async def fetch(roots: list[bytes]) -> Mapping[bytes, Chunk]:
                # Blocking inside: this coroutine is run to its end in one step, below.
                found = conn.execute(
                    GET_CHUNKS_SQL, {"thread_id": thread_id, "roots": roots}, binary=True
                )
                return _chunks_of(found.fetchall())

            [stored] = _run_to_end(
                resolve_checkpoints(
                    [loaded], lambda _: fetched_first(chunks, fetch), self._chunker.value_of
                )
            )
        self._note(thread_id, stored.metadata)
        return stored

    def _checkpoint_query(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str | None,
        with_history: bool,
        spared: bool,
    ) -> tuple[str, tuple[str, ...]]:
        """The statement reading one checkpoint (the latest if no id), and its parameters."""
        history = with_history and thread_id in self._delta_threads
        if checkpoint_id is None:
            latest = LATEST_WITH_HISTORY_SQL if history else LATEST_SQL
            return latest, (thread_id, checkpoint_ns)
        if spared:
            named = BY_ID_WITH_HISTORY_SQL if history else BY_ID_SQL
        else:
            named = UNSPARED_BY_ID_WITH_HISTORY_SQL if history else UNSPARED_BY_ID_SQL
        return named, (thread_id, checkpoint_ns, checkpoint_id)

    async def get_checkpoint(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str | None,
        *,
        with_history: bool = True,
        spared: bool = True,
    ) -> StoredCheckpoint | None:
        async with self._pg.connection("get_checkpoint") as conn:
            cursor = await conn.execute(
                *self._checkpoint_query(
                    thread_id, checkpoint_ns, checkpoint_id, with_history, spared
                ),
                binary=True,
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            loaded, chunks = _stored_checkpoint(row)
            [stored] = await _with_chunks(conn, [loaded], self._chunker.value_of, chunks)
        self._note(thread_id, stored.metadata)
        return stored

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
                binary=True,
            )
            rows = await cursor.fetchall()
            blobs = (upcast("blob", row) for row in rows)
            return await _assembled(
                conn,
                thread_id,
                {blob["channel"]: (blob["type"], bytes(blob["blob"])) for blob in blobs},
                self._chunker.value_of,
            )

    async def get_writes(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str
    ) -> list[StoredWrite]:
        async with self._pg.connection("get_writes") as conn:
            cursor = await conn.execute(
                f"SELECT {WRITE_COLUMNS} FROM cp_writes"
                " WHERE thread_id = %s AND checkpoint_ns = %s AND checkpoint_id = %s"
                " ORDER BY task_id, idx",
                (thread_id, checkpoint_ns, checkpoint_id),
                binary=True,
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
        checkpoint_id: str | None = None,
        spared: bool = True,
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
        if checkpoint_id is not None:
            conditions.append("checkpoint_id = %s")
            params.append(checkpoint_id)
        if not spared:
            conditions.append("NOT spared")
        local_filter: dict[str, JSON] = {}
        for key, value in (metadata_filter or {}).items():
            if compared_here(value):
                # Compared after reading; the query keeps values of the same JSON type.
                local_filter[key] = value
                conditions.append("jsonb_typeof(metadata -> %s) = %s")
                params.extend([key, "array" if isinstance(value, list) else "object"])
                continue
            # Equality, as LangGraph's InMemorySaver compares and the Cosmos store does: `@>`
            # would let {} or [x] match any object or array holding them, and None never
            # match a missing key.
            equal = equal_scalars(value)
            compared = f"IN ({', '.join(['%s'] * len(equal))})" if len(equal) > 1 else "= %s"
            conditions.append(f"COALESCE(metadata -> %s, 'null'::jsonb) {compared}")
            params.extend([key, *(Jsonb(each) for each in equal)])
        key = ", ".join(key_columns)
        order = ", ".join(f"{column} DESC" for column in key_columns)

        remaining = limit
        last_key: list[Any] | None = None
        while remaining is None or remaining > 0:
            page_size = (
                LIST_PAGE_SIZE
                if remaining is None or local_filter
                else min(LIST_PAGE_SIZE, remaining)
            )
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
                    binary=True,
                )
                rows = await cursor.fetchall()
                matching = [
                    stored
                    for stored in (_stored_checkpoint(row)[0] for row in rows)
                    if all(stored.metadata.get(k) == v for k, v in local_filter.items())
                ]
                if remaining is not None:
                    matching = matching[:remaining]
                    remaining -= len(matching)
                page = await _with_chunks(conn, matching, self._chunker.value_of)
            # Yielded after the connection went back to the pool: a slow consumer holds none.
            for stored in page:
                yield stored
            if len(rows) < page_size:
                return
            last_key = [rows[-1][column] for column in key_columns]

    async def delta_history(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str, channels: Sequence[str]
    ) -> dict[str, ChannelHistory]:
        if not channels:
            return {}
        async with self._pg.connection("delta_history") as conn:
            cursor = await conn.execute(
                DELTA_HISTORY_SQL,
                {
                    "thread_id": thread_id,
                    "checkpoint_ns": checkpoint_ns,
                    "checkpoint_id": checkpoint_id,
                    "channels": list(channels),
                },
                binary=True,
            )
            rows = await cursor.fetchall()
            seed_blobs = {
                row["channel"]: (row["type"], bytes(row["blob"]))
                for row in rows
                if row["kind"] == "b"
            }
            chunks = {
                bytes(row["digest"]): Chunk(
                    bytes(row["digest"]), row["kind"] == "n", bytes(row["blob"])
                )
                for row in rows
                if row["kind"] in ("n", "l")
            }
            seed_values = await _assembled(
                conn, thread_id, seed_blobs, self._chunker.value_of, chunks
            )
        writes: dict[str, list[tuple[str, StoredWrite]]] = {ch: [] for ch in channels}
        seeds: dict[str, tuple[str, tuple[str, bytes]]] = {}
        for row in rows:
            if row["kind"] == "w":
                write = _stored_write(row)
                writes[write.channel].append((row["checkpoint_id"], write))
            elif row["kind"] == "b":
                blob = upcast("blob", row)
                seeds[blob["channel"]] = (row["checkpoint_id"], seed_values[blob["channel"]])
        return {
            ch: ChannelHistory(
                writes[ch],
                seed=seeds[ch][1] if ch in seeds else None,
                seed_at=seeds[ch][0] if ch in seeds else None,
            )
            for ch in channels
        }

    async def delete_thread(self, thread_id: str, *, fence: int | None = None) -> None:
        self._chunker.forget([thread_id])
        async with self._pg.transaction("delete_thread") as conn:
            await _lock_threads(conn, [thread_id])
            if fence is not None:
                # The fence in a statement of its own too: it waits for a batch still
                # writing under an older token, and the delete's snapshot, taken after,
                # sees what that batch stored. A batch arriving later finds the newer token
                # and is refused. (A batch takes no maintenance lock: no deadlock.)
                await conn.execute(RAISE_FENCE_SQL, {"thread_id": thread_id, "token": fence})
            await conn.execute(
                DELETE_THREADS_SQL, {"thread_ids": [thread_id], **self._deletion_mark()}
            )

    async def fence_thread(self, thread_id: str, fence: int) -> None:
        # It waits for a batch still writing under an older token; one arriving later finds
        # the newer token and is refused.
        async with self._pg.transaction("fence_thread") as conn:
            await conn.execute(RAISE_FENCE_SQL, {"thread_id": thread_id, "token": fence})

    async def delete_for_runs(self, run_ids: Sequence[str]) -> set[str]:
        if not run_ids:
            return set()
        params = {"run_ids": list(run_ids)}
        run_threads = await self._run_threads(RUN_THREADS_SQL, params)
        threads: set[str] = set()
        # Looked for again after each pass until none is left: a checkpoint of the runs
        # committed before the call's last look does not survive it (one after it is a
        # write that came after the call). A statement more per call, none per put.
        rounds = 0
        while run_threads:
            if rounds > LATE_RUN_ROUNDS:
                still = RunsStillWriting("postgres", run_ids, run_threads)
                raise RunsPartlyDeleted(still, threads)
            rounds += 1
            await self._delete_runs_from(run_ids, run_threads, threads)
            try:
                run_threads = await self._run_threads(LATE_RUN_THREADS_SQL, params)
            except BackendUnavailable as error:
                raise RunsPartlyDeleted(error, threads) from error
        return threads

    async def _run_threads(self, query: str, params: Mapping[str, Any]) -> list[str]:
        async with self._pg.connection("delete_for_runs") as conn:
            cursor = await conn.execute(query, params)
            return sorted(row["thread_id"] for row in await cursor.fetchall())

    async def _delete_runs_from(
        self, run_ids: Sequence[str], run_threads: Sequence[str], threads: set[str]
    ) -> None:
        """The runs' checkpoints on `run_threads`, adding the threads it deleted from to
        `threads`."""
        # A transaction per batch of threads, as prune: each thread is still deleted from
        # whole, under its lock, but one transaction locking every thread of a run on many
        # threads exhausted the server's lock table.
        for start in range(0, len(run_threads), PRUNE_BATCH):
            batch = run_threads[start : start + PRUNE_BATCH]
            try:
                async with self._pg.transaction("delete_for_runs") as conn:
                    await _lock_threads(conn, batch)
                    # A statement of its own after the locks: its snapshot sees what the call
                    # it waited for committed.
                    cursor = await conn.execute(
                        DELETE_RUN_CHECKPOINTS_SQL,
                        {"run_ids": list(run_ids), "thread_ids": batch},
                    )
                    deleted = await cursor.fetchall()
                    await _delete_dependents(conn, deleted)
                    batch_threads = {row["thread_id"] for row in deleted}
                    self._chunker.forget(batch_threads)
                    await _collect_chunks(conn, batch_threads)
                    if batch_threads and self._marks_deletions:
                        await conn.execute(
                            MARK_EMPTIED_SQL,
                            {
                                "thread_ids": sorted(batch_threads),
                                "before_id": self._deletion_mark()["before_id"],
                            },
                        )
            except BackendUnavailable as error:
                # The batches committed before, and this one: a commit that failed may
                # have landed.
                raise RunsPartlyDeleted(error, threads | set(batch)) from error
            threads |= batch_threads

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._chunker.forget([target_thread_id])
        async with self._pg.connection("copy_thread") as conn:
            await conn.execute(
                COPY_THREAD_SQL, {"source": source_thread_id, "target": target_thread_id}
            )

    async def prune(self, thread_ids: Sequence[str], *, strategy: PruneStrategy) -> None:
        if not thread_ids:
            return
        self._chunker.forget(thread_ids)
        # A transaction per batch: each thread's lock takes a slot of the server's lock
        # table, which one transaction locking a large prune's every thread exhausted.
        for start in range(0, len(thread_ids), PRUNE_BATCH):
            batch = list(thread_ids[start : start + PRUNE_BATCH])
            async with self._pg.transaction("prune") as conn:
                # The lock every put of a child shares: a step in flight is waited for, and
                # the statements after the lock see it; a later one waits for the commit.
                # Deleting whole threads, such a step would survive its parent; keeping the
                # latest, it would lose the chunks it added between the chunk collection's
                # statements (manifests, then the delete).
                await _lock_threads(conn, batch)
                if strategy == "delete":
                    await conn.execute(
                        DELETE_THREADS_SQL, {"thread_ids": batch, **self._deletion_mark()}
                    )
                    continue
                cursor = await conn.execute(DELETE_ALL_BUT_LATEST_SQL, {"thread_ids": batch})
                deleted = await cursor.fetchall()
                await _delete_dependents(conn, deleted)
                await _collect_chunks(conn, {row["thread_id"] for row in deleted})

    async def close(self) -> None:
        """The shared connection is closed by whoever opened it (the backend factory)."""


Row = tuple[Any, ...]


def _fold(ops: Sequence[FlushOp], pending: PendingSplits) -> list[list[Row]]:
    """The rows of `ops` per entry of ROW_KINDS: one per key, with the effect of the ops in order.

    One statement may not touch a row twice, and folding also makes a replayed batch
    land as the same rows. Blob versions are immutable, so the first one of a key
    stands; a checkpoint put replaces, so the last one stands; of a pending write,
    the last upsert stands (inserts after it are ignored), and without an upsert the
    first insert (the later ones are ignored). Rows come out sorted by key, so two
    batches that overlap take their row locks in the same order (no deadlock).

    A blob of `CHUNK_THRESHOLD` bytes or more becomes a manifest row and chunk rows:
    each version of a channel builds on the split of its previous one (earlier in the
    batch, or confirmed stored before), so only the chunks it adds are sent. `pending`
    holds the splits to confirm once the rows are stored.
    """
    chunks: dict[tuple[str, bytes], Row] = {}
    blobs: dict[tuple[str, str, str, str], Row] = {}
    checkpoints: dict[tuple[str, str, str], Row] = {}
    writes: dict[tuple[str, str, str, str, int], tuple[bool, Row]] = {}
    for op in ops:
        if isinstance(op, CheckpointPut):
            checkpoint = op.checkpoint
            pending.begin(checkpoint, op.blobs)
            for blob in op.blobs:
                blob_key = (
                    checkpoint.thread_id,
                    checkpoint.checkpoint_ns,
                    blob.channel,
                    str(blob.version),
                )
                if blob_key in blobs:
                    continue
                type_, data = blob.value
                if not chunked(blob.value):
                    blobs[blob_key] = (*blob_key, type_, data, CURRENT["blob"])
                    continue
                split_key = (checkpoint.thread_id, checkpoint.checkpoint_ns, blob.channel)
                manifest, added = pending.split(split_key, blob.value, blob.version)
                for chunk in added:
                    chunks[(checkpoint.thread_id, chunk.digest)] = (
                        checkpoint.thread_id,
                        chunk.digest,
                        chunk.node,
                        chunk.data,
                    )
                blobs[blob_key] = (
                    *blob_key,
                    MANIFEST_TYPE_PREFIX + type_,
                    manifest,
                    CURRENT["blob"],
                )
            checkpoints[
                (checkpoint.thread_id, checkpoint.checkpoint_ns, checkpoint.checkpoint_id)
            ] = (
                checkpoint.thread_id,
                checkpoint.checkpoint_ns,
                checkpoint.checkpoint_id,
                checkpoint.parent_checkpoint_id,
                *checkpoint.checkpoint,
                Jsonb(checkpoint.metadata),
                Jsonb(checkpoint.channel_versions),
                CURRENT["checkpoint"],
            )
            continue
        for write in op.writes:
            write_key = (op.thread_id, op.checkpoint_ns, op.checkpoint_id, write.task_id, write.idx)
            if op.upsert or write_key not in writes:
                writes[write_key] = (
                    op.upsert,
                    (
                        *write_key[:4],
                        write.task_path,
                        write.idx,
                        write.channel,
                        *write.value,
                        CURRENT["write"],
                    ),
                )
    ordered_writes = [writes[key] for key in sorted(writes)]
    rows = [
        [chunks[key] for key in sorted(chunks)],
        [blobs[key] for key in sorted(blobs)],
        [checkpoints[key] for key in sorted(checkpoints)],
        [row for upsert, row in ordered_writes if not upsert],
        [row for upsert, row in ordered_writes if upsert],
    ]
    return rows


def _statements(
    rows_by_kind: list[list[Row]], fence: tuple[str, int] | None = None, *, guarded: bool = False
) -> list[tuple[str, list[Any]]]:
    """INSERTs for the folded rows, as few statements as the parameter limit allows
    (`$n` placeholders: run them on a `RawCursor`); with `fence` (thread, token), the
    first statement moves the thread's fence before anything else, and its trigger
    aborts the statement (and so the transaction of every statement) if the token is
    older than the fence. `guarded` (one checkpoint row): its statement takes the thread's
    maintenance lock, shared (`TURN_CTE`), and, if the row has a parent, fails unless the
    parent is kept (`PARENT_KEPT_CTE`)."""
    statements: list[tuple[str, list[Any]]] = []
    inserts: list[str] = []
    params: list[Any] = list(fence) if fence is not None else []
    fenced = fence is not None  # the next statement carries the fence
    guard: str | None = None  # the guard CTE of the statement holding the checkpoint row

    def close() -> None:
        nonlocal inserts, params, fenced, guard
        statements.append(_statement(inserts, params, fenced=fenced, guard=guard))
        inserts, params, fenced, guard = [], [], False, None

    for (table, per_row, conflict), rows in zip(ROW_KINDS, rows_by_kind, strict=True):
        done = 0
        while done < len(rows):
            room = (MAX_STATEMENT_PARAMETERS - len(params)) // per_row
            if room == 0:
                close()
                continue
            chunk = rows[done : done + room]
            if guarded and table == CHECKPOINT_TABLE:
                if len(rows) != 1:
                    raise ValueError("a guarded write holds one checkpoint")
                has_parent = chunk[0][3] is not None
                values, guard = _guarded_placeholders(len(params), per_row, has_parent)
            else:
                values = ", ".join(
                    _placeholders(len(params) + n * per_row, per_row) for n in range(len(chunk))
                )
            inserts.append(f"INSERT INTO {table} VALUES {values} {conflict}")
            for row in chunk:
                params.extend(row)
            done += len(chunk)
    if inserts or fenced:
        close()
    return statements


def _fence_of(refused: RequestRejected) -> int:
    """The thread's fence, which the trigger reports as its error's detail."""
    cause = refused.__cause__
    detail = cause.diag.message_detail if isinstance(cause, psycopg.Error) else None
    if detail is None or not detail.isdigit():
        raise refused
    return int(detail)


# Cached: a put builds the same few shapes over and over, and the text is pure.
@functools.lru_cache(maxsize=4096)
def _placeholders(before: int, count: int) -> str:
    """`($k, ..., $m)` for the `count` parameters after the first `before` ones."""
    return "(" + ", ".join(f"${before + n}" for n in range(1, count + 1)) + ")"


@functools.lru_cache(maxsize=4096)
def _guarded_placeholders(before: int, count: int, has_parent: bool) -> tuple[str, str]:
    """A checkpoint row's placeholders with its id taken from `parent_kept` (or `turn`, with
    no parent), and that CTE on the row's own thread, namespace and parent placeholders."""
    thread, ns, checkpoint_id, parent = (f"${before + n}" for n in range(1, 5))
    rest = (f"${before + n}" for n in range(5, count + 1))
    if has_parent:
        guard = PARENT_KEPT_CTE.replace("$thread", thread).replace("$ns", ns)
        guard, source = guard.replace("$parent", parent), "parent_kept"
    else:
        guard, source = TURN_CTE.replace("$thread", thread), "turn"
    kept_id = f"(SELECT {checkpoint_id}::text FROM {source})"
    values = f"({', '.join([thread, ns, kept_id, parent, *rest])})"
    return values, guard


def _refused_parent(refused: RequestRejected) -> bool:
    """Whether a guarded write failed on its guard (the NULL id `parent_kept` leaves)."""
    cause = refused.__cause__
    return (
        refused.code == NOT_NULL_SQLSTATE
        and isinstance(cause, psycopg.Error)
        and cause.diag.table_name == "cp_checkpoints"
        and cause.diag.column_name == GUARDED_COLUMN
    )


def _parent_gone(checkpoint: StoredCheckpoint) -> ParentGone:
    assert checkpoint.parent_checkpoint_id is not None
    return ParentGone(
        checkpoint.thread_id, checkpoint.checkpoint_ns, checkpoint.parent_checkpoint_id
    )


def _statement(
    inserts: list[str], params: list[Any], *, fenced: bool = False, guard: str | None = None
) -> tuple[str, list[Any]]:
    """One INSERT as it is; several as data-modifying CTEs of one statement. Fenced: the
    fence's upsert is what the statement selects from, the INSERTs its CTEs; Postgres
    runs the CTEs the main query does not read after it, so the fence row is locked (and
    checked) before any checkpoint row is. A delete holding that row first (it raises the
    fence, then deletes) then never waits on rows this statement locked: no deadlock."""
    if fenced:
        ctes = ", ".join(
            [f"fence AS ({FENCE_INSERT} RETURNING f.token)"]
            + [f"insert_{n} AS ({insert})" for n, insert in enumerate(inserts)]
        )
        return f"WITH {ctes} SELECT token FROM fence", params
    *leading, last = inserts
    ctes = ", ".join(
        ([guard] if guard is not None else [])
        + [f"insert_{n} AS ({insert})" for n, insert in enumerate(leading)]
    )
    if not ctes:
        return last, params
    return f"WITH {ctes} {last}", params


async def _lock_threads(conn: CountedConnection, thread_ids: Sequence[str]) -> None:
    """The threads' maintenance locks, for a delete of them whole (`LOCK_THREADS_SQL`)."""
    await conn.execute(
        LOCK_THREADS_SQL, {"lock": THREAD_MAINTENANCE_LOCK, "thread_ids": list(thread_ids)}
    )


async def _delete_dependents(conn: CountedConnection, deleted: list[dict[str, Any]]) -> None:
    """Writes of the deleted checkpoints, and blobs that no remaining checkpoint uses."""
    if not deleted:
        return
    await conn.execute(
        DELETE_DEPENDENTS_SQL,
        {
            "thread_ids": [row["thread_id"] for row in deleted],
            # Each thread once: the planner counts every copy in `thread_id = ANY(...)`.
            "threads": sorted({row["thread_id"] for row in deleted}),
            "namespaces": [row["checkpoint_ns"] for row in deleted],
            "checkpoint_ids": [row["checkpoint_id"] for row in deleted],
            "channel_versions": [Jsonb(row["channel_versions"]) for row in deleted],
        },
    )


def _fetcher(
    conn: CountedConnection, thread_id: str, fetched: Mapping[bytes, Chunk] | None = None
) -> Fetch:
    """Chunks by root digest with every descendant, in one statement, but for those the
    statement that loaded the manifests `fetched` already."""

    async def fetch(roots: list[bytes]) -> Mapping[bytes, Chunk]:
        cursor = await conn.execute(
            GET_CHUNKS_SQL, {"thread_id": thread_id, "roots": roots}, binary=True
        )
        return _chunks_of(await cursor.fetchall())

    return fetched_first(fetched, fetch)


def _run_to_end(coro: Coroutine[Any, Any, T]) -> T:
    """A coroutine whose awaits never suspend (its I/O blocks instead), run to its end: the
    chunk resolution both APIs share, driven without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise RuntimeError("a blocking read's coroutine suspended")


def _chunks_of(rows: Iterable[dict[str, Any]]) -> dict[bytes, Chunk]:
    return {
        bytes(row["digest"]): Chunk(bytes(row["digest"]), row["node"], bytes(row["data"]))
        for row in rows
    }


async def _assembled(
    conn: CountedConnection,
    thread_id: str,
    blobs: dict[str, tuple[str, bytes]],
    known: Known,
    fetched: Mapping[bytes, Chunk] | None = None,
) -> dict[str, tuple[str, bytes]]:
    """`blobs` with each manifest replaced by the value its chunks assemble to."""
    return await resolve(blobs, _fetcher(conn, thread_id, fetched), known)


async def _with_chunks(
    conn: CountedConnection,
    checkpoints: list[StoredCheckpoint],
    known: Known,
    fetched: Mapping[bytes, Chunk] | None = None,
) -> list[StoredCheckpoint]:
    """The checkpoints with manifest blobs and seeds assembled (a statement per thread,
    unless the chunks were `fetched` with them)."""
    return await resolve_checkpoints(
        checkpoints, lambda thread: _fetcher(conn, thread, fetched), known
    )


async def _collect_chunks(conn: CountedConnection, thread_ids: Iterable[str]) -> None:
    """Delete the chunks of `thread_ids` that no remaining manifest reaches."""
    threads = sorted(set(thread_ids))
    if not threads:
        return
    cursor = await conn.execute(CHUNK_MANIFESTS_SQL, {"thread_ids": threads}, binary=True)
    manifests: dict[str, list[bytes]] = {thread: [] for thread in threads}
    for row in await cursor.fetchall():
        manifests[row["thread_id"]].append(bytes(row["blob"]))
    cursor = await conn.execute(CHUNK_NODES_SQL, {"thread_ids": threads}, binary=True)
    nodes: dict[str, dict[bytes, Chunk]] = {thread: {} for thread in threads}
    for row in await cursor.fetchall():
        digest = bytes(row["digest"])
        nodes[row["thread_id"]][digest] = Chunk(digest, True, bytes(row["data"]))
    for thread in threads:
        kept = reachable(manifests[thread], nodes[thread])
        await conn.execute(
            DELETE_UNREACHED_CHUNKS_SQL, {"thread_id": thread, "kept": list(kept)}, binary=True
        )


def _stored_checkpoint(row: dict[str, Any]) -> tuple[StoredCheckpoint, dict[bytes, Chunk]]:
    """A checkpoint row, with the blobs, writes and history its query loaded alongside
    it, and the chunks of its history's seeds."""
    document = upcast("checkpoint", row)
    _check_shape(document)
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
    history, chunks = _history(row["history_rows"]) if row.get("history_rows") else (None, {})
    stored = StoredCheckpoint(
        thread_id=document["thread_id"],
        checkpoint_ns=document["checkpoint_ns"],
        checkpoint_id=document["checkpoint_id"],
        parent_checkpoint_id=document["parent_checkpoint_id"],
        checkpoint=(document["type"], bytes(document["checkpoint"])),
        metadata=document["metadata"],
        channel_versions=document["channel_versions"],
        blobs=blobs,
        writes=writes,
        history=history,
    )
    return stored, chunks


def _check_shape(document: dict[str, Any]) -> None:
    """`CorruptState` unless its JSON columns hold what the port's types say (a column
    of the wrong shape, edited by hand or a bad migration, is damage, typed, not a list
    as metadata going on to the saver)."""
    metadata, versions = document["metadata"], document["channel_versions"]
    if not (
        isinstance(metadata, dict)
        and isinstance(versions, dict)
        and all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in versions.values()
        )
    ):
        raise CorruptState(
            f"checkpoint {document['checkpoint_id']} of {document['thread_id']!r}"
            f" (namespace {document['checkpoint_ns']!r}) has damaged metadata or channel_versions"
        )


def _history(
    rows: Sequence[Sequence[bytes]],
) -> tuple[dict[str, ChannelHistory], dict[bytes, Chunk]]:
    """`history_rows` of SELECT_CHECKPOINT_WITH_HISTORY_SQL, per channel walked, and the
    chunks of the seeds."""
    writes: dict[str, list[tuple[str, StoredWrite]]] = {}
    seeds: dict[str, tuple[str, tuple[str, bytes]]] = {}
    chunks: dict[bytes, Chunk] = {}
    for kind, checkpoint_id, task_id, task_path, idx, channel, type_, blob, version, digest in rows:
        if kind in (b"n", b"l"):
            chunks[bytes(digest)] = Chunk(bytes(digest), kind == b"n", bytes(blob))
            continue
        name = channel.decode()
        writes.setdefault(name, [])
        fields = {"type": type_.decode(), "blob": blob, "schema_version": int(version)}
        if kind == b"w":
            write = _stored_write(
                {
                    "task_id": task_id.decode(),
                    "task_path": task_path.decode(),
                    "idx": int(idx),
                    "channel": name,
                    **fields,
                }
            )
            writes[name].append((checkpoint_id.decode(), write))
        elif kind == b"b":
            loaded = upcast("blob", {"channel": name, **fields})
            seeds[name] = (checkpoint_id.decode(), (loaded["type"], bytes(loaded["blob"])))
    history = {
        ch: ChannelHistory(
            found,
            seed=seeds[ch][1] if ch in seeds else None,
            seed_at=seeds[ch][0] if ch in seeds else None,
        )
        for ch, found in writes.items()
    }
    return history, chunks


def _stored_write(row: dict[str, Any]) -> StoredWrite:
    document = upcast("write", row)
    return StoredWrite(
        task_id=document["task_id"],
        task_path=document["task_path"],
        idx=document["idx"],
        channel=document["channel"],
        value=(document["type"], bytes(document["blob"])),
    )
