"""The delta history the Redis checkpoint cache keeps for the latest checkpoint, on a real
Redis: carried forward by each put, joined by the parent's writes that land late, dropped
(never wrong) when a put or a write does not fit it; and the saver's sync API over it."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from state.checkpoint import TieredCheckpointSaver
from state.hot.redis_checkpoints import RedisCheckpointCache
from state.hot.redis_client import create_redis_client, hot_namespace
from state.ports import ChannelHistory, StoredBlob, StoredCheckpoint, StoredWrite
from state.settings import Settings
from tests.integration.delta_graph import delta_graph, settings_for, thread_config

CHANNEL = "messages"


@pytest.fixture
async def cache(stack_env: dict[str, str]) -> AsyncIterator[RedisCheckpointCache]:
    settings = settings_for(stack_env, "postgres", True, "write-through")
    client = create_redis_client(settings)
    try:
        yield RedisCheckpointCache(
            client, namespace=hot_namespace(settings), ttl_seconds=settings.state_hot_ttl_seconds
        )
    finally:
        await client.aclose()


def checkpoint(thread_id: str, n: int, parent: int | None, **counted: int) -> StoredCheckpoint:
    return StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns="",
        checkpoint_id=f"cp-{n:04}",
        parent_checkpoint_id=None if parent is None else f"cp-{parent:04}",
        checkpoint=("json", b"{}"),
        metadata={"counters_since_delta_snapshot": {CHANNEL: [counted.get("updates", 1), 1]}},
        channel_versions={CHANNEL: f"v{n:04}"},
    )


def write(n: int, idx: int = 0) -> StoredWrite:
    return StoredWrite(f"task-{n}", "~", idx, CHANNEL, ("json", json.dumps([n, idx]).encode()))


async def tracked(
    cache: RedisCheckpointCache, thread_id: str, checkpoint_id: str
) -> dict[str, ChannelHistory] | None:
    return (await cache.history(thread_id, "", checkpoint_id, [CHANNEL])).history


async def track(
    cache: RedisCheckpointCache,
    thread_id: str,
    checkpoint_id: str,
    history: dict[str, ChannelHistory] | None = None,
) -> None:
    """What a reader does on a history miss: take the lease, read the cold tier, fill."""
    lease = (await cache.history(thread_id, "", checkpoint_id, [CHANNEL])).lease
    assert lease is not None
    await cache.fill_history(
        thread_id, "", checkpoint_id, history or {CHANNEL: ChannelHistory([])}, lease
    )


def values(history: dict[str, ChannelHistory] | None) -> list[tuple[str, list[int]]]:
    assert history is not None
    return sorted((cid, json.loads(w.value[1])) for cid, w in history[CHANNEL].writes)


async def test_puts_carry_the_history_and_snapshots_reset_it(cache: RedisCheckpointCache) -> None:
    thread_id = f"dc-{uuid.uuid4().hex[:8]}"
    root = checkpoint(thread_id, 0, None)
    lease = (await cache.lookup(thread_id, "", lease=True)).lease
    assert lease is not None
    await cache.fill(root, lease)
    await track(cache, thread_id, root.checkpoint_id)
    await cache.add_writes(thread_id, "", "cp-0000", [write(0)], upsert=False)
    await cache.advance(checkpoint(thread_id, 1, 0), [])
    await cache.add_writes(thread_id, "", "cp-0001", [write(1)], upsert=False)
    await cache.advance(checkpoint(thread_id, 2, 1), [])
    found = await tracked(cache, thread_id, "cp-0002")
    assert values(found) == [("cp-0000", [0, 0]), ("cp-0001", [1, 0])]
    assert found is not None and found[CHANNEL].seed is None

    # cp-0002 stores the channel's value (a snapshot): its child's history starts there.
    await cache.add_writes(thread_id, "", "cp-0002", [write(2)], upsert=False)
    snapshot = ("json", b'"snapshot"')
    await cache.advance(checkpoint(thread_id, 3, 2), [StoredBlob(CHANNEL, "v0003", snapshot)])
    found = await tracked(cache, thread_id, "cp-0003")
    assert values(found) == [("cp-0000", [0, 0]), ("cp-0001", [1, 0]), ("cp-0002", [2, 0])]
    await cache.add_writes(thread_id, "", "cp-0003", [write(3)], upsert=False)
    await cache.advance(checkpoint(thread_id, 4, 3), [])
    found = await tracked(cache, thread_id, "cp-0004")
    assert found is not None
    assert found[CHANNEL].seed == snapshot and found[CHANNEL].seed_at == "cp-0003"
    assert values(found) == [("cp-0003", [3, 0])]
    # The lookup of the latest brings the same history along.
    looked = await cache.lookup(thread_id, "", lease=False)
    assert looked.checkpoint is not None and looked.history == found
    # Unless the reader has it at hand: then the checkpoint alone, the same.
    alone = await cache.lookup(thread_id, "", lease=False, with_history=False)
    assert alone.checkpoint == looked.checkpoint and alone.history is None
    # An older checkpoint, or a channel not tracked, is not the cache's to answer.
    assert await tracked(cache, thread_id, "cp-0003") is None
    assert (await cache.history(thread_id, "", "cp-0004", [CHANNEL, "other"])).history is None


def found(read: Any) -> tuple[str, Any, Any]:
    stored = read if isinstance(read, StoredCheckpoint) else read.checkpoint
    assert stored is not None
    return stored.checkpoint_id, stored.checkpoint, stored.channel_versions


async def test_an_entry_without_history_is_read_whole_until_it_gains_one(
    cache: RedisCheckpointCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that needs no history reads an entry it saw without one with a plain
    HGETALL, not through the script that leaves the history out; once the entry has a
    history it is read through the script again, and every read finds the same checkpoint."""
    thread_id = f"dc-{uuid.uuid4().hex[:8]}"
    filtered: list[str] = []
    script = cache._script

    async def counted(called: Any, keys: list[str], args: list[Any]) -> Any:
        if called is cache._without_history:
            filtered.append(keys[0])
        return await script(called, keys, args)

    monkeypatch.setattr(cache, "_script", counted)
    root = checkpoint(thread_id, 0, None)
    lease = (await cache.lookup(thread_id, "", lease=True)).lease
    assert lease is not None
    await cache.fill(root, lease)
    filtered.clear()  # the lookup that missed
    reads = [await cache.lookup(thread_id, "", lease=False, with_history=False) for _ in range(3)]
    assert len(filtered) == 0  # the miss showed no history already
    assert [found(read) for read in reads] == [found(root)] * 3 and reads[0].history is None

    await track(cache, thread_id, root.checkpoint_id)
    await cache.add_writes(thread_id, "", "cp-0000", [write(0)], upsert=False)
    child = checkpoint(thread_id, 1, 0)
    await cache.advance(child, [])
    reads = [await cache.lookup(thread_id, "", lease=False, with_history=False) for _ in range(3)]
    # The first sees the history whole (and ignores it), the others leave it out.
    assert len(filtered) == 2
    assert [found(read) for read in reads] == [found(child)] * 3
    assert all(read.history is None for read in reads)
    assert values(await tracked(cache, thread_id, "cp-0001")) == [("cp-0000", [0, 0])]


async def test_late_parent_writes_join_and_anything_else_drops_it(
    cache: RedisCheckpointCache,
) -> None:
    thread_id = f"dc-{uuid.uuid4().hex[:8]}"
    lease = (await cache.lookup(thread_id, "", lease=True)).lease
    assert lease is not None
    await cache.fill(checkpoint(thread_id, 0, None), lease)
    await track(cache, thread_id, "cp-0000")
    await cache.advance(checkpoint(thread_id, 1, 0), [])
    await cache.advance(checkpoint(thread_id, 2, 1), [])
    # The parent's writes land after its child's put (LangGraph overlaps the two).
    await cache.add_writes(thread_id, "", "cp-0001", [write(1)], upsert=False)
    assert values(await tracked(cache, thread_id, "cp-0002")) == [("cp-0001", [1, 0])]
    # A write older than the parent: the history cannot say what it misses, so it goes.
    await cache.add_writes(thread_id, "", "cp-0000", [write(0)], upsert=False)
    assert await tracked(cache, thread_id, "cp-0002") is None
    looked = await cache.lookup(thread_id, "", lease=False)
    assert looked.checkpoint is not None and looked.history is None

    # A fork (a put whose parent is not the cached latest) drops the entry, history too.
    await track(cache, thread_id, "cp-0002")
    assert await tracked(cache, thread_id, "cp-0002") is not None
    await cache.advance(checkpoint(thread_id, 5, 1), [])
    assert (await cache.lookup(thread_id, "", lease=False)).checkpoint is None


async def test_a_history_read_before_an_ancestor_write_landed_is_never_tracked(
    cache: RedisCheckpointCache,
) -> None:
    """A reader misses the history, reads the cold tier, and fills: a write to an ancestor
    that lands between the read and the fill is not in what it read, so the fill must not
    be tracked (the next put would carry the gap forward); a fill that comes with the
    checkpoint itself is tracked at once, so the late write joins it."""
    thread_id = f"dc-{uuid.uuid4().hex[:8]}"
    lease = (await cache.lookup(thread_id, "", lease=True)).lease
    assert lease is not None
    await cache.fill(checkpoint(thread_id, 0, None), lease)
    await cache.advance(checkpoint(thread_id, 1, 0), [])
    await cache.advance(checkpoint(thread_id, 2, 1), [])
    missed = await cache.history(thread_id, "", "cp-0002", [CHANNEL])
    assert missed.history is None and missed.lease is not None
    read_before = {CHANNEL: ChannelHistory([])}  # the cold read, without the write below
    await cache.add_writes(thread_id, "", "cp-0001", [write(1)], upsert=False)
    await cache.fill_history(thread_id, "", "cp-0002", read_before, missed.lease)
    assert await tracked(cache, thread_id, "cp-0002") is None
    # A reader whose lease no write revoked fills it.
    await track(cache, thread_id, "cp-0002", {CHANNEL: ChannelHistory([("cp-0001", write(1))])})
    assert values(await tracked(cache, thread_id, "cp-0002")) == [("cp-0001", [1, 0])]

    # Filled with the checkpoint (a get_tuple miss): tracked in the same step.
    other = f"dc-{uuid.uuid4().hex[:8]}"
    lease = (await cache.lookup(other, "", lease=True)).lease
    assert lease is not None
    latest = checkpoint(other, 2, 1)
    await cache.fill(
        dataclasses.replace(latest, history={CHANNEL: ChannelHistory([("cp-0000", write(0))])}),
        lease,
    )
    await cache.add_writes(other, "", "cp-0001", [write(1)], upsert=False)
    assert values(await tracked(cache, other, "cp-0002")) == [
        ("cp-0000", [0, 0]),
        ("cp-0001", [1, 0]),
    ]


def test_sync_api_rebuilds_like_in_memory_saver(stack_env: dict[str, str]) -> None:
    for redis in (False, True):
        settings: Settings = settings_for(stack_env, "postgres", redis, "write-through")
        reference = delta_graph(InMemorySaver(), snapshot_frequency=3)
        ref_cfg = thread_config("ref")
        with TieredCheckpointSaver.open_sync(settings) as saver:
            graph = delta_graph(saver, snapshot_frequency=3)
            cfg = thread_config("sync")
            for n in range(8):
                got = graph.invoke({"messages": [f"user {n}"]}, cfg)
                assert got == reference.invoke({"messages": [f"user {n}"]}, ref_cfg)
            assert graph.get_state(cfg).values == reference.get_state(ref_cfg).values
