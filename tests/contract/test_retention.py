"""Retention (`ColdRetention`: hold, release, sweep) on every cold backend, on the real servers.

Both backends expire whole threads in a sweep, run against a clock the test
controls: Postgres rows are backdated; Cosmos items carry the server's `_ts`,
so the sweep is given a `now` ahead of them. The local Cosmos emulator
implements no TTL, so what the service would expire by itself is applied by
`service_ttl` (Cosmos's documented rule: an item's own `ttl`, else the
container's default, counted from its `_ts`): per-item expiry must never take
what a live thread names. Every case gets a database (Postgres) or container
(Cosmos) of its own, since a sweep deletes across all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import redis.exceptions
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6

from state.checkpoint import TieredCheckpointSaver
from state.cold import cosmos_io, cosmos_retention, postgres_retention
from state.cold.cosmos_client import CosmosConnection
from state.cold.cosmos_fences import FENCE_ID
from state.cold.postgres_checkpoints import THREAD_MAINTENANCE_LOCK
from state.errors import (
    BackendUnavailable,
    ParentGone,
    StaleFencingToken,
    StateError,
    StillWriting,
    ThreadExpiring,
    VersionConflict,
    WorkflowNotFound,
)
from state.factory import Backends, backends_for
from state.hot import redis_write_behind
from state.ports import (
    CheckpointPut,
    ColdRetention,
    FlushOp,
    StoredBlob,
    StoredCheckpoint,
    StoredWrite,
    WritesPut,
)
from state.settings import Settings
from state.size import ARCHIVE_SEPARATOR
from state.tiered import TieredStateStore
from tests.support.cosmos import drop_container, next_second, partition_of
from tests.support.records import unique_thread
from tests.support.redis_round_trips import RedisRoundTrips

TTL = 3600
# Far enough back to be past the TTL whatever the test's own duration.
LONG_AGO = 10 * TTL
Open = Callable[..., Any]
PG_TABLES = ("workflow_records", "state_audit_log", "cp_checkpoints", "cp_blobs", "cp_writes")


@pytest.fixture
def open_cold(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> Callable[..., Any]:
    """Backends for one cold backend, without a hot tier unless `hot`; Postgres in a fresh
    database."""

    @asynccontextmanager
    async def open_(
        backend: str, *, hot: bool = False, **overrides: object
    ) -> AsyncIterator[Backends]:
        if backend == "postgres":
            overrides.setdefault("postgres_url", request.getfixturevalue("fresh_postgres_url"))
        else:
            overrides.setdefault("cosmos_container", f"retention-{uuid.uuid4().hex[:8]}")
        # A small item limit, so a large value is stored as chunk items too (and a
        # section over a quarter of it is offloaded).
        settings = make_settings(
            backend,
            hot=hot,
            state_max_item_bytes=16384,
            state_archivable_sections="history",
            **overrides,
        )
        try:
            async with backends_for(settings) as backends:
                yield backends
        finally:
            if backend == "cosmos":
                await drop_container(settings)

    return open_


def checkpoint_id(n: int) -> str:
    return f"1f0{n:05x}-0000-6000-8000-000000000000"


async def seed(backends: Backends, thread_id: str, *, record: bool = True) -> None:
    """Everything a thread can have: record + audit, checkpoint, blobs (one stored as shared
    chunks), writes (one spilled over the item limit)."""
    if record:
        await backends.cold.create(thread_id, {"n": 0}, agent_id="seed")
        await backends.cold.update_section(thread_id, "n", 1, expected_version=1, agent_id="seed")
    stored = StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns="",
        checkpoint_id=checkpoint_id(1),
        parent_checkpoint_id=None,
        checkpoint=("msgpack", b"checkpoint"),
        metadata={"step": 1},
        channel_versions={"small": "1", "large": "1"},
    )
    await backends.checkpoints.put_checkpoint(
        stored,
        [
            StoredBlob("small", "1", ("json", b"[1]")),
            StoredBlob("large", "1", ("bytes", os.urandom(20_000))),  # incompressible
        ],
    )
    await backends.checkpoints.put_writes(
        thread_id,
        "",
        checkpoint_id(1),
        [
            StoredWrite("task-1", "", 0, "small", ("json", b"[2]")),
            StoredWrite("task-1", "", 1, "large", ("bytes", os.urandom(20_000))),
        ],
        upsert=False,
    )


async def intact(backends: Backends, thread_id: str) -> bool:
    """The record, its whole trail, and the checkpoint with its blobs and writes read back."""
    record = await backends.cold.get(thread_id)
    trail = await backends.cold.audit_trail(thread_id)
    stored = await backends.checkpoints.get_checkpoint(thread_id, "", None)
    if stored is None:
        return False
    blobs = stored.blobs or await backends.checkpoints.get_blobs(
        thread_id, "", stored.channel_versions
    )
    writes = stored.writes or await backends.checkpoints.get_writes(thread_id, "", checkpoint_id(1))
    return (
        record is not None
        and record.sections == {"n": 1}
        and [entry.version for entry in trail] == [2, 1]
        and set(blobs) == {"small", "large"}
        and len(writes) == 2
    )


async def seed_references(backends: Backends, thread_id: str) -> None:
    """A record naming an offloaded and an archived section, and a checkpoint at step 1."""
    store = TieredStateStore(backends.cold, None, backends.settings)
    await store.create(thread_id, {"n": 0, "big": os.urandom(3000).hex()}, agent_id="seed")
    await store.update_section(thread_id, "history", ["done"], agent_id="seed", completed=True)
    record = await backends.cold.get(thread_id)
    assert record is not None
    assert set(record.sections["big"]) == {"$offloaded"}
    assert set(record.sections["history"]) == {"$archived"}
    await backends.checkpoints.put_checkpoint(
        step(thread_id, 1, {"small": "1", "large": "1"}),
        [
            StoredBlob("small", "1", ("json", b"[1]")),
            StoredBlob("large", "1", ("bytes", os.urandom(20_000))),
        ],
    )


async def step_two(backends: Backends, thread_id: str) -> None:
    """Activity that changes only `other`: step 2 still names step 1's values."""
    await backends.checkpoints.put_checkpoint(
        step(thread_id, 2, {"small": "1", "large": "1", "other": "2"}),
        [StoredBlob("other", "2", ("json", b"[2]"))],
    )
    await backends.cold.update_section(thread_id, "n", 1, expected_version=2, agent_id="seed")


def step(thread_id: str, n: int, versions: dict[str, str | int | float]) -> StoredCheckpoint:
    return StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns="",
        checkpoint_id=checkpoint_id(n),
        parent_checkpoint_id=checkpoint_id(n - 1) if n > 1 else None,
        checkpoint=("msgpack", b"checkpoint"),
        metadata={"step": n},
        channel_versions=versions,
    )


async def references_intact(backends: Backends, thread_id: str) -> bool:
    """The latest checkpoint with every value, the record with its sections fetched back."""
    store = TieredStateStore(backends.cold, None, backends.settings)
    try:
        record = await store.get(thread_id, fetch_archived=True)
        stored = await backends.checkpoints.get_checkpoint(thread_id, "", None)
    except StateError:
        return False  # an offloaded or archived section's records are gone
    return (
        record is not None
        and len(str(record.sections["big"])) == 6000
        and record.sections["history"] == ["done"]
        and stored is not None
        and stored.checkpoint_id == checkpoint_id(2)
        and set(stored.blobs) == {"small", "large", "other"}
    )


# --------------------------------------------------------------------------- inspection


async def cosmos_all_items(backends: Backends) -> list[dict[str, Any]]:
    connection = CosmosConnection(backends.settings.cosmos)
    try:
        container = await connection.container()
        return [item async for item in container.query_items("SELECT * FROM c")]
    finally:
        await connection.close()


async def service_ttl(backends: Backends, now: int) -> list[str]:
    """Delete what Cosmos's own TTL would have expired by `now` (the emulator never does).

    The documented rule: with TTL on in the container (`defaultTtl` set), an
    item expires `ttl` seconds after its last write (`_ts`), its own `ttl` if
    it has one, else the container's; -1 never. Returns the thread ids hit.
    """
    connection = CosmosConnection(backends.settings.cosmos)
    try:
        container = await connection.container()
        default = (await container.read()).get("defaultTtl")
        hit: list[str] = []
        if default is None:
            return hit  # TTL off: nothing expires
        for item in await cosmos_all_items(backends):
            ttl = item.get("ttl", default)
            if ttl > 0 and item["_ts"] + ttl < now:
                await container.delete_item(item["id"], partition_key=item["thread_id"])
                hit.append(item["thread_id"])
        return hit
    finally:
        await connection.close()


async def last_write(backends: Backends, *thread_ids: str) -> int:
    """The newest `_ts` among the threads' Cosmos items."""
    stamps = [item["_ts"] for t in thread_ids for item in await partition_of(backends.settings, t)]
    return int(max(stamps))


async def archive_ids(backends: Backends, thread_id: str) -> set[str]:
    """Thread ids of the archive records (offloaded, archived sections) the thread owns."""
    prefix = thread_id + ARCHIVE_SEPARATOR
    if backends.settings.state_cold_backend.value == "cosmos":
        items = await cosmos_all_items(backends)
        return {str(i["thread_id"]) for i in items if str(i["thread_id"]).startswith(prefix)}
    rows = await pg_execute(
        backends,
        "SELECT thread_id FROM workflow_records WHERE starts_with(thread_id, %s)",
        (prefix,),
    )
    return {str(row[0]) for row in rows}


async def pg_execute(
    backends: Backends, sql: str, params: tuple[Any, ...]
) -> list[tuple[Any, ...]]:
    url = backends.settings.postgres_url
    assert url is not None
    async with await psycopg.AsyncConnection.connect(
        url.get_secret_value(), autocommit=True
    ) as conn:
        cursor = await conn.execute(sql.encode(), params)
        return await cursor.fetchall() if cursor.description else []


async def pg_rows(backends: Backends, thread_id: str) -> dict[str, int]:
    counts = {}
    for table in PG_TABLES:
        [(count,)] = await pg_execute(
            backends, f"SELECT count(*) FROM {table} WHERE thread_id = %s", (thread_id,)
        )
        counts[table] = int(count)
    return counts


async def backdate(backends: Backends, *thread_ids: str, tables: tuple[str, ...] = ()) -> None:
    """Move a thread's activity LONG_AGO seconds into the past (the sweep reads the server clock)."""
    columns = {
        "workflow_records": "updated_at",
        "cp_checkpoints": "created_at",
        "retention_holds": "changed_at",
    }
    for table, column in columns.items():
        if tables and table not in tables:
            continue
        await pg_execute(
            backends,
            f"UPDATE {table} SET {column} = {column} - make_interval(secs => %s)"
            " WHERE thread_id = ANY(%s)",
            (LONG_AGO, list(thread_ids)),
        )


async def exempt(backends: Backends, thread_id: str) -> bool:
    """Whether the backend keeps the thread whatever its age."""
    if backends.settings.state_cold_backend.value == "cosmos":
        items = await partition_of(backends.settings, thread_id)
        assert items
        return any(item.get("ttl") == -1 for item in items)
    rows = await pg_execute(
        backends, "SELECT held FROM retention_holds WHERE thread_id = %s", (thread_id,)
    )
    return bool(rows and rows[0][0])


# --------------------------------------------------------------------------- every backend


async def test_the_factory_builds_the_port(cold_backend: str, open_cold: Open) -> None:
    async with open_cold(cold_backend) as backends:
        assert isinstance(backends.retention, ColdRetention)
        assert backends.retention.name == cold_backend


async def test_hold_and_release_are_idempotent(cold_backend: str, open_cold: Open) -> None:
    async with open_cold(cold_backend, state_cold_ttl_seconds=TTL) as backends:
        retention = backends.retention
        thread_id = unique_thread("hold")
        await seed(backends, thread_id)
        assert not await exempt(backends, thread_id)
        await retention.hold(thread_id)
        await retention.hold(thread_id)
        assert await exempt(backends, thread_id)
        await retention.release(thread_id)
        await retention.release(thread_id)
        assert not await exempt(backends, thread_id)
        assert await intact(backends, thread_id)
        # A thread with nothing stored: no errors (on Cosmos the marker the hold leaves
        # goes with the next sweep past the TTL, uncounted: see the Cosmos tests).
        nothing = unique_thread("empty")
        await retention.hold(nothing)
        await retention.release(nothing)
        await retention.release(nothing)


async def test_a_held_thread_is_never_swept(cold_backend: str, open_cold: Open) -> None:
    async with open_cold(cold_backend, state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("held")
        await seed_references(backends, thread_id)
        await step_two(backends, thread_id)
        archives = await archive_ids(backends, thread_id)
        assert len(archives) >= 2  # an offloaded and an archived section
        await backends.retention.hold(thread_id)
        now = await age_everything(backends, thread_id, *archives)
        assert await backends.retention.sweep(limit=100, now=now) == 0
        assert await exempt(backends, thread_id)
        assert await references_intact(backends, thread_id)
        assert await archive_ids(backends, thread_id) == archives  # archive records too


async def test_a_spared_thread_is_not_swept(cold_backend: str, open_cold: Open) -> None:
    """`spare`: the timer's cases due to be resumed stay, expired or not; the others go."""
    async with open_cold(cold_backend, state_cold_ttl_seconds=TTL) as backends:
        spared, other = unique_thread("spared"), unique_thread("other")
        await seed_references(backends, spared)
        await step_two(backends, spared)
        archives = await archive_ids(backends, spared)
        await seed(backends, other)
        now = await age_everything(backends, spared, other, *archives)
        assert await backends.retention.sweep(limit=100, now=now, spare=[spared]) == 1
        assert await references_intact(backends, spared)
        assert await archive_ids(backends, spared) == archives
        assert not await intact(backends, other)


async def test_a_thread_spared_once_goes_with_the_next_sweep_that_does_not_spare_it(
    cold_backend: str, open_cold: Open
) -> None:
    """A case the timer could not resume (spared) that is then done with, never written
    again: the next sweep not sparing it deletes it (on Cosmos, the watermark had moved
    past its slice, and it was kept for good); one still spared is kept again."""
    async with open_cold(cold_backend, state_cold_ttl_seconds=TTL) as backends:
        spared, still = unique_thread("spared"), unique_thread("still-spared")
        for thread_id in (spared, still):
            await seed(backends, thread_id)
        now = await age_everything(backends, spared, still)
        assert await backends.retention.sweep(limit=100, now=now, spare=[spared, still]) == 0
        assert await backends.retention.sweep(limit=100, now=now, spare=[still]) == 1
        assert not await intact(backends, spared)
        assert await intact(backends, still)
        assert await backends.retention.sweep(limit=100, now=now) == 1
        assert not await intact(backends, still)


async def test_a_spared_thread_whose_flush_lock_is_busy_goes_with_a_later_sweep(
    cold_backend: str, open_cold: Open
) -> None:
    """A case the timer spared once (on Cosmos, in a slice the watermark then moved past),
    whose flush lock a stuck flusher then holds past the next sweep's deadline: that sweep
    spares it again, and once the lock is free a later sweep deletes it, as Postgres, which
    looks at every thread each time, does (on Cosmos the second sweep had dropped the
    thread's marker, and it was kept for good, never written again)."""
    async with open_cold(cold_backend, hot=True, state_cold_ttl_seconds=TTL) as backends:
        assert backends.flusher is not None
        thread_id = unique_thread("busy")
        await seed(backends, thread_id)
        now = await age_everything(backends, thread_id)
        assert await backends.retention.sweep(limit=100, now=now, spare=[thread_id]) == 0
        token = await backends.flusher.log.lock_thread(thread_id, ttl_ms=60_000)
        assert token is not None
        deadline = time.monotonic() + 1
        assert await backends.retention.sweep(limit=100, now=now, deadline=deadline) == 0
        assert await intact(backends, thread_id)
        await backends.flusher.log.unlock_thread(thread_id, token)
        assert await backends.retention.sweep(limit=100, now=now) == 1
        assert not await intact(backends, thread_id)


async def test_a_thread_deleting_refused_goes_with_a_later_sweep(
    cold_backend: str, open_cold: Open
) -> None:
    """`deleting` says no to an expired thread nothing writes again: the next sweep deletes
    it (on Cosmos, the watermark had moved past its slice, and it was kept for good)."""
    async with open_cold(cold_backend, state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("refused")
        await seed(backends, thread_id)
        now = await age_everything(backends, thread_id)

        async def no(_: str) -> bool:
            return False

        assert await backends.retention.sweep(limit=100, now=now, deleting=no) == 0
        assert await intact(backends, thread_id)
        assert await backends.retention.sweep(limit=100, now=now) == 1
        assert not await intact(backends, thread_id)


async def test_a_sweep_past_its_deadline_starts_nothing(cold_backend: str, open_cold: Open) -> None:
    """`deadline`: no deletion starts after it; the next sweep deletes what it left."""
    async with open_cold(cold_backend, state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("deadline")
        await seed(backends, thread_id)
        now = await age_everything(backends, thread_id)
        assert await backends.retention.sweep(limit=100, now=now, deadline=time.monotonic()) == 0
        assert await intact(backends, thread_id)
        assert await backends.retention.sweep(limit=100, now=now) == 1
        assert not await intact(backends, thread_id)


async def test_keep_forever_sweeps_nothing(cold_backend: str, open_cold: Open) -> None:
    async with open_cold(cold_backend, state_cold_ttl_seconds=-1) as backends:
        thread_id = unique_thread("forever")
        await seed(backends, thread_id)
        now = await age_everything(backends, thread_id)
        assert await backends.retention.sweep(limit=100, now=now) == 0
        assert await intact(backends, thread_id)


async def test_a_live_thread_keeps_everything_its_latest_state_names(
    cold_backend: str, open_cold: Open
) -> None:
    """Step 1's values and the archive records are old; step 2 and a record update are
    recent. Nothing the thread names may expire until the thread itself does, whole."""
    async with open_cold(cold_backend, state_cold_ttl_seconds=TTL) as backends:
        thread_id, neighbour = unique_thread("live"), unique_thread("neighbour")
        await seed_references(backends, thread_id)
        await seed_references(backends, neighbour)
        archives = await archive_ids(backends, thread_id)
        assert len(archives) >= 2
        if cold_backend == "cosmos":
            first = await last_write(backends, thread_id, *archives)
            await next_second(first)
            await step_two(backends, thread_id)
            await step_two(backends, neighbour)
            # Each thread's latest activity: the two may land in different seconds.
            latest_each = [await last_write(backends, t) for t in (thread_id, neighbour)]
            latest = max(latest_each)
            assert first < min(latest_each)
            assert await service_ttl(backends, latest + TTL) == []
            # A TTL after the earlier thread's latest activity: everything written before
            # it is older than the TTL, neither thread is.
            now = min(latest_each) + TTL
        else:
            await step_two(backends, thread_id)
            await step_two(backends, neighbour)
            # Step 1 and the archive records far in the past, the latest activity now.
            await pg_execute(
                backends,
                "UPDATE cp_checkpoints SET created_at = created_at - make_interval(secs => %s)"
                " WHERE thread_id = ANY(%s) AND checkpoint_id = %s",
                (LONG_AGO, [thread_id, neighbour], checkpoint_id(1)),
            )
            await backdate(backends, *archives, tables=("workflow_records",))
            now = time.time()
        assert await backends.retention.sweep(limit=100, now=now) == 0
        assert await references_intact(backends, thread_id)
        assert await archive_ids(backends, thread_id) == archives

        # Once the thread is idle for a TTL it goes whole, its archive records with it.
        if cold_backend == "cosmos":
            later = latest + TTL + 1
        else:
            await backdate(backends, thread_id, neighbour)
            later = time.time()
        assert await backends.retention.sweep(limit=1, now=later) == 1
        assert await backends.retention.sweep(limit=100, now=later) == 1
        for gone in (thread_id, neighbour):
            assert await archive_ids(backends, gone) == set()
            assert await backends.cold.get(gone) is None
            assert await backends.checkpoints.get_checkpoint(gone, "", None) is None
        if cold_backend == "cosmos":
            assert await partition_of(backends.settings, thread_id) == []
        else:
            assert await pg_rows(backends, thread_id) == dict.fromkeys(PG_TABLES, 0)


async def test_an_orphan_archive_record_expires_by_its_own_age(
    cold_backend: str, open_cold: Open
) -> None:
    """An offload whose record write never happened leaves archive records no thread owns."""
    async with open_cold(cold_backend, state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("never-created")
        store = TieredStateStore(backends.cold, None, backends.settings)
        await store.size.offload(thread_id, "big", os.urandom(3000).hex())
        archives = await archive_ids(backends, thread_id)
        assert archives
        now = await age_everything(backends, *archives)
        assert await backends.retention.sweep(limit=100, now=now) == len(archives)
        assert await archive_ids(backends, thread_id) == set()


@pytest.mark.parametrize("fence", [None, 1], ids=["unfenced", "under-the-flush-lock"])
async def test_a_thread_deleted_while_held_keeps_nothing_from_expiring(
    cold_backend: str, open_cold: Open, fence: int | None
) -> None:
    """Its hold outlives it (a row, a marker item), and so does its flush fence when it was
    deleted under the write-behind flush lock, but they own nothing: its archive records
    expire as orphans, and no thread is counted that was not there."""
    async with open_cold(cold_backend, state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("deleted-held")
        await seed_references(backends, thread_id)
        archives = await archive_ids(backends, thread_id)
        assert len(archives) >= 2
        await backends.retention.hold(thread_id)
        await backends.checkpoints.delete_thread(thread_id, fence=fence)
        await backends.cold.delete(thread_id)
        now = await age_everything(backends, thread_id, *archives)
        assert await backends.retention.sweep(limit=100, now=now) == len(archives)
        assert await archive_ids(backends, thread_id) == set()
        if cold_backend == "cosmos":
            assert await partition_of(backends.settings, thread_id) == []
        else:
            fences = "SELECT token FROM cp_flush_fences WHERE thread_id = %s"
            assert await pg_execute(backends, fences, (thread_id,)) == []


async def age_everything(backends: Backends, *thread_ids: str) -> float:
    """A `now` at which every write so far to these threads is older than LONG_AGO."""
    if backends.settings.state_cold_backend.value == "cosmos":
        return time.time() + LONG_AGO
    await backdate(backends, *thread_ids)
    return time.time()


async def test_an_expired_thread_is_forgotten_by_redis_too(
    cold_backend: str, open_cold: Open
) -> None:
    """With a hot tier, the record Redis cached, its checkpoint cache and its events go
    with the thread the sweep deleted: nothing is served after it (`state.retention`)."""
    async with open_cold(cold_backend, hot=True, state_cold_ttl_seconds=TTL) as backends:
        assert backends.hot is not None and backends.events is not None
        store = TieredStateStore(backends.cold, backends.hot, backends.settings)
        thread_id = unique_thread("expired-hot")
        await seed(backends, thread_id, record=False)
        await store.create(thread_id, {"n": 0}, agent_id="seed")
        assert await store.get(thread_id) is not None  # cached in Redis
        assert (await backends.hot.read(thread_id)).record is not None
        await backends.events.append(thread_id, {"kind": "seeded"})
        now = await age_everything(backends, thread_id)
        assert await backends.retention.sweep(limit=100, now=now) == 1
        assert (await backends.hot.read(thread_id)).record is None
        assert await store.get(thread_id) is None
        assert await backends.events.read(thread_id) == []


async def test_a_sweep_redis_cannot_follow_deletes_nothing_and_the_next_one_does(
    cold_backend: str, open_cold: Open
) -> None:
    """Redis unreachable as the sweep forgets the first thread: the sweep stops before the
    cold deletion, so nothing is deleted that Redis still serves; the next sweep, Redis
    back, deletes and forgets them all."""
    async with open_cold(
        cold_backend, hot=True, state_cold_ttl_seconds=TTL, state_write_mode="write-through"
    ) as backends:
        assert backends.hot_checkpoints is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        threads = [unique_thread(f"swept-{n}") for n in range(3)]
        for thread_id in threads:
            await saver.aput(latest(thread_id), empty_checkpoint(), {"step": 0}, {})
        now = await age_everything(backends, *threads)
        client = backends.hot_checkpoints._client  # the hot store's too
        round_trips = RedisRoundTrips(
            refuse=redis.exceptions.ConnectionError("Connection refused (injected)")
        )
        unwatch = round_trips.watch(client)
        try:
            with pytest.raises(BackendUnavailable):
                await backends.retention.sweep(limit=100, now=now)
        finally:
            unwatch()
        for thread_id in threads:
            assert await backends.checkpoints.get_checkpoint(thread_id, "", None)
        assert await backends.retention.sweep(limit=100, now=now) == len(threads)
        reader = TieredCheckpointSaver.from_backends(backends)
        for thread_id in threads:
            assert await backends.checkpoints.get_checkpoint(thread_id, "", None) is None
            assert await reader.aget_tuple(latest(thread_id)) is None


async def test_a_sweep_stopped_part_way_leaves_the_thread_whole_and_the_next_deletes_it(
    cold_backend: str, open_cold: Open
) -> None:
    """Redis failing part-way through forgetting a thread (write-behind: after its backlog
    was discarded): its cold state is all there still, and the next sweep deletes it."""
    ttl = 2
    async with open_cold(
        cold_backend, hot=True, state_cold_ttl_seconds=ttl, state_write_mode="write-behind"
    ) as backends:
        assert backends.events is not None and backends.flusher is not None
        thread_id = unique_thread("stopped")
        await seed(backends, thread_id)
        await past_the_ttl(backends, cold_backend, ttl, thread_id)
        events = backends.events
        working = events.delete

        async def failing(_: str) -> None:
            raise BackendUnavailable("redis", "refused (injected)")

        events.delete = failing  # type: ignore[method-assign]
        with pytest.raises(BackendUnavailable):
            await backends.retention.sweep(limit=100)
        events.delete = working  # type: ignore[method-assign]
        assert await intact(backends, thread_id)
        assert await backends.retention.sweep(limit=100) == 1
        assert await backends.cold.get(thread_id) is None
        assert await backends.checkpoints.get_checkpoint(thread_id, "", None) is None


async def test_postgres_a_run_writing_a_thread_the_sweep_is_forgetting_waits_and_finds_it_gone(
    open_cold: Open,
) -> None:
    """Forgetting happens with the thread's record locked: a writer coming back to it
    meanwhile waits for the sweep, then finds the thread gone, never a record left with
    its checkpoints deleted."""
    async with open_cold(
        "postgres", hot=True, state_cold_ttl_seconds=TTL, state_write_mode="write-behind"
    ) as backends:
        assert backends.events is not None
        thread_id = unique_thread("comes-back")
        await seed(backends, thread_id)
        await backdate(backends, thread_id)
        writer: list[asyncio.Task[Any]] = []
        events = backends.events
        working = events.delete

        async def run_comes_back(forgotten: str) -> None:
            await working(forgotten)
            if forgotten == thread_id and not writer:
                write = backends.cold.update_section(
                    thread_id, "n", 2, expected_version=2, agent_id="run"
                )
                writer.append(asyncio.ensure_future(write))
                await asyncio.wait(writer, timeout=1.0)
                assert not writer[0].done()  # waiting for the sweep's lock

        events.delete = run_comes_back  # type: ignore[method-assign]
        assert await backends.retention.sweep(limit=100) == 1
        events.delete = working  # type: ignore[method-assign]
        with pytest.raises(WorkflowNotFound):
            await writer[0]
        assert await backends.cold.get(thread_id) is None
        assert await backends.checkpoints.get_checkpoint(thread_id, "", None) is None


async def test_postgres_a_reader_filling_the_cache_as_the_sweep_deletes_never_serves_it_after(
    open_cold: Open,
) -> None:
    """A reader misses the cache while the sweep deletes the thread and fills it from what
    the cold tier still shows (the batch not committed yet); Redis is cut as the sweep
    ends, so its last drop fails. The fill was refused (the fill fence delete_thread sets,
    now set by the sweep too): once Redis is back, no reader is served the expired thread
    (it was, up to the hot TTL)."""
    async with open_cold(
        "postgres", hot=True, state_cold_ttl_seconds=TTL, state_write_mode="write-through"
    ) as backends:
        assert backends.events is not None and backends.hot_checkpoints is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        thread_id = unique_thread("refilled")
        await saver.aput(latest(thread_id), empty_checkpoint(), {"step": 0}, {})
        now = await age_everything(backends, thread_id)
        reader = TieredCheckpointSaver.from_backends(backends)
        round_trips = RedisRoundTrips()
        unwatch = round_trips.watch(backends.hot_checkpoints._client)  # the hot store's too
        events = backends.events
        working = events.delete
        read: list[Any] = []

        async def reader_fills_then_redis_is_cut(forgotten: str) -> None:
            await working(forgotten)
            read.append(await reader.aget_tuple(latest(thread_id)))
            round_trips.refuse = redis.exceptions.ConnectionError("Connection reset (injected)")

        events.delete = reader_fills_then_redis_is_cut  # type: ignore[method-assign]
        try:
            assert await backends.retention.sweep(limit=100, now=now) == 1
        finally:
            events.delete = working  # type: ignore[method-assign]
            unwatch()
        assert read and read[0] is not None  # the cold tier still showed it
        assert await backends.checkpoints.get_checkpoint(thread_id, "", None) is None
        later = TieredCheckpointSaver.from_backends(backends)
        assert await later.aget_tuple(latest(thread_id)) is None


async def test_a_sweep_failing_after_fencing_a_threads_fills_lifts_the_fence(
    cold_backend: str, open_cold: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep fences off fills of a thread it deletes, then fails before the cold delete
    (appends outpacing the backlog's discard: Redis answered). The thread is left whole
    and goes on: its checkpoint, older than the fence, is cached again by the next read,
    not read from the cold tier by every read for the hot TTL (the sweep's last drop did
    not lift the fence it had set)."""
    monkeypatch.setattr(redis_write_behind, "DISCARD_ATTEMPTS", 0)
    async with open_cold(
        cold_backend, hot=True, state_cold_ttl_seconds=TTL, state_write_mode="write-behind"
    ) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        at_first = await expiring_thread(backends, saver)
        thread_id = at_first["configurable"]["thread_id"]
        now = await age_everything(backends, thread_id)
        with pytest.raises(StillWriting):
            await backends.retention.sweep(limit=100, now=now)
        assert await backends.cold.get(thread_id) is not None
        reader = TieredCheckpointSaver.from_backends(backends)
        assert await reader.aget_tuple(latest(thread_id)) is not None  # a miss: read cold
        cold_reads: list[str | None] = []
        get_checkpoint = backends.checkpoints.get_checkpoint

        async def counted(thread: str, ns: str, checkpoint_id: str | None, **kwargs: Any) -> Any:
            cold_reads.append(checkpoint_id)
            return await get_checkpoint(thread, ns, checkpoint_id, **kwargs)

        monkeypatch.setattr(backends.checkpoints, "get_checkpoint", counted)
        assert await reader.aget_tuple(latest(thread_id)) is not None
        assert cold_reads == [], "the thread's checkpoint was not cached again"


async def test_postgres_two_delete_for_runs_whose_threads_share_a_lock_key_do_not_deadlock(
    open_cold: Open,
) -> None:
    """Threads whose lock keys collide, interleaved in thread order: each call locks the
    keys in their own order, so neither waits for the other in a cycle."""
    async with open_cold("postgres") as backends:
        rows = await pg_execute(
            backends,
            "SELECT array_agg(s ORDER BY s) FROM (SELECT 'dl-' || i AS s"
            " FROM generate_series(1, 300000) AS i) AS t"
            " GROUP BY hashtext(s) HAVING count(*) = 2 LIMIT 200",
            (),
        )
        pairs = [row[0] for row in rows]
        # Run a's threads p1 < p2, run b's q1 > q2, p1 ~ q1 and p2 ~ q2 colliding.
        p1, q1, p2, q2 = next(
            (p1, q1, p2, q2)
            for pair1 in pairs
            for pair2 in pairs
            if pair1 != pair2
            for p1, q1 in itertools.permutations(pair1)
            for p2, q2 in itertools.permutations(pair2)
            if p1 < p2 and q2 < q1
        )
        for run, threads in (("run-a", (p1, p2)), ("run-b", (q1, q2))):
            for thread_id in threads:
                await backends.checkpoints.put_checkpoint(
                    StoredCheckpoint(
                        thread_id=thread_id,
                        checkpoint_ns="",
                        checkpoint_id=checkpoint_id(1),
                        parent_checkpoint_id=None,
                        checkpoint=("msgpack", b"checkpoint"),
                        metadata={"step": 1, "run_id": run},
                        channel_versions={},
                    ),
                    [],
                )
        url = backends.settings.postgres_url
        assert url is not None
        async with await psycopg.AsyncConnection.connect(url.get_secret_value()) as other:
            # Another call holds p1's key a moment: a waits for it, b takes p2's, then waits.
            await other.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (THREAD_MAINTENANCE_LOCK, p1)
            )
            first = asyncio.ensure_future(backends.checkpoints.delete_for_runs(["run-a"]))
            await asyncio.sleep(0.5)
            second = asyncio.ensure_future(backends.checkpoints.delete_for_runs(["run-b"]))
            await asyncio.sleep(0.5)
            await other.commit()
        assert await asyncio.gather(first, second) == [{p1, p2}, {q1, q2}]


async def test_postgres_write_behind_sweeps_with_a_pool_of_one(open_cold: Open) -> None:
    """Forgetting a thread writes on a connection of its own: never while the sweep's
    transaction holds the pool's only one."""
    async with open_cold(
        "postgres",
        hot=True,
        state_cold_ttl_seconds=TTL,
        state_write_mode="write-behind",
        postgres_pool_max_size=1,
        postgres_pool_timeout_seconds=2.0,
    ) as backends:
        thread_id = unique_thread("pool-of-one")
        await seed(backends, thread_id)
        await backdate(backends, thread_id)
        assert await backends.retention.sweep(limit=100) == 1


async def expiring_thread(backends: Backends, saver: TieredCheckpointSaver) -> RunnableConfig:
    """A write-behind thread with one flushed step: its config at that step."""
    thread_id = unique_thread("expiring")
    await backends.cold.create(thread_id, {"n": 0}, agent_id="seed")
    first = checkpoint_with(empty_checkpoint(), "v" * 2000)
    at_first = await saver.aput(latest(thread_id), first, {"step": 0}, {"v": "1"})
    await saver.aflush(thread_id)
    return at_first


async def test_a_run_appending_while_the_sweep_forgets_is_refused_and_nothing_comes_back(
    cold_backend: str, open_cold: Open
) -> None:
    """A run on the expired thread writes its next step while the sweep forgets it: refused
    at once (`ThreadExpiring`), so no flusher can apply it onto the deleted thread; once
    the sweep has ended, the thread id starts afresh."""
    async with open_cold(
        cold_backend, hot=True, state_cold_ttl_seconds=TTL, state_write_mode="write-behind"
    ) as backends:
        assert backends.events is not None and backends.flusher is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        at_first = await expiring_thread(backends, saver)
        thread_id = at_first["configurable"]["thread_id"]
        now = await age_everything(backends, thread_id)
        events = backends.events
        working = events.delete
        refused: list[str] = []

        async def run_goes_on(forgotten: str) -> None:
            await working(forgotten)
            second = checkpoint_with(empty_checkpoint(), "v" * 2000)
            with pytest.raises(ThreadExpiring):
                await saver.aput(at_first, second, {"step": 1}, {})
            refused.append("put")
            with pytest.raises(ThreadExpiring):
                await saver.aput_writes(at_first, [("v", "late")], "task")
            refused.append("writes")

        events.delete = run_goes_on  # type: ignore[method-assign]
        assert await backends.retention.sweep(limit=100, now=now) == 1
        events.delete = working  # type: ignore[method-assign]
        assert refused == ["put", "writes"]
        await backends.flusher.drain()
        assert await backends.checkpoints.get_checkpoint(thread_id, "", None) is None
        anew = await saver.aput(latest(thread_id), empty_checkpoint(), {"step": 0}, {})
        await saver.aflush(thread_id)
        found = await backends.checkpoints.get_checkpoint(thread_id, "", None)
        assert found is not None
        assert found.checkpoint_id == anew["configurable"]["checkpoint_id"]


async def test_a_sweep_that_cannot_end_its_refusal_leaves_appends_refused_not_flushed_back(
    cold_backend: str, open_cold: Open
) -> None:
    """Redis failing as the sweep ends the refusal (it used to drop the backlog again
    there, and a step appended meanwhile was then flushed onto the deleted thread): the
    sweep still deletes, appends stay refused until the refusal expires, nothing comes back."""
    async with open_cold(
        cold_backend, hot=True, state_cold_ttl_seconds=TTL, state_write_mode="write-behind"
    ) as backends:
        assert backends.flusher is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        at_first = await expiring_thread(backends, saver)
        thread_id = at_first["configurable"]["thread_id"]
        now = await age_everything(backends, thread_id)
        log = backends.flusher.log
        accept = log.accept_appends

        async def fails(_: str) -> None:
            raise BackendUnavailable("redis", "refused (injected)")

        log.accept_appends = fails  # type: ignore[method-assign]
        assert await backends.retention.sweep(limit=100, now=now) == 1
        log.accept_appends = accept  # type: ignore[method-assign]
        late = checkpoint_with(empty_checkpoint(), "v" * 2000)
        with pytest.raises(ThreadExpiring):
            await saver.aput(at_first, late, {"step": 1}, {})
        await backends.flusher.drain()
        assert await backends.checkpoints.get_checkpoint(thread_id, "", None) is None
        await log.accept_appends(thread_id)  # what the refusal's expiry does
        await saver.aput(latest(thread_id), empty_checkpoint(), {"step": 0}, {})


async def test_an_eviction_during_the_sweep_does_not_let_a_late_step_come_back(
    open_cold: Open,
) -> None:
    """The design's eviction policy spares keys without a TTL (volatile-*). The refusal
    mark had one: memory pressure while the sweep deleted the thread evicted it, the run's
    next step was accepted into the log and flushed onto the deleted thread after the
    sweep. The mark now holds its deadline instead: never evicted, the step is refused."""
    async with open_cold(
        "postgres", hot=True, state_cold_ttl_seconds=TTL, state_write_mode="write-behind"
    ) as backends:
        assert backends.events is not None and backends.flusher is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        at_first = await expiring_thread(backends, saver)
        thread_id = at_first["configurable"]["thread_id"]
        now = await age_everything(backends, thread_id)
        client = backends.flusher.log._client  # the test's own Redis server
        events = backends.events
        working = events.delete
        outcome: list[str] = []

        async def pressure_then_run_goes_on(forgotten: str) -> None:
            await working(forgotten)
            # Memory pressure under the design's policy: Redis evicts keys with a TTL.
            policy = (await client.config_get("maxmemory-policy"))["maxmemory-policy"]
            await client.config_set("maxmemory-policy", "volatile-ttl")
            await client.config_set("maxmemory", 1)
            try:
                await client.set("filler", "x" * 1024)
            except redis.exceptions.ResponseError:
                pass  # OOM once nothing volatile is left to evict
            finally:
                await client.config_set("maxmemory", 0)
                await client.config_set("maxmemory-policy", policy)
            second = checkpoint_with(empty_checkpoint(), "v" * 2000)
            try:
                await saver.aput(at_first, second, {"step": 1}, {})
            except ThreadExpiring:
                outcome.append("refused")
            else:
                outcome.append("accepted")

        events.delete = pressure_then_run_goes_on  # type: ignore[method-assign]
        assert await backends.retention.sweep(limit=100, now=now) == 1
        events.delete = working  # type: ignore[method-assign]
        await backends.flusher.drain()
        back = await backends.checkpoints.get_checkpoint(thread_id, "", None)
        assert (outcome, back) == (["refused"], None), (
            outcome,
            back and back.metadata,
        )


async def test_a_sweep_failing_inside_its_discard_leaves_the_kept_thread_writable(
    open_cold: Open,
) -> None:
    """Redis fails right after the discard script ran (it set the refusal) but before the
    discard returned (its unlisting): the sweep fails and the thread is not deleted (the
    Postgres batch rolls back). Appends to it stayed refused for EXPIRING_REFUSAL_MS (1 h);
    the refusal is now ended whether the discard returned or not."""
    async with open_cold(
        "postgres", hot=True, state_cold_ttl_seconds=TTL, state_write_mode="write-behind"
    ) as backends:
        assert backends.flusher is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        at_first = await expiring_thread(backends, saver)
        thread_id = at_first["configurable"]["thread_id"]
        now = await age_everything(backends, thread_id)
        log = backends.flusher.log
        unlist = log._unlist

        async def fails(*args: object) -> None:
            raise BackendUnavailable("redis", "connection reset (injected)")

        log._unlist = fails  # type: ignore[method-assign]
        try:
            with pytest.raises(BackendUnavailable):
                await backends.retention.sweep(limit=100, now=now)
        finally:
            log._unlist = unlist  # type: ignore[method-assign]
        assert await backends.checkpoints.get_checkpoint(thread_id, "", None) is not None
        second = checkpoint_with(empty_checkpoint(), "v" * 2000)
        await saver.aput(at_first, second, {"step": 1}, {})  # the thread was kept: writable


async def test_cosmos_a_sweep_failing_after_it_deleted_a_thread_refused_its_late_step(
    open_cold: Open,
) -> None:
    """Thread a deleted, then the sweep fails on thread b: the step a run wrote to a while
    it was forgotten was refused, and nothing is flushed back onto deleted a."""
    ttl = 2
    async with open_cold(
        "cosmos", hot=True, state_cold_ttl_seconds=ttl, state_write_mode="write-behind"
    ) as backends:
        assert backends.events is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        heads = {}
        for thread_id in (unique_thread("expired"), unique_thread("expired")):
            await backends.cold.create(thread_id, {"n": 0}, agent_id="seed")
            state = checkpoint_with(empty_checkpoint(), "v" * 2000)
            heads[thread_id] = await saver.aput(latest(thread_id), state, {"step": 0}, {"v": "1"})
            await saver.aflush(thread_id)
        await asyncio.sleep(ttl + 1.5)
        events = backends.events
        working = events.delete
        forgotten: list[str] = []

        async def second_fails(thread_id: str) -> None:
            if forgotten:
                raise BackendUnavailable("redis", "refused (injected)")
            forgotten.append(thread_id)
            await working(thread_id)
            late = checkpoint_with(empty_checkpoint(), "v" * 2000)
            with pytest.raises(ThreadExpiring):
                await saver.aput(heads[thread_id], late, {"step": 1}, {})

        events.delete = second_fails  # type: ignore[method-assign]
        with pytest.raises(BackendUnavailable):
            await backends.retention.sweep(limit=100)
        events.delete = working  # type: ignore[method-assign]
        [deleted] = forgotten
        assert await backends.cold.get(deleted) is None  # deleted before the failure
        await saver.aflush(deleted)
        assert await backends.checkpoints.get_checkpoint(deleted, "", None) is None


def checkpoint_with(checkpoint: Any, value: str) -> Any:
    """`checkpoint` holding `value` in channel v (a value of its own, not inline)."""
    checkpoint["channel_values"] = {"v": value}
    checkpoint["channel_versions"] = {"v": "1" if value.startswith("v") else "2"}
    return checkpoint


def latest(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


# --------------------------------------------------------------------------- Cosmos


async def test_cosmos_hold_and_release_cost_three_requests_whatever_the_threads_size(
    open_cold: Open,
) -> None:
    """One marker item holds the thread; no other item is written, so a review case pays
    three requests, not a patch per item of its history."""
    async with open_cold("cosmos") as backends:
        thread_id, neighbour = unique_thread("held"), unique_thread("neighbour")
        await seed(backends, thread_id)
        await seed(backends, neighbour)
        before = {
            item["id"]: item["_etag"] for item in await partition_of(backends.settings, thread_id)
        }
        assert len(before) > 6
        counters = backends.cold_counters
        counters.reset()
        await backends.retention.hold(thread_id)
        assert counters.requests == 1
        items = await partition_of(backends.settings, thread_id)
        assert [item["id"] for item in items if item.get("ttl") == -1] == [cosmos_retention.HOLD_ID]
        assert {i["id"]: i["_etag"] for i in items if i["id"] in before} == before
        assert await exempt(backends, thread_id)
        assert not await exempt(backends, neighbour)

        held_at = next(i["_ts"] for i in items if i["id"] == cosmos_retention.HOLD_ID)
        await next_second(held_at)
        counters.reset()
        await backends.retention.release(thread_id)
        assert counters.requests == 2  # the marker, one query for items held the old way
        items = await partition_of(backends.settings, thread_id)
        assert [item["id"] for item in items if "ttl" in item] == []
        # A patch is a write: inactivity counts from the release.
        assert max(item["_ts"] for item in items) > held_at
        assert await intact(backends, thread_id)


async def test_cosmos_release_clears_a_hold_of_every_item_page_by_page(
    open_cold: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Earlier versions held a thread by `ttl: -1` on every item, and the record passed it
    on to its updates' audit entries: `release` ends such a hold too."""
    monkeypatch.setattr(cosmos_retention, "PAGE_SIZE", 2)
    async with open_cold("cosmos") as backends:
        thread_id, other = unique_thread("held"), unique_thread("other")
        await seed(backends, thread_id)
        await seed(backends, other)
        for held in (thread_id, other):
            await hold_every_item(backends, held)
        await backends.cold.update_section(thread_id, "n", 2, expected_version=2, agent_id="t")
        items = await partition_of(backends.settings, thread_id)
        assert len(items) > 3 * cosmos_retention.PAGE_SIZE
        assert len([item for item in items if item["type"] == "audit"]) == 3
        assert [item["id"] for item in items if item.get("ttl") != -1] == []

        await backends.retention.release(thread_id)
        await backends.cold.update_section(thread_id, "n", 3, expected_version=3, agent_id="t")
        assert [
            i["id"] for i in await partition_of(backends.settings, thread_id) if "ttl" in i
        ] == []
        assert [entry.version for entry in await backends.cold.audit_trail(thread_id)] == [
            4,
            3,
            2,
            1,
        ]
        assert await exempt(backends, other)  # released one thread, not its neighbours


async def test_cosmos_sweep_drops_a_marker_left_alone_uncounted(open_cold: Open) -> None:
    """A hold on a thread that stores nothing (or no longer does) leaves only its marker:
    the sweep deletes it once it is older than the TTL, held or not, as no thread."""
    async with open_cold("cosmos", state_cold_ttl_seconds=TTL) as backends:
        held, released = unique_thread("lone-held"), unique_thread("lone-released")
        for thread_id in (held, released):
            await backends.retention.hold(thread_id)
        await backends.retention.release(released)
        latest = await last_write(backends, held, released)
        assert await backends.retention.sweep(limit=100, now=latest + TTL - 1) == 0
        for thread_id in (held, released):
            assert [item["id"] for item in await partition_of(backends.settings, thread_id)] == [
                cosmos_retention.HOLD_ID
            ]
        assert await backends.retention.sweep(limit=100, now=latest + TTL + 1) == 0
        for thread_id in (held, released):
            assert await partition_of(backends.settings, thread_id) == []


async def test_cosmos_sweep_drops_the_flush_fence_a_deleted_thread_left_uncounted(
    open_cold: Open,
) -> None:
    """A thread deleted under the flush lock keeps its fence document (a late write-behind
    batch must not bring it back); the sweep deletes it a TTL later, as no thread, with a
    hold marker beside it."""
    async with open_cold("cosmos", state_cold_ttl_seconds=TTL) as backends:
        fenced, held = unique_thread("fence-only"), unique_thread("fence-and-hold")
        for thread_id in (fenced, held):
            await seed(backends, thread_id, record=False)
            await backends.checkpoints.delete_thread(thread_id, fence=1)
        await backends.retention.hold(held)
        assert [item["id"] for item in await partition_of(backends.settings, fenced)] == [FENCE_ID]
        latest = await last_write(backends, fenced, held)
        assert await backends.retention.sweep(limit=100, now=latest + TTL - 1) == 0
        assert len(await partition_of(backends.settings, held)) == 2
        assert await backends.retention.sweep(limit=100, now=latest + TTL + 1) == 0
        for thread_id in (fenced, held):
            assert await partition_of(backends.settings, thread_id) == []


async def spared_markers(backends: Backends) -> list[str]:
    """The threads the Cosmos sweep's markers have it look at again."""
    items = await partition_of(backends.settings, cosmos_retention.WATERMARK_PARTITION)
    return [item["spared"] for item in items if item["type"] == cosmos_retention.SPARED_TYPE]


async def test_cosmos_a_marked_thread_written_between_the_looks_loses_its_marker(
    open_cold: Open,
) -> None:
    """A thread with a marker (spared once) that a run writes while the sweep waits for its
    flush lock (between the two looks) is kept, its marker dropped: the write brings it
    back in a later slice. (Counted as refused by `deleting`, it kept its marker.)"""
    async with open_cold("cosmos", state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("written-between")
        await seed(backends, thread_id)
        latest = await last_write(backends, thread_id)
        now = latest + TTL + 1
        assert await backends.retention.sweep(limit=100, now=now, spare=[thread_id]) == 0
        assert await spared_markers(backends) == [thread_id]
        kept: list[str] = []

        async def expiring(expired: str) -> None:
            await next_second(latest)
            await step_two(backends, expired)  # a run resumed it

        async def spared(thread: str) -> None:
            kept.append(thread)

        swept = await backends.retention.sweep(limit=100, now=now, expiring=expiring, spared=spared)
        assert swept == 0
        assert kept == [thread_id]  # the caller is told it was kept, as before
        assert await spared_markers(backends) == []
        assert await backends.retention.sweep(limit=100, now=now) == 0


@pytest.mark.parametrize("when", ["between-the-looks", "after-the-second-look"])
async def test_cosmos_a_thread_another_sweep_deleted_meanwhile_is_counted_by_that_one_alone(
    when: str, open_cold: Open
) -> None:
    """Another sweep deletes the expired thread while this one is at it (between its two
    looks, or once the second look found it still expired): only the sweep that deleted it
    counts it (this one used to count it too)."""
    async with (
        open_cold("cosmos", state_cold_ttl_seconds=TTL) as backends,
        backends_for(backends.settings) as other,
    ):
        thread_id = unique_thread("raced")
        await seed(backends, thread_id)
        now = await age_everything(backends, thread_id)
        by_other: list[int] = []

        async def other_sweeps(moment: str) -> None:
            if moment == when:
                by_other.append(await other.retention.sweep(limit=100, now=now))

        async def expiring(expired: str) -> None:
            await other_sweeps("between-the-looks")

        async def deleting(expired: str) -> bool:
            await other_sweeps("after-the-second-look")
            return True

        swept = await backends.retention.sweep(
            limit=100, now=now, expiring=expiring, deleting=deleting
        )
        assert by_other == [1]
        assert swept == 0, "counted by both sweeps"
        assert not await intact(backends, thread_id)


async def test_cosmos_a_sweep_stopped_amid_a_threads_checkpoints_leaves_whole_ancestries(
    open_cold: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep failing part-way through a thread's checkpoints (a request refused, the
    worker gone): the record goes last (its id stays taken), and the checkpoints left are
    the oldest, each with its parent and blobs, so a reader never finds a latest checkpoint
    whose parent is gone (they used to go in no set order: the oldest first). The next
    sweep deletes the rest and counts the thread."""
    monkeypatch.setattr(cosmos_io, "DELETE_BATCH", 1)
    async with open_cold("cosmos", state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("stopped-amid")
        await backends.cold.create(thread_id, {"n": 0}, agent_id="seed")
        for n in (1, 2, 3):
            await backends.checkpoints.put_checkpoint(
                step(thread_id, n, {"small": str(n)}),
                [StoredBlob("small", str(n), ("json", f"[{n}]".encode()))],
            )
        now = await age_everything(backends, thread_id)
        retention = backends.retention
        assert isinstance(retention, cosmos_retention.CosmosRetention)
        io = retention._io
        delete_ids = io.delete_ids
        batches: list[list[str]] = []

        async def failing_after_one(partition: str, ids: Sequence[str]) -> None:
            if batches:
                raise BackendUnavailable("cosmos", "refused (injected)")
            batches.append(list(ids))
            await delete_ids(partition, ids)

        io.delete_ids = failing_after_one  # type: ignore[method-assign]
        with pytest.raises(BackendUnavailable):
            await retention.sweep(limit=100, now=now)
        io.delete_ids = delete_ids  # type: ignore[method-assign]
        assert len(batches) == 1  # one checkpoint deleted
        assert await backends.cold.get(thread_id) is not None
        latest = await backends.checkpoints.get_checkpoint(thread_id, "", None)
        assert latest is not None and latest.checkpoint_id == checkpoint_id(2)
        at: StoredCheckpoint | None = latest
        while at is not None:  # every ancestor readable, with its blob
            assert await backends.checkpoints.get_blobs(thread_id, "", at.channel_versions) == {
                "small": ("json", f"[{at.metadata['step']}]".encode())
            }
            parent = at.parent_checkpoint_id
            at = (
                None
                if parent is None
                else await backends.checkpoints.get_checkpoint(thread_id, "", parent)
            )
            assert parent is None or at is not None, f"{parent} is gone"
        assert await retention.sweep(limit=100, now=now) == 1
        assert await backends.checkpoints.get_checkpoint(thread_id, "", None) is None
        assert await partition_of(backends.settings, thread_id) == []


async def test_cosmos_release_spares_a_hold_taken_again_meanwhile(open_cold: Open) -> None:
    """The pass for holds of every item (earlier versions) leaves the marker alone: a hold
    that lands between the marker's patch and that pass stays."""
    async with open_cold("cosmos") as backends:
        thread_id = unique_thread("rehold")
        await seed(backends, thread_id)
        await backends.retention.hold(thread_id)
        retention = backends.retention
        assert isinstance(retention, cosmos_retention.CosmosRetention)
        patch_partition = retention._patch_partition

        async def hold_again_first(*args: Any, **kwargs: Any) -> None:
            await retention.hold(thread_id)
            await patch_partition(*args, **kwargs)

        retention._patch_partition = hold_again_first  # type: ignore[method-assign]
        await retention.release(thread_id)
        assert await exempt(backends, thread_id)


async def hold_every_item(backends: Backends, thread_id: str) -> None:
    """Hold a thread as versions before the hold marker did."""
    connection = CosmosConnection(backends.settings.cosmos)
    try:
        container = await connection.container()
        for item in await partition_of(backends.settings, thread_id):
            await container.patch_item(
                item["id"],
                partition_key=thread_id,
                patch_operations=[{"op": "set", "path": "/ttl", "value": -1}],
            )
    finally:
        await connection.close()


# --------------------------------------------------------------------------- Postgres


async def test_postgres_sweep_deletes_expired_threads_whole(open_cold: Open) -> None:
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        expired, recent = unique_thread("expired"), unique_thread("recent")
        checkpointed = unique_thread("old-record-new-checkpoint")
        only_checkpoints, held = unique_thread("no-record"), unique_thread("held")
        for thread_id in (expired, recent, checkpointed, held):
            await seed(backends, thread_id)
        await seed(backends, only_checkpoints, record=False)
        await backends.retention.hold(held)
        await backdate(backends, expired, only_checkpoints, held)
        await backdate(backends, checkpointed, tables=("workflow_records",))

        assert await backends.retention.sweep(limit=100) == 2

        for gone in (expired, only_checkpoints):
            assert await pg_rows(backends, gone) == dict.fromkeys(PG_TABLES, 0), gone
        for kept in (recent, checkpointed, held):
            assert await intact(backends, kept), kept
        assert await backends.retention.sweep(limit=100) == 0


async def test_postgres_sweep_drops_flush_fences_older_than_the_ttl(open_cold: Open) -> None:
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        old, recent = unique_thread("old-fence"), unique_thread("recent-fence")
        now_us = int(time.time() * 1_000_000)
        await backends.checkpoints.delete_thread(old, fence=now_us - LONG_AGO * 1_000_000)
        await backends.checkpoints.delete_thread(recent, fence=now_us)
        fences = "SELECT thread_id FROM cp_flush_fences WHERE thread_id = ANY(%s)"
        assert sorted(await pg_execute(backends, fences, ([old, recent],))) == sorted(
            [(old,), (recent,)]
        )

        assert await backends.retention.sweep(limit=100) == 0  # a fence is not a thread
        assert await pg_execute(backends, fences, ([old, recent],)) == [(recent,)]


async def test_postgres_pending_writes_landing_after_delete_thread_expire_a_ttl_later(
    open_cold: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put_writes after (or racing) delete_thread leaves writes of a thread with neither
    record nor checkpoint, which no query of the sweep found, so they stayed for good: the
    delete's marker has the sweep remove them a TTL after the delete (Cosmos expires them
    by TTL), and no sooner. A batch of one: the sweep goes on until a batch is short."""
    monkeypatch.setattr(postgres_retention, "SWEEP_BATCH", 1)
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        threads = [unique_thread("orphaned"), unique_thread("orphaned")]
        late = [StoredWrite("task", "", 0, "messages", ("json", b"[1]"))]
        for thread_id in threads:
            await seed(backends, thread_id, record=False)
            await backends.checkpoints.delete_thread(thread_id)
            await backends.checkpoints.put_writes(
                thread_id, "", checkpoint_id(1), late, upsert=False
            )
        leftover = {**dict.fromkeys(PG_TABLES, 0), "cp_writes": 1}

        assert await backends.retention.sweep(limit=100) == 0
        for thread_id in threads:
            assert await pg_rows(backends, thread_id) == leftover

        # No thread is left to count.
        assert await backends.retention.sweep(limit=100, now=time.time() + LONG_AGO) == 0
        for thread_id in threads:
            assert await pg_rows(backends, thread_id) == dict.fromkeys(PG_TABLES, 0)


async def test_postgres_pending_writes_landing_after_the_sweep_deleted_their_thread_expire_later(
    open_cold: Open,
) -> None:
    """A put_writes landing after the sweep deleted its idle thread (racing it) left writes
    of a thread with neither record nor checkpoint, which no later sweep found: the sweep's
    delete marks the thread as delete_thread does, on the sweep's clock, so the writes go
    a TTL after that delete, and no sooner (not by the same sweep, nor one a TTL later)."""
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("swept")
        await seed(backends, thread_id)
        later = time.time() + LONG_AGO
        assert await backends.retention.sweep(limit=100, now=later) == 1
        late = [StoredWrite("task", "", 0, "messages", ("json", b"[1]"))]
        await backends.checkpoints.put_writes(thread_id, "", checkpoint_id(1), late, upsert=False)
        leftover = {**dict.fromkeys(PG_TABLES, 0), "cp_writes": 1}

        assert await backends.retention.sweep(limit=100, now=later + TTL / 2) == 0
        assert await pg_rows(backends, thread_id) == leftover

        assert await backends.retention.sweep(limit=100, now=later + LONG_AGO) == 0
        assert await pg_rows(backends, thread_id) == dict.fromkeys(PG_TABLES, 0)
        markers = "SELECT thread_id FROM cp_deleted_threads WHERE thread_id = %s"
        assert await pg_execute(backends, markers, (thread_id,)) == []


async def test_postgres_a_parentless_put_after_the_sweeps_last_look_is_not_deleted(
    open_cold: Open,
) -> None:
    """A put with no parent (a subgraph's first step) took no maintenance lock: one
    acknowledged after the sweep found its thread still expired, before the sweep's delete,
    was deleted with the thread. It now waits for the sweep, then lands after the delete."""
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("stepping")
        await seed(backends, thread_id, record=False)
        await backdate(backends, thread_id)
        subgraph = StoredCheckpoint(
            thread_id=thread_id,
            checkpoint_ns="child:1",
            checkpoint_id=str(uuid6(clock_seq=-1)),
            parent_checkpoint_id=None,
            checkpoint=("msgpack", b"subgraph"),
            metadata={"step": 0},
            channel_versions={},
        )
        steps: list[asyncio.Task[None]] = []

        async def deleting(_: str) -> bool:
            # After the sweep's last look, before its delete: the subgraph's step lands.
            steps.append(asyncio.create_task(backends.checkpoints.put_checkpoint(subgraph, [])))
            await asyncio.wait(steps, timeout=0.3)
            return True

        assert await backends.retention.sweep(limit=100, deleting=deleting) == 1
        await asyncio.wait_for(steps[0], timeout=5)
        stored = await backends.checkpoints.get_checkpoint(thread_id, "child:1", None)
        assert stored is not None and stored.checkpoint_id == subgraph.checkpoint_id
        assert await backends.checkpoints.get_checkpoint(thread_id, "", None) is None


async def test_postgres_a_hold_taken_as_the_sweep_deletes_waits_and_is_dropped_a_ttl_later(
    open_cold: Open,
) -> None:
    """A hold landing after the sweep's last look, before its delete, was deleted with the
    thread (`dropped_holds`): the case under review deleted, its hold silently gone. The
    hold now waits for the sweep (the thread's maintenance lock) and lands after the delete,
    as a lone hold the sweep drops once it is a TTL old; a hold taken before the sweep's
    lock keeps the thread."""
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        swept, kept = unique_thread("held-as-swept"), unique_thread("held-first")
        for thread_id in (swept, kept):
            await seed(backends, thread_id)
        await backdate(backends, swept, kept)
        holds: list[asyncio.Task[None]] = []

        async def deleting(thread_id: str) -> bool:
            if thread_id == swept:  # after the sweep's last look, before its delete
                holds.append(asyncio.create_task(backends.retention.hold(thread_id)))
                await asyncio.wait(holds, timeout=0.3)
                assert not holds[0].done()  # waiting for the sweep
            return True

        url = backends.settings.postgres_url
        assert url is not None
        async with await psycopg.AsyncConnection.connect(url.get_secret_value()) as holder:
            # `kept`'s hold under way (`HOLD_SQL`'s steps) as the sweep tries its lock: spared.
            await holder.execute(
                "SELECT pg_advisory_xact_lock_shared(%s, hashtext(%s))",
                (THREAD_MAINTENANCE_LOCK, kept),
            )
            await holder.execute(
                "INSERT INTO retention_holds (thread_id, held) VALUES (%s, true)", (kept,)
            )
            assert await backends.retention.sweep(limit=100, deleting=deleting) == 1
            await holder.commit()
        await asyncio.wait_for(holds[0], timeout=5)
        assert not await intact(backends, swept)
        assert await exempt(backends, swept)  # a lone hold, nothing to keep
        assert await intact(backends, kept) and await exempt(backends, kept)
        assert await backends.retention.sweep(limit=100) == 0
        assert await exempt(backends, swept)  # not yet a TTL old
        await backdate(backends, swept, kept, tables=("retention_holds",))
        assert await backends.retention.sweep(limit=100) == 0
        rows = await pg_execute(backends, "SELECT thread_id FROM retention_holds", ())
        assert rows == [(kept,)]  # the lone hold gone; the held thread's stays


async def test_postgres_pending_writes_landing_after_delete_for_runs_emptied_their_thread_expire(
    open_cold: Open,
) -> None:
    """A put_writes of a run's step landing after `delete_for_runs` deleted the run, the
    thread's only one: writes of a thread with neither record nor checkpoint, which no
    sweep found. The delete marks a thread it empties, as delete_thread does."""
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        emptied, kept = unique_thread("emptied"), unique_thread("kept")
        run_id = f"run-{uuid.uuid4().hex[:8]}"
        for thread_id, ids in ((emptied, [1]), (kept, [1, 2])):
            for n in ids:
                await backends.checkpoints.put_checkpoint(
                    StoredCheckpoint(
                        thread_id=thread_id,
                        checkpoint_ns="",
                        checkpoint_id=checkpoint_id(n),
                        parent_checkpoint_id=checkpoint_id(n - 1) if n > 1 else None,
                        checkpoint=("msgpack", b"checkpoint"),
                        metadata={"run_id": run_id} if n == ids[-1] else {},
                        channel_versions={},
                    ),
                    [],
                )
        assert await backends.checkpoints.delete_for_runs([run_id]) == {emptied, kept}
        late = [StoredWrite("task", "", 0, "messages", ("json", b"[1]"))]
        for thread_id, ids in ((emptied, [1]), (kept, [1, 2])):
            await backends.checkpoints.put_writes(
                thread_id, "", checkpoint_id(ids[-1]), late, upsert=False
            )

        assert await backends.retention.sweep(limit=100) == 0
        assert (await pg_rows(backends, emptied))["cp_writes"] == 1

        # `kept` is idle by then: swept whole, its late write with it.
        assert await backends.retention.sweep(limit=100, now=time.time() + LONG_AGO) == 1
        assert await pg_rows(backends, emptied) == dict.fromkeys(PG_TABLES, 0)
        markers = "SELECT thread_id FROM cp_deleted_threads WHERE thread_id = %s"
        assert await pg_execute(backends, markers, (emptied,)) == []


async def test_postgres_a_new_runs_first_writes_on_a_deleted_threads_id_are_not_swept(
    open_cold: Open,
) -> None:
    """A thread id used again a TTL after its delete: the new run's first writes may land
    before its first checkpoint (LangGraph does not order them), and a sweep then finds
    the thread with writes and no checkpoint. Only the writes of checkpoints older than
    the delete are leftovers; the new run's are kept."""
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("used-again")
        await seed(backends, thread_id, record=False)
        await backends.checkpoints.delete_thread(thread_id)
        late = [StoredWrite("task", "", 0, "messages", ("json", b"[1]"))]
        await backends.checkpoints.put_writes(thread_id, "", checkpoint_id(1), late, upsert=False)
        await pg_execute(
            backends,
            "UPDATE cp_deleted_threads SET deleted_at = deleted_at - make_interval(secs => %s)"
            " WHERE thread_id = %s",
            (LONG_AGO, thread_id),
        )
        new_run_first = str(uuid6(clock_seq=-1))  # made after the delete
        await backends.checkpoints.put_writes(thread_id, "", new_run_first, late, upsert=False)

        assert await backends.retention.sweep(limit=100) == 0
        writes = "SELECT checkpoint_id FROM cp_writes WHERE thread_id = %s"
        assert await pg_execute(backends, writes, (thread_id,)) == [(new_run_first,)]


async def test_postgres_without_retention_a_deleted_thread_leaves_no_mark(
    open_cold: Open,
) -> None:
    """Kept for ever (no TTL), no sweep runs: a mark of a deleted thread would stay for
    good, one row per thread ever deleted."""
    async with open_cold("postgres") as backends:
        threads = [unique_thread("kept-for-ever"), unique_thread("kept-for-ever")]
        for thread_id in threads:
            await seed(backends, thread_id, record=False)
        await backends.checkpoints.delete_thread(threads[0])
        await backends.checkpoints.prune([threads[1]], strategy="delete")
        markers = "SELECT thread_id FROM cp_deleted_threads WHERE thread_id = ANY(%s)"
        assert await pg_execute(backends, markers, (threads,)) == []


async def test_postgres_a_thread_deleted_then_used_again_keeps_what_its_new_run_wrote(
    open_cold: Open,
) -> None:
    """A TTL after the delete, the sweep finds the thread has checkpoints again (a new run):
    it drops the delete's marker and nothing else; leftovers go with the thread whole once
    it expires."""
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("reused")
        await seed(backends, thread_id, record=False)
        await backends.checkpoints.delete_thread(thread_id)
        late = [StoredWrite("task", "", 0, "messages", ("json", b"[1]"))]
        await backends.checkpoints.put_writes(thread_id, "", checkpoint_id(1), late, upsert=False)
        new_run = StoredCheckpoint(
            thread_id=thread_id,
            checkpoint_ns="",
            checkpoint_id=checkpoint_id(2),
            parent_checkpoint_id=None,
            checkpoint=("msgpack", b"new run"),
            metadata={},
            channel_versions={},
        )
        await backends.checkpoints.put_checkpoint(new_run, [])
        await backends.checkpoints.put_writes(thread_id, "", checkpoint_id(2), late, upsert=False)
        await pg_execute(
            backends,
            "UPDATE cp_deleted_threads SET deleted_at = deleted_at - make_interval(secs => %s)"
            " WHERE thread_id = %s",
            (LONG_AGO, thread_id),
        )

        assert await backends.retention.sweep(limit=100) == 0
        writes = "SELECT checkpoint_id FROM cp_writes WHERE thread_id = %s ORDER BY checkpoint_id"
        assert await pg_execute(backends, writes, (thread_id,)) == [
            (checkpoint_id(1),),
            (checkpoint_id(2),),
        ]
        listed = backends.checkpoints.list_checkpoints(
            thread_id=thread_id, checkpoint_ns=None, before=None, limit=None, metadata_filter=None
        )
        assert [c.checkpoint_id async for c in listed] == [checkpoint_id(2)]
        markers = "SELECT thread_id FROM cp_deleted_threads WHERE thread_id = %s"
        assert await pg_execute(backends, markers, (thread_id,)) == []


async def test_postgres_a_released_thread_expires_a_ttl_after_the_release(
    open_cold: Open,
) -> None:
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("released")
        await seed(backends, thread_id)
        await backends.retention.hold(thread_id)
        await backdate(backends, thread_id)
        await backends.retention.release(thread_id)
        assert await backends.retention.sweep(limit=100) == 0  # released just now
        assert await intact(backends, thread_id)

        await backdate(backends, thread_id, tables=("retention_holds",))
        assert await backends.retention.sweep(limit=100) == 1
        assert await pg_rows(backends, thread_id) == dict.fromkeys(PG_TABLES, 0)
        holds = "SELECT count(*) FROM retention_holds WHERE thread_id = %s"
        assert await pg_execute(backends, holds, (thread_id,)) == [(0,)]


async def test_postgres_sweep_is_bounded_and_batched(
    open_cold: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_retention, "SWEEP_BATCH", 2)
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        threads = [unique_thread("expired") for _ in range(5)]
        for thread_id in threads:
            await seed(backends, thread_id)
        await backdate(backends, *threads)

        assert await backends.retention.sweep(limit=3) == 3
        assert await backends.retention.sweep(limit=3) == 2
        assert await backends.retention.sweep(limit=3) == 0
        for thread_id in threads:
            assert await backends.cold.get(thread_id) is None


async def test_cosmos_sweep_reads_time_slices_a_few_per_tick(
    open_cold: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cosmos_retention, "SLICE_SECONDS", 1)
    monkeypatch.setattr(cosmos_retention, "SLICES_PER_SWEEP", 2)
    async with open_cold("cosmos", state_cold_ttl_seconds=TTL) as backends:
        threads = [unique_thread("sliced") for _ in range(3)]
        for thread_id in threads:
            await backends.cold.create(thread_id, {"n": 0}, agent_id="seed")
            await next_second(await last_write(backends, thread_id))
        now = await last_write(backends, *threads) + TTL + 1
        # Two one-second slices per tick (the quiet seconds between writes are skipped).
        assert await backends.retention.sweep(limit=100, now=now) == 2
        assert [await backends.cold.get(t) is None for t in threads] == [True, True, False]
        assert await backends.retention.sweep(limit=100, now=now) == 1
        assert await backends.retention.sweep(limit=100, now=now) == 0
        # The watermark stands at the cutoff: a later write is read by a later tick.
        late = unique_thread("late")
        await backends.cold.create(late, {"n": 0}, agent_id="seed")
        assert await backends.retention.sweep(limit=100, now=now) == 0
        later = await last_write(backends, late) + TTL + 1
        assert await backends.retention.sweep(limit=100, now=later) == 1


async def test_cosmos_sweeps_cut_short_amid_a_slice_of_kept_threads_still_reach_its_end(
    open_cold: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slice holding more kept threads (held, for review) than one tick can look at before
    its deadline: each tick read the slice again from its start, looked at the same
    threads again and stopped at the same place, so an expired thread behind them was
    never deleted. The watermark now moves past the threads a tick settled."""
    ticks = [0.0]  # one per held thread looked at: a deadline two looks away
    monkeypatch.setattr(
        cosmos_retention,
        "time",
        SimpleNamespace(monotonic=lambda: ticks[0], time=time.time),
    )
    async with open_cold("cosmos", state_cold_ttl_seconds=TTL) as backends:
        retention = backends.retention
        assert isinstance(retention, cosmos_retention.CosmosRetention)
        held = retention._held

        async def slow_held(thread_id: str) -> bool:
            ticks[0] += 1
            return await held(thread_id)

        monkeypatch.setattr(retention, "_held", slow_held)
        kept = [unique_thread("under-review") for _ in range(4)]
        for thread_id in kept:
            await backends.cold.create(thread_id, {"n": 0}, agent_id="seed")
            await retention.hold(thread_id)
            await next_second(await last_write(backends, thread_id))
        expired = unique_thread("behind")
        await backends.cold.create(expired, {"n": 0}, agent_id="seed")
        now = await last_write(backends, *kept, expired) + TTL + 1
        swept = [await retention.sweep(limit=100, now=now, deadline=ticks[0] + 2) for _ in range(4)]
        assert sum(swept) == 1 and await backends.cold.get(expired) is None, swept
        assert all([await backends.cold.get(thread_id) is not None for thread_id in kept])


async def test_cosmos_an_orphan_archive_swept_in_write_behind_is_gone_for_good(
    make_settings: Callable[..., Settings],
) -> None:
    """Forgetting an expired archive record touches no flush state: nothing is left in its
    partition for a later sweep to find and count again (a fence item was, every TTL)."""
    ttl = 2
    settings = make_settings(
        "cosmos",
        state_cold_ttl_seconds=ttl,
        state_write_mode="write-behind",
        cosmos_container=f"retention-{uuid.uuid4().hex[:8]}",
    )
    try:
        async with backends_for(settings) as backends:
            store = TieredStateStore(backends.cold, None, backends.settings)
            owner = unique_thread("never-created")
            await store.size.offload(owner, "big", os.urandom(3000).hex())
            archives = await archive_ids(backends, owner)
            assert archives
            swept = []
            for _ in range(2):
                await asyncio.sleep(ttl + 1.5)
                swept.append(await backends.retention.sweep(limit=100))
            assert swept == [len(archives), 0]
            for archive in archives:
                assert await partition_of(settings, archive) == []
    finally:
        await drop_container(settings)


async def past_the_ttl(backends: Backends, cold_backend: str, ttl: float, *threads: str) -> None:
    """The threads' last activity older than the cold TTL: backdated on Postgres, waited
    for on Cosmos (which judges by the items' own `_ts`)."""
    if cold_backend == "postgres":
        await backdate(backends, *threads)
    else:
        await asyncio.sleep(ttl + 1.5)


async def test_a_thread_spared_on_the_second_look_keeps_its_resumed_runs_unflushed_steps(
    cold_backend: str, open_cold: Open
) -> None:
    """A run resumes the expired thread between the sweep's first look and its discard:
    one step flushed (the thread is active again: the second look spares it), the next
    still in the log. The spared thread keeps that step: the run's boundary flushes it
    and it is the thread's latest checkpoint (the discard used to drop it, acknowledged)."""
    ttl = 2 if cold_backend == "cosmos" else TTL
    async with open_cold(
        cold_backend, hot=True, state_cold_ttl_seconds=ttl, state_write_mode="write-behind"
    ) as backends:
        assert backends.flusher is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        at_first = await expiring_thread(backends, saver)
        thread_id = at_first["configurable"]["thread_id"]
        await past_the_ttl(backends, cold_backend, ttl, thread_id)
        await backends.flusher.stop()  # flushed only where the test says
        heads: list[RunnableConfig] = []

        async def run_resumes(expired: str) -> None:
            assert expired == thread_id
            second = checkpoint_with(empty_checkpoint(), "w" * 2000)
            at_second = await saver.aput(at_first, second, {"step": 1}, {"v": "2"})
            await backends.flusher.flush_thread(thread_id)  # lands before the discard's lock
            third = empty_checkpoint()
            third["channel_values"] = {"v": "x" * 2000}
            third["channel_versions"] = {"v": "3"}
            heads.append(await saver.aput(at_second, third, {"step": 2}, {"v": "3"}))

        assert await backends.retention.sweep(limit=100, expiring=run_resumes) == 0
        await saver.aflush(thread_id)  # the run's boundary
        found = await backends.checkpoints.get_checkpoint(thread_id, "", None)
        assert found is not None
        assert found.checkpoint_id == heads[0]["configurable"]["checkpoint_id"], found.metadata
        fourth = checkpoint_with(empty_checkpoint(), "y" * 2000)
        await saver.aput(heads[0], fourth, {"step": 3}, {})  # the run goes on


async def test_an_expired_thread_a_run_resumed_keeps_its_acknowledged_unflushed_step(
    cold_backend: str, open_cold: Open
) -> None:
    """A run resumed the expired thread just before the sweep: its step is in the log,
    acknowledged, not flushed yet (the flusher wakes within seconds). The sweep's second
    look reads the cold tier alone, which has not seen the step: the thread must not be
    deleted with that step all the same."""
    ttl = 2 if cold_backend == "cosmos" else TTL
    async with open_cold(
        cold_backend, hot=True, state_cold_ttl_seconds=ttl, state_write_mode="write-behind"
    ) as backends:
        assert backends.flusher is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        at_first = await expiring_thread(backends, saver)
        thread_id = at_first["configurable"]["thread_id"]
        await past_the_ttl(backends, cold_backend, ttl, thread_id)
        await backends.flusher.stop()  # flushed only where the test says
        second = checkpoint_with(empty_checkpoint(), "w" * 2000)
        at_second = await saver.aput(at_first, second, {"step": 1}, {"v": "2"})
        assert await backends.retention.sweep(limit=100) == 0
        await saver.aflush(thread_id)  # the run's boundary
        found = await backends.checkpoints.get_checkpoint(thread_id, "", None)
        assert found is not None, "the run's acknowledged step went with the thread"
        assert found.checkpoint_id == at_second["configurable"]["checkpoint_id"]


@pytest.mark.parametrize("mode", ["write-behind", "write-through"])
async def test_two_sweeps_at_once_delete_each_expired_thread_once_and_leave_it_writable(
    cold_backend: str, mode: str, open_cold: Open
) -> None:
    """Two instances' timers sweep at once (the host's singleton lock lapsed), over the same
    expired threads, with and without records. Nothing escapes, each thread is deleted and
    counted once, a thread a run resumed between the looks is spared by both, and once both
    end no thread refuses appends nor has its flush lock held."""
    # Known limit: on Cosmos without a flush lock (write-through) nothing serializes the two
    # deletions of one thread, and no transaction tells which one removed it: both may
    # count it when both delete items of it (how often depends on how the two interleave;
    # one that finds it gone does not count it).
    counted_by_both = (cold_backend, mode) == ("cosmos", "write-through")
    ttl = 2 if cold_backend == "cosmos" else TTL
    async with (
        open_cold(
            cold_backend, hot=True, state_cold_ttl_seconds=ttl, state_write_mode=mode
        ) as backends,
        backends_for(backends.settings) as other,
    ):
        saver = TieredCheckpointSaver.from_backends(backends)
        resumed_config = await expiring_thread(backends, saver)
        resumed = resumed_config["configurable"]["thread_id"]
        expired = [(await expiring_thread(backends, saver))["configurable"]["thread_id"]]
        expired.append((await expiring_thread(backends, saver))["configurable"]["thread_id"])
        for _ in range(2):  # checkpoints alone: no record for Postgres to lock
            bare = unique_thread("bare")
            await saver.aput(latest(bare), empty_checkpoint(), {"step": 0}, {})
            await saver.aflush(bare)
            expired.append(bare)
        threads = [resumed, *expired]
        await past_the_ttl(backends, cold_backend, ttl, *threads)
        for flusher in (backends.flusher, other.flusher):
            if flusher is not None:
                await flusher.stop()  # flushed only where the test says
        started: list[str] = []
        both_started = asyncio.Event()
        heads: list[RunnableConfig] = []

        async def run_resumes() -> None:
            second = checkpoint_with(empty_checkpoint(), "w" * 2000)
            at_second = await saver.aput(resumed_config, second, {"step": 1}, {"v": "2"})
            await saver.aflush(resumed)  # the thread is active again
            third = empty_checkpoint()
            third["channel_values"] = {"v": "x" * 2000}
            third["channel_versions"] = {"v": "3"}
            heads.append(await saver.aput(at_second, third, {"step": 2}, {"v": "3"}))

        def looking(name: str) -> Callable[[str], Any]:
            async def expiring(thread_id: str) -> None:
                if name in started:
                    return
                started.append(name)
                if len(started) == 2:
                    # Both sweeps past a first look, neither holding a flush lock yet.
                    await run_resumes()
                    both_started.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(both_started.wait(), 5)

            return expiring

        swept = await asyncio.gather(
            backends.retention.sweep(limit=100, expiring=looking("a")),
            other.retention.sweep(limit=100, expiring=looking("b")),
        )
        assert sorted(started) == ["a", "b"]
        assert heads, "the run never resumed its thread"
        if counted_by_both:
            assert len(expired) <= sum(swept) <= 2 * len(expired), swept
        else:
            assert sum(swept) == len(expired), swept
        for thread_id in expired:
            assert await backends.cold.get(thread_id) is None
            assert await backends.checkpoints.get_checkpoint(thread_id, "", None) is None
        await saver.aflush(resumed)  # the run's boundary
        found = await backends.checkpoints.get_checkpoint(resumed, "", None)
        assert found is not None
        assert found.checkpoint_id == heads[0]["configurable"]["checkpoint_id"]
        if backends.flusher is not None:
            log = backends.flusher.log
            for thread_id in threads:
                token = await log.lock_thread(thread_id, ttl_ms=10_000)
                assert token is not None, f"the flush lock of {thread_id} is still held"
                await log.unlock_thread(thread_id, token)
        # Appends accepted: the spared thread's run goes on, a deleted id starts anew.
        fourth = checkpoint_with(empty_checkpoint(), "y" * 2000)
        await saver.aput(heads[0], fourth, {"step": 3}, {})
        for thread_id in expired:
            await saver.aput(latest(thread_id), empty_checkpoint(), {"step": 0}, {})
            await saver.aflush(thread_id)


@pytest.mark.parametrize("why", ["written-between-the-looks", "deleting-says-no"])
async def test_a_thread_the_sweep_spares_takes_appends_before_the_sweep_ends(
    cold_backend: str, why: str, open_cold: Open
) -> None:
    """The first expired thread the sweep decides on is spared (a run flushed a step of it
    between the sweep's two looks, or `deleting` says no): the run's next step is taken at
    once, while the sweep goes on deleting the others (it used to be refused,
    `ThreadExpiring`, until the whole sweep ended), and is kept."""
    ttl = 2 if cold_backend == "cosmos" else TTL
    async with open_cold(
        cold_backend, hot=True, state_cold_ttl_seconds=ttl, state_write_mode="write-behind"
    ) as backends:
        assert backends.flusher is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        configs = {}
        for _ in range(3):
            config = await expiring_thread(backends, saver)
            configs[config["configurable"]["thread_id"]] = config
        await past_the_ttl(backends, cold_backend, ttl, *configs)
        await backends.flusher.stop()  # flushed only where the test says
        spared: list[str] = []
        heads: list[RunnableConfig] = []

        async def expiring(thread_id: str) -> None:
            if why == "written-between-the-looks" and not spared:
                spared.append(thread_id)
                step = checkpoint_with(empty_checkpoint(), "w" * 2000)
                configs[thread_id] = await saver.aput(configs[thread_id], step, {"step": 1}, {})
                await backends.flusher.flush_thread(thread_id)

        async def deleting(thread_id: str) -> bool:
            if not spared:
                spared.append(thread_id)
                return False
            if not heads:  # the spared thread's run goes on, the sweep not over
                step = checkpoint_with(empty_checkpoint(), "x" * 2000)
                heads.append(await saver.aput(configs[spared[0]], step, {"step": 2}, {}))
            return True

        swept = await backends.retention.sweep(limit=100, expiring=expiring, deleting=deleting)
        assert swept == 2
        assert heads, "no thread was decided on after the spared one"
        await saver.aflush(spared[0])
        found = await backends.checkpoints.get_checkpoint(spared[0], "", None)
        assert found is not None
        assert found.checkpoint_id == heads[0]["configurable"]["checkpoint_id"]


async def pg_checkpoint_parents(backends: Backends, thread_id: str) -> dict[str, str | None]:
    """The thread's checkpoints, each with its parent's id."""
    rows = await pg_execute(
        backends,
        "SELECT checkpoint_id, parent_checkpoint_id FROM cp_checkpoints WHERE thread_id = %s",
        (thread_id,),
    )
    return {str(row[0]): row[1] for row in rows}


async def test_postgres_a_put_holding_its_parent_as_the_sweep_deletes_never_outlives_the_thread(
    open_cold: Open,
) -> None:
    """A write-through put of a thread idle for a whole TTL locks its parent row just as
    the sweep deletes the thread: the sweep leaves the thread being written alone (it is
    not idle), never deletes the parent under the put, which would then commit after the
    delete's snapshot and bring the thread back as one checkpoint whose parent is gone. The
    put is held after its parent's lock by a blob of the same key another transaction
    inserted and has not committed (its insert waits for that one's outcome)."""
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("written-as-swept")
        await backends.checkpoints.put_checkpoint(step(thread_id, 1, {}), [])
        await backdate(backends, thread_id)
        url = backends.settings.postgres_url
        assert url is not None
        async with await psycopg.AsyncConnection.connect(url.get_secret_value()) as holder:
            await holder.execute(
                "INSERT INTO cp_blobs (thread_id, checkpoint_ns, channel, version, type, blob,"
                " schema_version) VALUES (%s, '', 'messages', '2', 'json', '[0]', 1)",
                (thread_id,),
            )
            put = asyncio.ensure_future(
                backends.checkpoints.put_checkpoint(
                    step(thread_id, 2, {"messages": "2"}),
                    [StoredBlob("messages", "2", ("json", b"[2]"))],
                )
            )
            await asyncio.sleep(0.3)
            assert not put.done()  # its parent locked, its blob waiting for the holder
            sweep = asyncio.ensure_future(backends.retention.sweep(limit=100))
            await asyncio.sleep(0.3)
            await holder.rollback()
        await asyncio.wait_for(put, timeout=5)
        swept = await asyncio.wait_for(sweep, timeout=5)
        parents = await pg_checkpoint_parents(backends, thread_id)
        assert parents == {checkpoint_id(1): None, checkpoint_id(2): checkpoint_id(1)}, parents
        assert swept == 0

        # Idle a TTL again, it goes whole; a put after that finds its parent gone.
        await backdate(backends, thread_id)
        assert await backends.retention.sweep(limit=100) == 1
        assert await pg_checkpoint_parents(backends, thread_id) == {}
        with pytest.raises(ParentGone):
            await backends.checkpoints.put_checkpoint(step(thread_id, 3, {}), [])


async def test_postgres_a_sweep_meeting_a_delete_of_one_of_its_threads_spares_it_without_deadlock(
    open_cold: Open,
) -> None:
    """A fenced delete_thread starts once the sweep has raised the thread's fence: it
    takes the thread's maintenance lock, then waits for the fence row. The sweep only
    tries that lock (waiting for it would close a cycle: 40P01), spares the thread and
    deletes the other; the delete then goes on. Neither fails, and the next sweep takes
    what the delete left of the thread (its record)."""
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        deleted, other = unique_thread("deleted-meanwhile"), unique_thread("expired")
        for thread_id in (deleted, other):  # in this order: the sweep finds them so
            await seed(backends, thread_id)
        await backdate(backends, deleted, other)
        token = int(time.time() * 1_000_000)
        delete: list[asyncio.Task[None]] = []

        async def expiring(thread_id: str) -> int:
            if thread_id == other:  # the first one's fence raised
                delete.append(
                    asyncio.ensure_future(
                        backends.checkpoints.delete_thread(deleted, fence=token + 1)
                    )
                )
                await asyncio.sleep(0.3)
                assert not delete[0].done()  # its lock taken, waiting for the fence row
            return token

        swept = await backends.retention.sweep(limit=100, expiring=expiring)
        assert delete, "the sweep found the threads in another order"
        await asyncio.wait_for(delete[0], timeout=5)
        assert swept == 1
        # The record delete_thread leaves (checkpoints only) goes with the next sweep (a
        # thread one batch spared is not taken up again by the same sweep).
        assert await backends.retention.sweep(limit=100) == 1
        for thread_id in (deleted, other):
            assert await pg_rows(backends, thread_id) == dict.fromkeys(PG_TABLES, 0), thread_id


def _deadlocked(error: BaseException) -> bool:
    """Whether Postgres broke a deadlock by failing this call (SQLSTATE 40P01)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, psycopg.Error) and cause.sqlstate == "40P01":
            return True
        cause = cause.__cause__
    return False


def _flushed_step(thread_id: str) -> list[FlushOp]:
    """A write-behind batch: a pending write of step 1 and a step whose parent is step 1
    (another id than the write-through step 2: unguarded, it checks no parent)."""
    return [
        WritesPut(
            thread_id,
            "",
            checkpoint_id(1),
            [StoredWrite("t", "", 0, "c", ("json", b"[1]"))],
            upsert=True,
        ),
        CheckpointPut(replace(step(thread_id, 2, {}), checkpoint_id=checkpoint_id(3)), []),
    ]


def _fencing(token: int) -> Callable[[str], Awaitable[int]]:
    """A sweep's `expiring`: every thread's fence raised to `token`."""

    async def expiring(thread_id: str) -> int:
        return token

    return expiring


async def _after(pause: float, call: Coroutine[Any, Any, Any]) -> Any:
    await asyncio.sleep(pause)
    return await call


async def test_postgres_a_sweep_racing_the_writes_and_deletes_of_its_threads_never_deadlocks(
    open_cold: Open,
) -> None:
    """The sweep (fences raised, as under the flush lock) runs at once with what else
    locks the same expired threads: write-through puts (the maintenance lock shared, then
    the parent row), fenced write-behind batches (the fence row, then the rows), record
    writes (the record row), delete_thread and prune (the maintenance lock, then the fence
    row, then the rows), each started after a random pause. No call fails on a deadlock,
    none fails but as its contract says, and no thread is left with a checkpoint whose
    parent is gone."""
    rng = random.Random(8842)
    expected = (ParentGone, StaleFencingToken, VersionConflict, WorkflowNotFound)
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        cold, checkpoints = backends.cold, backends.checkpoints
        for _ in range(30):
            threads = [unique_thread("racing") for _ in range(4)]
            for thread_id in threads:
                await cold.create(thread_id, {"n": 0}, agent_id="seed")
                await checkpoints.put_checkpoint(step(thread_id, 1, {}), [])
            await backdate(backends, *threads)
            # Flush lock tokens are in microseconds (the sweep drops a fence a TTL old):
            # the sweep's and the delete's locks are newer than a batch's (it lost its lock).
            token = int(time.time() * 1_000_000)
            calls: list[Coroutine[Any, Any, Any]] = [
                backends.retention.sweep(limit=100, expiring=_fencing(token)),
                checkpoints.delete_thread(threads[0], fence=token + 1),
                checkpoints.prune(threads[1:2], strategy="delete"),
            ]
            for thread_id in threads:
                calls += [
                    checkpoints.put_checkpoint(step(thread_id, 2, {}), []),
                    cold.update_section(thread_id, "n", 1, expected_version=1, agent_id="run"),
                ]
                if thread_id != threads[1]:  # a batch after a delete unfenced is stored
                    batch = _flushed_step(thread_id)
                    calls.append(
                        checkpoints.apply_batch(batch, fence=token - rng.randint(1, 10**6))
                    )
            results = await asyncio.gather(
                *(_after(rng.uniform(0, 0.02), call) for call in calls), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not [e for e in errors if _deadlocked(e)], errors
            assert all(isinstance(e, expected) for e in errors), errors
            for thread_id in threads:
                parents = await pg_checkpoint_parents(backends, thread_id)
                orphans = {c: p for c, p in parents.items() if p is not None and p not in parents}
                assert not orphans, (threads.index(thread_id), parents)


async def test_postgres_a_thread_spared_in_one_batch_is_not_forgotten_again_by_the_next(
    open_cold: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep of several batches: the oldest expired thread is spared in the first (its
    run's step is still in the log), and still reads expired. The next batches must not
    forget it again: that took its flush lock and refused its run's appends
    (`ThreadExpiring`) anew, each batch, while the sweep went on with the others."""
    monkeypatch.setattr(postgres_retention, "SWEEP_BATCH", 2)
    async with open_cold(
        "postgres", hot=True, state_cold_ttl_seconds=TTL, state_write_mode="write-behind"
    ) as backends:
        assert backends.flusher is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        configs = [await expiring_thread(backends, saver) for _ in range(3)]
        threads = [config["configurable"]["thread_id"] for config in configs]
        await backdate(backends, *threads)
        # The first the sweep lists: the oldest record.
        await pg_execute(
            backends,
            "UPDATE workflow_records SET updated_at = updated_at - interval '1 hour'"
            " WHERE thread_id = %s",
            (threads[0],),
        )
        await backends.flusher.stop()  # the spared thread's steps stay in the log
        resumed, at = threads[0], configs[0]
        puts: list[str] = []
        decided: list[str] = []

        async def expiring(thread_id: str) -> None:
            nonlocal at
            if thread_id == resumed and not puts:
                # Its run goes on: a step acknowledged, not flushed (the sweep spares it).
                at = await saver.aput(at, empty_checkpoint(), {"step": 1}, {})
                puts.append("before")
            elif thread_id != resumed and decided:
                # Spared already, while the sweep goes on: the run's next step is taken.
                at = await saver.aput(at, empty_checkpoint(), {"step": len(puts) + 1}, {})
                puts.append(thread_id)

        async def spared(thread_id: str) -> None:
            decided.append(thread_id)

        assert await backends.retention.sweep(limit=100, expiring=expiring, spared=spared) == 2
        assert decided == [resumed], "looked at again after it was spared"
        # The one the second batch looked at (both backdated alike: either order).
        assert puts[0] == "before" and len(puts) == 2 and puts[1] in threads[1:]
        await saver.aflush(resumed)
        found = await backends.checkpoints.get_checkpoint(resumed, "", None)
        assert found is not None
        assert found.checkpoint_id == at["configurable"]["checkpoint_id"]


async def test_postgres_a_batch_of_spared_threads_does_not_end_the_sweep(
    open_cold: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The oldest expired threads fill a batch and are spared (`deleting` says no, as for
    a backlog no flusher can apply): the sweep goes on to the next batch. Ending there
    kept the threads behind them from ever expiring, each sweep finding the same ones
    first."""
    monkeypatch.setattr(postgres_retention, "SWEEP_BATCH", 2)
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        kept = [unique_thread("kept"), unique_thread("kept")]
        for thread_id in kept:
            await seed(backends, thread_id)
        await backdate(backends, *kept)
        await pg_execute(  # the first batch: the oldest records
            backends,
            "UPDATE workflow_records SET updated_at = updated_at - interval '1 hour'"
            " WHERE thread_id = ANY(%s)",
            (kept,),
        )

        async def deleting(thread_id: str) -> bool:
            return thread_id not in kept

        for _ in range(2):  # every sweep alike, not only the first
            behind = unique_thread("behind")
            await seed(backends, behind)
            await backdate(backends, behind)
            assert await backends.retention.sweep(limit=100, deleting=deleting) == 1
            assert await pg_rows(backends, behind) == dict.fromkeys(PG_TABLES, 0)
        for thread_id in kept:
            assert await pg_rows(backends, thread_id) != dict.fromkeys(PG_TABLES, 0)
