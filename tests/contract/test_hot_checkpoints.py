"""The `CheckpointCache` and `WriteBehindLog` contracts on a real redis-server and on the
in-memory fakes: the cache only moves forward, keeps early writes for their checkpoint and
fills only under an unrevoked lease; the log keeps a thread's work in order until it is
acknowledged, fences stale writers, lists dirty threads and locks a thread for one flusher.

Each store gets a namespace of its own (a cold store identity no other test uses), so
the dirty listing holds this test's threads only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from langgraph.checkpoint.base.id import uuid6

from state.errors import StaleFencingToken, UnknownParent
from state.hot.redis_checkpoints import RedisCheckpointCache
from state.hot.redis_client import create_redis_client, hot_namespace
from state.hot.redis_write_behind import RedisCheckpointFence, RedisWriteBehindLog
from state.ports import (
    CheckpointCache,
    CheckpointFence,
    CheckpointPut,
    StoredBlob,
    StoredCheckpoint,
    StoredWrite,
    WriteBehindLog,
    WritesPut,
)
from state.settings import Settings
from tests.support.fakes import MEMORY, MemoryHotTier
from tests.support.records import unique_thread


@dataclass
class HotCheckpoints:
    cache: CheckpointCache
    log: WriteBehindLog
    fence: CheckpointFence


@pytest.fixture(params=["redis", MEMORY])
async def hot(request: pytest.FixtureRequest) -> AsyncIterator[HotCheckpoints]:
    if request.param == MEMORY:
        tier = MemoryHotTier()
        yield HotCheckpoints(tier.cache, tier.log, tier.fence)
        return
    stack_env: dict[str, str] = request.getfixturevalue("stack_env")
    settings = Settings.model_validate(
        {
            "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
            "cosmos_container": f"hot-{uuid.uuid4().hex[:8]}",
            "redis_url": stack_env["REDIS_URL"],
        }
    )
    client = create_redis_client(settings)
    cache = RedisCheckpointCache(
        client, namespace=hot_namespace(settings), ttl_seconds=settings.state_hot_ttl_seconds
    )
    yield HotCheckpoints(
        cache, RedisWriteBehindLog(client, cache), RedisCheckpointFence(client, cache)
    )
    await client.aclose()


def checkpoint(thread_id: str, n: int, *, ns: str = "") -> StoredCheckpoint:
    """Checkpoint `n` of a thread (ids order as LangGraph's do), child of `n - 1`."""
    return StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns=ns,
        checkpoint_id=f"{n:08}",
        parent_checkpoint_id=f"{n - 1:08}" if n > 1 else None,
        checkpoint=("json", b'{"n": %d}' % n),
        metadata={"step": n},
        channel_versions={"chat": n, "notes": 1},
    )


def blob(channel: str, version: int) -> StoredBlob:
    return StoredBlob(channel, version, ("json", f"{channel}@{version}".encode()))


def write(task_id: str, value: str, idx: int = 0) -> StoredWrite:
    return StoredWrite(task_id, "", idx, "chat", ("json", value.encode()))


# --------------------------------------------------------------------------- cache


async def test_the_cache_moves_forward_by_deltas_and_never_back(hot: HotCheckpoints) -> None:
    thread = unique_thread("cpc")
    await hot.cache.advance(checkpoint(thread, 1), [blob("chat", 1), blob("notes", 1)])
    await hot.cache.advance(checkpoint(thread, 2), [blob("chat", 2)])  # `notes` unchanged
    found = (await hot.cache.lookup(thread, "", lease=False)).checkpoint
    assert found is not None and found.checkpoint_id == checkpoint(thread, 2).checkpoint_id
    assert found.blobs == {"chat": blob("chat", 2).value, "notes": blob("notes", 1).value}
    assert (found.metadata, found.channel_versions) == ({"step": 2}, {"chat": 2, "notes": 1})

    await hot.cache.advance(checkpoint(thread, 1), [blob("chat", 1)])  # late, older
    again = (await hot.cache.lookup(thread, "", lease=False)).checkpoint
    assert again is not None and again.checkpoint_id == found.checkpoint_id


async def test_a_put_whose_parent_is_not_cached_drops_the_entry(hot: HotCheckpoints) -> None:
    thread = unique_thread("cpc")
    await hot.cache.advance(checkpoint(thread, 1), [blob("chat", 1), blob("notes", 1)])
    await hot.cache.advance(checkpoint(thread, 3), [blob("chat", 3)])  # 2 never arrived
    assert (await hot.cache.lookup(thread, "", lease=False)).checkpoint is None


async def test_a_late_root_put_on_a_dropped_entry_is_not_cached_as_the_latest(
    hot: HotCheckpoints,
) -> None:
    """Concurrent first runs on a new thread each put a root (no parent). A root landing
    late on an entry a fork dropped, older than a checkpoint the thread already has, is not
    its latest: the entry stays empty (a reader fills it from the cold tier)."""
    thread = unique_thread("cpc")
    late_root = dataclasses.replace(checkpoint(thread, 1), checkpoint_id="00000001")
    first_root = dataclasses.replace(checkpoint(thread, 2), parent_checkpoint_id=None)
    step = dataclasses.replace(checkpoint(thread, 3), parent_checkpoint_id="00000002")
    other_root = dataclasses.replace(checkpoint(thread, 4), parent_checkpoint_id=None)
    await hot.cache.advance(first_root, [blob("chat", 2), blob("notes", 1)])
    await hot.cache.advance(step, [blob("chat", 3)])
    await hot.cache.advance(other_root, [blob("chat", 4), blob("notes", 1)])  # a fork: dropped
    await hot.cache.advance(late_root, [blob("chat", 1), blob("notes", 1)])
    assert (await hot.cache.lookup(thread, "", lease=False)).checkpoint is None
    # A root newer than all the entry saw is the thread's newest checkpoint: cached.
    newest_root = dataclasses.replace(checkpoint(thread, 5), parent_checkpoint_id=None)
    await hot.cache.advance(newest_root, [blob("chat", 5), blob("notes", 1)])
    found = (await hot.cache.lookup(thread, "", lease=False)).checkpoint
    assert found is not None and found.checkpoint_id == newest_root.checkpoint_id


async def test_pending_writes_are_kept_exact_and_early_ones_wait_for_their_checkpoint(
    hot: HotCheckpoints,
) -> None:
    thread = unique_thread("cpc")
    first, second = checkpoint(thread, 1), checkpoint(thread, 2)
    await hot.cache.advance(first, [blob("chat", 1), blob("notes", 1)])
    cid = first.checkpoint_id
    await hot.cache.add_writes(thread, "", cid, [write("a", "first")], upsert=False)
    await hot.cache.add_writes(thread, "", cid, [write("a", "retried")], upsert=False)
    await hot.cache.add_writes(thread, "", cid, [write("b", "one")], upsert=True)
    await hot.cache.add_writes(thread, "", cid, [write("b", "two")], upsert=True)
    found = (await hot.cache.lookup(thread, "", lease=False)).checkpoint
    assert found is not None and found.writes == [write("a", "first"), write("b", "two")]

    # The next step's writes, saved before its checkpoint (LangGraph overlaps the two).
    await hot.cache.add_writes(
        thread, "", second.checkpoint_id, [write("c", "early")], upsert=False
    )
    await hot.cache.advance(second, [blob("chat", 2)])
    found = (await hot.cache.lookup(thread, "", lease=False)).checkpoint
    assert found is not None and found.writes == [write("c", "early")]


@pytest.mark.parametrize("upsert", [False, True], ids=["insert", "upsert"])
async def test_a_write_named_twice_in_one_call_keeps_the_first_or_with_upsert_the_last(
    hot: HotCheckpoints, upsert: bool
) -> None:
    """As across calls, for the cached checkpoint's writes and for early ones, whether the
    two fall in one batch of Redis's (1000 writes) or in two."""
    thread = unique_thread("cpc")
    first, second = checkpoint(thread, 1), checkpoint(thread, 2)
    await hot.cache.advance(first, [blob("chat", 1), blob("notes", 1)])
    writes = [write("t", f"a{idx}", idx) for idx in range(999)]
    writes.insert(10, write("t", "b3", 3))  # the same batch: writes[:1000]
    writes += [write("t", "b5", 5), write("t", "c999", 999), write("t", "d999", 999)]
    expected = {idx: f"a{idx}" for idx in range(999)} | {999: "c999"}
    if upsert:
        expected |= {3: "b3", 5: "b5", 999: "d999"}
    for cid, move in ((first.checkpoint_id, None), (second.checkpoint_id, second)):
        await hot.cache.add_writes(thread, "", cid, writes, upsert=upsert)
        if move is not None:  # early writes, kept until their checkpoint's put
            await hot.cache.advance(move, [blob("chat", 2)])
        found = (await hot.cache.lookup(thread, "", lease=False)).checkpoint
        assert found is not None and found.checkpoint_id == cid
        assert {w.idx: w.value[1].decode() for w in found.writes} == expected


async def test_a_fill_installs_under_its_lease_and_a_write_meanwhile_revokes_it(
    hot: HotCheckpoints,
) -> None:
    thread, other = unique_thread("cpc"), unique_thread("cpc")
    filled = StoredCheckpoint(
        **{**checkpoint(thread, 1).__dict__, "blobs": {"chat": ("json", b"1")}, "writes": []}
    )
    miss = await hot.cache.lookup(thread, "", lease=True)
    assert miss.checkpoint is None and miss.lease is not None
    await hot.cache.fill(filled, miss.lease)
    assert (await hot.cache.lookup(thread, "", lease=True)).checkpoint == filled

    revoked = await hot.cache.lookup(other, "", lease=True)
    assert revoked.lease is not None
    await hot.cache.add_writes(
        other, "", checkpoint(other, 2).checkpoint_id, [write("a", "x")], upsert=False
    )
    await hot.cache.fill(checkpoint(other, 1), revoked.lease)  # what it read before
    assert (await hot.cache.lookup(other, "", lease=False)).checkpoint is None


async def test_invalidating_a_thread_drops_every_namespace(hot: HotCheckpoints) -> None:
    thread = unique_thread("cpc")
    for ns in ("", "child"):
        await hot.cache.advance(checkpoint(thread, 1, ns=ns), [blob("chat", 1)])
    await hot.cache.invalidate(thread, "child")
    assert (await hot.cache.lookup(thread, "child", lease=False)).checkpoint is None
    assert (await hot.cache.lookup(thread, "", lease=False)).checkpoint is not None
    await hot.cache.invalidate(thread)
    assert (await hot.cache.lookup(thread, "", lease=False)).checkpoint is None


async def test_a_fill_no_newer_than_a_deletions_fence_is_refused_until_that_deletion_lifts_it(
    hot: HotCheckpoints,
) -> None:
    """A whole thread's deletion fences off fills of checkpoints no newer than its drop
    before the cold delete; only its own drop after lifts the fence (a second deletion
    under way keeps its own), and a fill of a newer checkpoint is not refused."""
    thread = unique_thread("cpc")

    async def filled(n: int) -> bool:
        miss = await hot.cache.lookup(thread, "", lease=True)
        assert miss.lease is not None
        await hot.cache.fill(checkpoint(thread, n), miss.lease)
        found = (await hot.cache.lookup(thread, "", lease=False)).checkpoint
        await hot.cache.invalidate(thread)  # a plain drop: no fence set or lifted
        return found is not None and found.checkpoint_id == checkpoint(thread, n).checkpoint_id

    first, second = "00000005", "00000006"
    await hot.cache.invalidate(thread, strict=True, deleted_at=first, fence_fills=True)
    assert not await filled(3)
    await hot.cache.invalidate(thread, strict=True, deleted_at=second, fence_fills=True)
    await hot.cache.invalidate(thread, strict=True, deleted_at="00000007", lift_fence=first)
    assert not await filled(6)  # the second deletion's fence holds
    assert await filled(8)  # newer than the fence
    await hot.cache.invalidate(thread, strict=True, deleted_at="00000009", lift_fence=second)
    assert await filled(3)


# --------------------------------------------------------------------------- write-behind log


async def test_appends_wait_in_order_until_acknowledged_and_move_the_cache(
    hot: HotCheckpoints,
) -> None:
    thread = unique_thread("wbl")
    assert not await hot.log.pending(thread)
    put = CheckpointPut(checkpoint(thread, 1), [blob("chat", 1), blob("notes", 1)])
    writes = WritesPut(thread, "", put.checkpoint.checkpoint_id, [write("a", "w")], False)
    await hot.log.append_put(put.checkpoint, put.blobs, fence=None)
    await hot.log.append_writes(thread, "", writes.checkpoint_id, writes.writes, upsert=False, fence=None)  # fmt: skip

    cached = (await hot.cache.lookup(thread, "", lease=False)).checkpoint
    assert cached is not None and cached.writes == [write("a", "w")]
    assert await hot.log.pending(thread)
    entries = await hot.log.read(thread, count=10)
    assert [entry.op for entry in entries] == [put, writes]
    assert [entry.op for entry in await hot.log.read(thread, count=1)] == [put]
    assert (await hot.log.backlog()).entries == 2

    assert await hot.log.ack(thread, [entries[0].entry_id]) == 1
    assert [entry.op for entry in await hot.log.read(thread, count=10)] == [writes]
    assert await hot.log.ack(thread, [entries[1].entry_id]) == 0
    assert not await hot.log.pending(thread)
    assert (await hot.log.backlog()).entries == 0


async def test_a_stale_fence_is_refused_and_appends_nothing(hot: HotCheckpoints) -> None:
    thread = unique_thread("wbl")
    await hot.log.append_put(checkpoint(thread, 1), [blob("chat", 1)], fence=7, fence_checked=True)
    with pytest.raises(StaleFencingToken) as stale:
        await hot.log.append_put(checkpoint(thread, 2), [blob("chat", 2)], fence=6)
    assert (stale.value.presented, stale.value.highest) == (6, 7)
    with pytest.raises(StaleFencingToken):
        await hot.log.append_writes(
            thread,
            "",
            checkpoint(thread, 1).checkpoint_id,
            [write("a", "x")],
            upsert=False,
            fence=3,
        )
    with pytest.raises(StaleFencingToken):
        await hot.fence.admit(thread, 6)  # write-through writes check the same fence
    assert len(await hot.log.read(thread, count=10)) == 1
    await hot.fence.admit(thread, 9)
    with pytest.raises(StaleFencingToken):
        await hot.log.append_put(checkpoint(thread, 2), [blob("chat", 2)], fence=8)
    await hot.log.append_put(checkpoint(thread, 2), [blob("chat", 2)], fence=None)
    assert len(await hot.log.read(thread, count=10)) == 2


async def test_a_put_whose_parent_the_hot_tier_has_no_trace_of_is_refused_unless_stored(
    hot: HotCheckpoints,
) -> None:
    """A parent neither cached as the head nor in the log: a fork if it is older than the
    cached head (`fork`), a loss the caller checks otherwise (a newer parent, or nothing
    cached); nothing is written either way. A logged parent, or one the caller says is
    stored, is appended."""
    thread = unique_thread("wbl")
    for n in (1, 2, 3):
        await hot.log.append_put(checkpoint(thread, n), [blob("chat", n)], fence=None)
    await hot.log.ack(thread, [entry.entry_id for entry in await hot.log.read(thread, count=10)])

    def child(n: int, parent: int) -> StoredCheckpoint:
        return dataclasses.replace(checkpoint(thread, n), parent_checkpoint_id=f"{parent:08}")

    with pytest.raises(UnknownParent) as fork:
        await hot.log.append_put(child(4, 1), [], fence=None)
    assert fork.value.fork
    with pytest.raises(UnknownParent) as ahead:
        await hot.log.append_put(child(6, 5), [], fence=None)
    assert not ahead.value.fork
    uncached = unique_thread("wbl")
    with pytest.raises(UnknownParent) as nothing_cached:
        await hot.log.append_put(checkpoint(uncached, 2), [], fence=None)
    assert not nothing_cached.value.fork
    assert not await hot.log.pending(thread) and not await hot.log.pending(uncached)
    head = (await hot.cache.lookup(thread, "", lease=False)).checkpoint
    assert head is not None and head.checkpoint_id == f"{3:08}"

    await hot.log.append_put(checkpoint(thread, 4), [], fence=None)
    await hot.log.append_put(checkpoint(thread, 5), [], fence=None)
    await hot.log.append_put(child(6, 4), [], fence=None)  # its parent is in the log
    await hot.log.append_put(child(7, 1), [], fence=None, parent_stored=True)
    logged = [entry.op for entry in await hot.log.read(thread, count=10)]
    assert [op.checkpoint.checkpoint_id for op in logged if isinstance(op, CheckpointPut)] == [
        f"{n:08}" for n in (4, 5, 6, 7)
    ]


async def test_a_discard_marks_the_thread_deleted_after_the_checkpoints_made_before_it(
    hot: HotCheckpoints,
) -> None:
    """A put whose parent the hot tier has no trace of asks whether the thread was deleted
    under it: so for checkpoints (uuid6 ids) made before the discard, not after it, nor of
    another thread, nor an id with no time in it. A fresh put after it is appended."""
    thread, other = unique_thread("wbl"), unique_thread("wbl")
    before = str(uuid6())
    await hot.log.append_put(checkpoint(thread, 1), [], fence=None)
    assert not await hot.log.deleted_since(thread, before)
    await hot.log.discard(thread, refuse_appends_ms=60_000)
    await hot.log.accept_appends(thread)
    after = str(uuid6())
    assert await hot.log.deleted_since(thread, before)
    assert not await hot.log.deleted_since(thread, after)
    assert not await hot.log.deleted_since(other, before)
    assert not await hot.log.deleted_since(thread, f"{1:08}")
    await hot.log.append_put(checkpoint(thread, 1), [], fence=None)
    assert await hot.log.pending(thread)
    assert await hot.log.deleted_since(thread, before)


async def test_dirty_threads_are_listed_oldest_first_and_settled_only_if_unchanged(
    hot: HotCheckpoints,
) -> None:
    older, newer = unique_thread("wbl"), unique_thread("wbl")
    await hot.log.append_put(checkpoint(older, 1), [], fence=None)
    await asyncio.sleep(0.01)  # the listing orders by when a thread became dirty (ms)
    await hot.log.append_put(checkpoint(newer, 1), [], fence=None)
    listed = await hot.log.dirty_threads(limit=10)
    assert [thread for thread, _ in listed] == [older, newer]
    assert [thread for thread, _ in await hot.log.dirty_threads(limit=1)] == [older]
    assert [thread for thread, _ in await hot.log.dirty_threads(limit=10, skip=1)] == [newer]
    assert await hot.log.dirty_threads(limit=10, skip=2) == []
    assert (await hot.log.backlog()).threads == 2
    marker = dict(listed)[older]
    assert await hot.log.marker(older) == marker

    await hot.log.append_put(checkpoint(older, 2), [], fence=None)  # arrives meanwhile
    assert not await hot.log.settle(older, marker)
    assert await hot.log.settle(older, await hot.log.marker(older) or 0)
    assert await hot.log.marker(older) is None
    assert [thread for thread, _ in await hot.log.dirty_threads(limit=10)] == [newer]
    await hot.log.mark_dirty(older)
    assert {thread for thread, _ in await hot.log.dirty_threads(limit=10)} == {older, newer}

    await hot.log.discard(older)
    assert not await hot.log.pending(older)
    assert [thread for thread, _ in await hot.log.dirty_threads(limit=10)] == [newer]


async def test_one_flusher_at_a_time_holds_a_thread(hot: HotCheckpoints) -> None:
    thread = unique_thread("wbl")
    # Renewed at half its TTL: a loaded machine may run a renewal a few hundred ms late
    # (at 200 ms renewed every 100 ms, that lost the lock).
    ttl_ms = 1_000
    token = await hot.log.lock_thread(thread, ttl_ms=ttl_ms)
    assert token is not None
    assert await hot.log.lock_thread(thread, ttl_ms=ttl_ms) is None
    assert not await hot.log.renew_thread_lock(thread, "not-the-owner", ttl_ms=ttl_ms)
    await hot.log.unlock_thread(thread, "not-the-owner")
    assert await hot.log.lock_thread(thread, ttl_ms=ttl_ms) is None  # still held
    for _ in range(3):
        await asyncio.sleep(0.5)
        assert await hot.log.renew_thread_lock(thread, token, ttl_ms=ttl_ms)
    assert await hot.log.lock_thread(thread, ttl_ms=ttl_ms) is None  # renewed past its TTL
    await hot.log.unlock_thread(thread, token)
    taker = await hot.log.lock_thread(thread, ttl_ms=100)
    assert taker is not None
    await asyncio.sleep(0.25)  # not renewed: it runs out
    assert not await hot.log.renew_thread_lock(thread, taker, ttl_ms=100)
    assert await hot.log.lock_thread(thread, ttl_ms=100) is not None
