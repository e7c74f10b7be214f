"""Hot-tier scripts given more values than one Lua `unpack` can pass to a command (about
8,000: Lua's C stack limit), on real servers: a step with thousands of pending writes and
the put that moves the entry holding them on, a step changing thousands of channels, a
workflow record with thousands of sections, a backlog of thousands of entries acknowledged
at once. Write-through and write-behind, over Postgres (the scripts do not depend on the
cold backend)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import Checkpoint, empty_checkpoint
from langgraph.checkpoint.base.id import uuid6

from state.checkpoint import FENCING_TOKEN_KEY, TieredCheckpointSaver
from state.errors import HotStateLost, ParentGone, StaleFencingToken
from state.factory import Backends, open_backends
from state.hot.redis_checkpoints import ENTRY_FORMAT, LOG_KIND, RedisCheckpointCache
from state.hot.redis_client import (
    create_blocking_redis_client,
    create_redis_client,
    hot_key,
    hot_namespace,
)
from state.hot.redis_store import RedisHotStore
from state.hot.redis_write_behind import RedisWriteBehindLog
from state.ports import StoredBlob, StoredCheckpoint
from state.settings import Settings, WriteMode
from tests.support.records import unique_thread, workflow_record

# Past the limit with room to spare: each write is a field name and a value (20,000 values).
MANY = 10_000


def postgres_redis(stack_env: dict[str, str], mode: WriteMode) -> Settings:
    return Settings.model_validate(
        {
            "state_cold_backend": "postgres",
            "postgres_url": stack_env["POSTGRES_URL"],
            "redis_url": stack_env["REDIS_URL"],
            "state_write_mode": mode,
        }
    )


@pytest.fixture(params=["write-through", "write-behind"])
async def backends(
    request: pytest.FixtureRequest, stack_env: dict[str, str]
) -> AsyncIterator[Backends]:
    opened = await open_backends(postgres_redis(stack_env, WriteMode(request.param)))
    try:
        yield opened
    finally:
        await opened.close()


def checkpoint(number: int) -> Checkpoint:
    made = empty_checkpoint()
    made["id"] = str(uuid6(clock_seq=number))
    return made


def wide_checkpoint() -> Checkpoint:
    """A first step changing thousands of channels, with values too long to stay inline in
    the checkpoint (a field each), one of them large (an epoch: `redis_values`)."""
    step = checkpoint(1)
    step["channel_values"] = {f"c{i}": [i] * 20 for i in range(MANY // 2)} | {"big": "x" * 40_000}
    step["channel_versions"] = dict.fromkeys(step["channel_values"], 1)
    return step


def fenced(config: RunnableConfig, fence: int) -> RunnableConfig:
    return {"configurable": {**config["configurable"], FENCING_TOKEN_KEY: fence}}


async def hot_fields(backends: Backends, config: RunnableConfig) -> list[bytes]:
    """The fields of the thread's cache entry, as Redis holds them."""
    cache = backends.hot_checkpoints
    assert isinstance(cache, RedisCheckpointCache)
    client = create_redis_client(backends.settings)
    try:
        key = cache.key(config["configurable"]["thread_id"], "")
        return cast("list[bytes]", await client.hkeys(key))
    finally:
        await client.aclose()


async def test_a_step_with_thousands_of_writes_is_cached_read_back_and_advanced(
    backends: Backends,
) -> None:
    saver = TieredCheckpointSaver.from_backends(backends)
    thread: RunnableConfig = {
        "configurable": {"thread_id": unique_thread("many"), "checkpoint_ns": ""}
    }
    first = await saver.aput(thread, checkpoint(1), {"step": 1}, {})
    writes: list[tuple[str, Any]] = [(f"ch{i % 7}", i) for i in range(MANY)]
    await saver.aput_writes(first, writes, "task-1")

    loaded = await saver.aget_tuple(first)
    assert loaded is not None
    assert [(channel, value) for _, channel, value in loaded.pending_writes or []] == writes
    held = await hot_fields(backends, first)
    if backends.settings.state_write_mode is WriteMode.WRITE_BEHIND:
        # More than one log entry holds (applied whole, as the cold tier stores a task's
        # writes): in the cold tier already, all of them, the hot copy not trusted.
        stored = await backends.checkpoints.get_writes(
            thread["configurable"]["thread_id"], "", first["configurable"]["checkpoint_id"]
        )
        assert len(stored) == MANY
        assert not any(field.startswith(b"w:") for field in held)
    else:
        # Served by the hot tier: its entry holds them all.
        assert sum(field.startswith(b"w:") for field in held) == MANY

    # The next put moves the entry on: the writes it held go.
    second = await saver.aput(first, checkpoint(2), {"step": 2}, {})
    held = await hot_fields(backends, second)
    assert not any(field.startswith(b"w:") for field in held)
    if backends.settings.state_write_mode is WriteMode.WRITE_THROUGH:
        assert b"id" in held
    latest = await saver.aget_tuple(thread)
    assert latest is not None and latest.config == second and latest.pending_writes == []
    await saver.aflush(thread["configurable"]["thread_id"])
    stored = await backends.checkpoints.get_writes(
        thread["configurable"]["thread_id"], "", first["configurable"]["checkpoint_id"]
    )
    assert [(write.channel, write.idx) for write in stored] == [
        (channel, idx) for idx, (channel, _) in enumerate(writes)
    ]


async def test_a_record_with_thousands_of_sections_is_installed_served_and_dropped(
    stack_env: dict[str, str],
) -> None:
    settings = Settings.model_validate(
        {"cosmos_endpoint": stack_env["COSMOS_ENDPOINT"], "redis_url": stack_env["REDIS_URL"]}
    )
    hot = RedisHotStore(create_redis_client(settings), namespace=hot_namespace(settings))
    raw = create_redis_client(settings)
    thread_id = unique_thread("many")
    record = workflow_record(thread_id, **{f"part{i}": i for i in range(MANY)})
    try:
        assert await hot.install(record, ttl_seconds=60)
        assert await hot.get(thread_id) == record
        await hot.invalidate(thread_id)
        assert await raw.hkeys(hot.key(thread_id)) == []
        assert await hot.install(record, ttl_seconds=60)
        intent = await hot.begin_write(thread_id, bound_ms=60_000, ttl_seconds=60, clear=True)
        assert await raw.hkeys(hot.key(thread_id)) == [f"i:{intent.token}".encode()]
    finally:
        await raw.aclose()
        await hot.close()


async def test_a_step_changing_thousands_of_channels_is_stored_whole(backends: Backends) -> None:
    """Write-through, the hot entry takes it; write-behind, more than one log entry holds
    goes to the cold tier instead, leaving Redis nothing half-written (a large value's
    epoch held for a log entry that is not there would never expire)."""
    saver = TieredCheckpointSaver.from_backends(backends)
    thread_id = unique_thread("many")
    thread: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    step = wide_checkpoint()
    saved = await saver.aput(thread, step, {"step": 1}, step["channel_versions"])
    await saver.aflush(thread_id)

    loaded = await saver.aget_tuple(thread)
    assert loaded is not None and loaded.config == saved
    assert loaded.checkpoint["channel_values"] == step["channel_values"]
    cache = backends.hot_checkpoints
    assert isinstance(cache, RedisCheckpointCache)
    client = create_redis_client(backends.settings)
    try:
        held, _ = cache.epoch_keys(thread_id)
        assert await client.hkeys(held) == []
        if backends.flusher is None:
            assert b"id" in await hot_fields(backends, thread)
    finally:
        await client.aclose()


def test_a_sync_step_changing_thousands_of_channels_goes_to_the_cold_tier_whole(
    stack_env: dict[str, str],
) -> None:
    """The sync API's write-behind put (appended on the caller's thread) does the same."""
    settings = postgres_redis(stack_env, WriteMode.WRITE_BEHIND)
    thread_id = unique_thread("many")
    thread: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    step = wide_checkpoint()
    with TieredCheckpointSaver.open_sync(settings) as saver:
        saved = saver.put(thread, step, {"step": 1}, step["channel_versions"])
        saver.flush(thread_id)
        loaded = saver.get_tuple(thread)
        assert isinstance(saver.cache, RedisCheckpointCache)
        held, _ = saver.cache.epoch_keys(thread_id)
    assert loaded is not None and loaded.config == saved
    assert loaded.checkpoint["channel_values"] == step["channel_values"]
    client = create_blocking_redis_client(settings)
    try:
        assert client.hkeys(held) == []
    finally:
        client.close()


async def test_thousands_of_log_entries_are_acknowledged_at_once(
    stack_env: dict[str, str],
) -> None:
    """As a flusher discarding a thread's backlog after a long cold outage does: every
    entry goes, and the large value the first referred to is no longer held for it."""
    settings = Settings.model_validate(
        {
            "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
            "cosmos_container": f"many-{uuid.uuid4().hex[:8]}",
            "redis_url": stack_env["REDIS_URL"],
        }
    )
    client = create_redis_client(settings)
    cache = RedisCheckpointCache(
        client, namespace=hot_namespace(settings), ttl_seconds=settings.state_hot_ttl_seconds
    )
    log = RedisWriteBehindLog(client, cache)
    thread_id = unique_thread("many")
    put = StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns="",
        checkpoint_id="00000001",
        parent_checkpoint_id=None,
        checkpoint=("json", b"{}"),
        metadata={},
        channel_versions={"big": 1},
    )
    try:
        await log.append_put(put, [StoredBlob("big", 1, ("json", b"x" * 40_000))], fence=None)
        # The entries many steps' writes left (written as their appends write them).
        logged = client.pipeline(transaction=False)
        for _ in range(MANY):
            fields = {"op": "writes", "f": ENTRY_FORMAT, "ns": "", "cid": "00000001", "upsert": 0}
            logged.xadd(hot_key(thread_id, LOG_KIND, namespace=cache.namespace), fields)  # type: ignore[arg-type]
        await logged.execute()
        entries = await log.read(thread_id, count=MANY + 1)
        assert len(entries) == MANY + 1

        assert await log.ack(thread_id, [entry.entry_id for entry in entries]) == 0
        assert not await log.pending(thread_id)
        held, _ = cache.epoch_keys(thread_id)
        assert await client.hkeys(held) == []
    finally:
        await client.aclose()


def test_a_sync_step_with_thousands_of_writes_goes_to_the_cold_tier_whole(
    stack_env: dict[str, str],
) -> None:
    """The sync API's write-behind put_writes (appended on the caller's thread): more than
    one log entry holds, written to the cold tier at once, all of them."""
    settings = postgres_redis(stack_env, WriteMode.WRITE_BEHIND)
    thread_id = unique_thread("many")
    thread: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    writes: list[tuple[str, Any]] = [(f"ch{i % 7}", i) for i in range(MANY)]
    with TieredCheckpointSaver.open_sync(settings) as saver:
        first = saver.put(thread, checkpoint(1), {"step": 1}, {})
        saver.put_writes(first, writes, "task-1")
        stored = asyncio.run_coroutine_threadsafe(
            saver.store.get_writes(thread_id, "", first["configurable"]["checkpoint_id"]),
            saver.loop,
        ).result()
        loaded = saver.get_tuple(first)
    assert len(stored) == MANY
    assert loaded is not None
    assert [(channel, value) for _, channel, value in loaded.pending_writes or []] == writes


async def test_a_write_too_large_for_the_log_is_fenced_as_a_hot_write(
    stack_env: dict[str, str],
) -> None:
    """Redis is up when a write goes to the cold tier for being too large for a log entry:
    it is checked against, and raises, the thread's fence in Redis, as an append is. A stale
    writer's large write is refused, and so is a stale writer's append after a newer
    writer's large write (a thread with no workflow record: only Redis fences it)."""
    settings = Settings.model_validate(
        {
            "state_cold_backend": "postgres",
            "postgres_url": stack_env["POSTGRES_URL"],
            "redis_url": stack_env["REDIS_URL"],
            "state_write_mode": "write-behind",
        }
    )
    opened = await open_backends(settings)
    saver = TieredCheckpointSaver.from_backends(opened)
    thread_id = unique_thread("many")
    writes: list[tuple[str, Any]] = [(f"ch{i % 7}", i) for i in range(MANY)]

    try:
        thread: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        first = await saver.aput(fenced(thread, 9), checkpoint(1), {"step": 1}, {})
        wide = wide_checkpoint()
        with pytest.raises(StaleFencingToken):
            await saver.aput_writes(fenced(first, 5), writes, "stale-task")
        with pytest.raises(StaleFencingToken):
            await saver.aput(fenced(first, 5), wide, {"step": 2}, wide["channel_versions"])
        cid = first["configurable"]["checkpoint_id"]
        assert await opened.checkpoints.get_writes(thread_id, "", cid) == []
        assert await opened.checkpoints.get_checkpoint(thread_id, "", wide["id"]) is None

        await saver.aput_writes(fenced(first, 12), writes, "task-1")
        with pytest.raises(StaleFencingToken):
            await saver.aput(fenced(first, 9), checkpoint(2), {"step": 2}, {})
        second = await saver.aput(fenced(first, 15), wide, {"step": 2}, wide["channel_versions"])
        with pytest.raises(StaleFencingToken):
            await saver.aput_writes(fenced(second, 12), [("ch0", 1)], "stale-task")
        await saver.aflush(thread_id)
    finally:
        await opened.close()


def test_a_sync_write_too_large_for_the_log_is_fenced_as_a_hot_write(
    stack_env: dict[str, str],
) -> None:
    """The sync API's appends (made on the caller's thread) do the same."""
    settings = Settings.model_validate(
        {
            "state_cold_backend": "postgres",
            "postgres_url": stack_env["POSTGRES_URL"],
            "redis_url": stack_env["REDIS_URL"],
            "state_write_mode": "write-behind",
        }
    )
    thread_id = unique_thread("many")
    thread: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    writes: list[tuple[str, Any]] = [(f"ch{i % 7}", i) for i in range(MANY)]
    with TieredCheckpointSaver.open_sync(settings) as saver:
        first = saver.put(fenced(thread, 9), checkpoint(1), {"step": 1}, {})
        wide = wide_checkpoint()
        with pytest.raises(StaleFencingToken):
            saver.put_writes(fenced(first, 5), writes, "stale-task")
        with pytest.raises(StaleFencingToken):
            saver.put(fenced(first, 5), wide, {"step": 2}, wide["channel_versions"])
        stored = asyncio.run_coroutine_threadsafe(
            saver.store.get_writes(thread_id, "", first["configurable"]["checkpoint_id"]),
            saver.loop,
        ).result()
        assert stored == []

        saver.put_writes(fenced(first, 12), writes, "task-1")
        with pytest.raises(StaleFencingToken):
            saver.put(fenced(first, 9), checkpoint(2), {"step": 2}, {})
        second = saver.put(fenced(first, 15), wide, {"step": 2}, wide["channel_versions"])
        with pytest.raises(StaleFencingToken):
            saver.put_writes(fenced(second, 12), [("ch0", 1)], "stale-task")
        saver.flush(thread_id)


async def test_another_process_reads_a_write_too_large_for_the_log_at_once(
    stack_env: dict[str, str],
) -> None:
    """Redis answering, the hot copy a too large write leaves behind (the parent as the
    latest, the checkpoint without those writes) is dropped before the write returns, not
    served to another process until this one's drop of suspect entries comes round."""
    settings = Settings.model_validate(
        {
            "state_cold_backend": "postgres",
            "postgres_url": stack_env["POSTGRES_URL"],
            "redis_url": stack_env["REDIS_URL"],
            "state_write_mode": "write-behind",
        }
    )
    writing, reading = await open_backends(settings), await open_backends(settings)
    writer = TieredCheckpointSaver.from_backends(writing)
    reader = TieredCheckpointSaver.from_backends(reading)
    writes: list[tuple[str, Any]] = [(f"ch{i % 7}", i) for i in range(MANY)]

    async def cached_first_step() -> RunnableConfig:
        thread: RunnableConfig = {
            "configurable": {"thread_id": unique_thread("many"), "checkpoint_ns": ""}
        }
        first = await writer.aput(thread, checkpoint(1), {"step": 1}, {})
        cached = await reader.aget_tuple(thread)
        assert cached is not None and cached.config == first  # the hot copy's latest
        return first

    try:
        first = await cached_first_step()
        wide = wide_checkpoint()
        second = await writer.aput(first, wide, {"step": 2}, wide["channel_versions"])
        thread_id = first["configurable"]["thread_id"]
        latest = await reader.aget_tuple({"configurable": {"thread_id": thread_id}})
        assert latest is not None and latest.config == second
        assert latest.checkpoint["channel_values"] == wide["channel_values"]
        await writer.aflush(thread_id)

        first = await cached_first_step()
        await writer.aput_writes(first, writes, "task-1")
        loaded = await reader.aget_tuple(first)
        assert loaded is not None and len(loaded.pending_writes or []) == MANY
        await writer.aflush(first["configurable"]["thread_id"])
    finally:
        await writing.close()
        await reading.close()


@pytest.mark.parametrize("deletion", ["delete_thread", "delete_for_runs"])
async def test_a_step_too_large_for_the_log_on_a_deleted_parent_is_refused(
    backends: Backends, deletion: str
) -> None:
    """Write-behind, a step more than one log entry holds goes to the cold tier instead. On a
    parent deleted since (the thread, or the run), it was stored there all the same (vouched,
    as if its parent were in the log alone): the deleted thread came back as that step, on a
    parent it no longer has. Refused as an append on that parent is; on a parent the log
    alone holds, stored as before."""
    saver = TieredCheckpointSaver.from_backends(backends)
    thread_id = unique_thread("many-deleted")
    thread: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    # The parent in the log alone (not flushed): the step is stored, the thread goes on.
    root = await saver.aput(thread, checkpoint(0), {"step": 0, "run_id": "run-1"}, {})
    step = wide_checkpoint()
    saved = await saver.aput(root, step, {"step": 1, "run_id": "run-1"}, step["channel_versions"])
    await saver.aflush(thread_id)
    loaded = await TieredCheckpointSaver(saver.store).aget_tuple(thread)
    assert loaded is not None and loaded.config == saved
    assert loaded.parent_config == root

    if deletion == "delete_thread":
        await saver.adelete_thread(thread_id)
    else:
        await saver.adelete_for_runs(["run-1"])
    late = wide_checkpoint()
    with pytest.raises((ParentGone, HotStateLost)):
        await saver.aput(saved, late, {"step": 2, "run_id": "run-1"}, late["channel_versions"])
    for reader in (saver, TieredCheckpointSaver(saver.store)):
        assert await reader.aget_tuple(thread) is None


async def test_a_step_too_large_for_the_log_goes_on_from_a_step_the_log_alone_holds(
    stack_env: dict[str, str],
) -> None:
    """Write-behind, a step too large for the log goes on from its parent. A parent the log
    holds but the cache entry does not show as its head (the entry dropped by the previous
    step too large for the log, which the step after it could only mark; or evicted) is no
    loss: an append on it passes, as the log holds it. Refused by the cold tier (the parent
    not flushed yet), the step too large was taken for a loss of the parent (`HotStateLost`,
    the thread marked lost) though the log held it."""
    backends = await open_backends(postgres_redis(stack_env, WriteMode.WRITE_BEHIND))
    try:
        await steps_too_large_on_a_parent_the_log_alone_holds(backends)
    finally:
        await backends.close()


async def steps_too_large_on_a_parent_the_log_alone_holds(backends: Backends) -> None:
    assert backends.flusher is not None
    await backends.flusher.stop()  # the steps stay in the log alone until flushed below
    saver = TieredCheckpointSaver.from_backends(backends)
    thread_id = unique_thread("many-logged")
    thread: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    root = await saver.aput(thread, checkpoint(0), {"step": 0}, {})
    wide = wide_checkpoint()
    first_wide = await saver.aput(root, wide, {"step": 1}, wide["channel_versions"])
    # On a parent stored cold and no longer cached: in the log, not the cache entry's head.
    narrow = await saver.aput(first_wide, checkpoint(2), {"step": 2}, {})
    assert backends.hot_checkpoints is not None
    cached = await backends.hot_checkpoints.lookup(thread_id, "", lease=False)
    assert cached.checkpoint is None
    assert (
        await saver.store.get_checkpoint(
            thread_id, "", narrow["configurable"]["checkpoint_id"], with_history=False
        )
        is None
    )

    wide = wide_checkpoint()
    saved = await saver.aput(narrow, wide, {"step": 3}, wide["channel_versions"])
    await saver.aflush(thread_id)
    loaded = await TieredCheckpointSaver(saver.store).aget_tuple(thread)
    assert loaded is not None and loaded.config == saved
    assert loaded.parent_config == narrow
