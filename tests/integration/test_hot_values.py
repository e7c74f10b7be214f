"""Large values in the hot tier as append-only epochs (`state.hot.redis_values`), on a real
redis-server: a grown value is sent as its tail, reads back whole from the cache and from
the write-behind log, reaches the cold tier, and its epochs leave Redis once nothing
refers to them; a writer whose epoch moved on sends the value whole again.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
import redis as redis_sync
import redis.asyncio as aioredis

from state.errors import BackendUnavailable, HotStateLost, StaleFencingToken, StillWriting
from state.hot import redis_client
from state.hot.redis_checkpoints import (
    CACHED_EPOCHS_KIND,
    HELD_EPOCHS_KIND,
    LOG_KIND,
    RedisCheckpointCache,
)
from state.hot.redis_client import round_trip
from state.hot.redis_values import BY_REFERENCE_BYTES, STAGED_TTL_MS, EpochBytes, Reference
from state.hot.redis_write_behind import DISCARD_ATTEMPTS, REFERENCES_KIND, RedisWriteBehindLog
from state.ports import StoredBlob, StoredCheckpoint, StoredWrite
from tests.chat_graph import chat_graph
from tests.integration.test_write_behind import (
    COLD_BACKENDS,
    WriteBehind,
    config,
    open_write_behind,
    settings_for,
)
from tests.support.stored import checkpoint

LARGE = 4 * BY_REFERENCE_BYTES


@pytest.fixture(params=COLD_BACKENDS)
async def tiers(
    request: pytest.FixtureRequest, stack_env: dict[str, str]
) -> AsyncIterator[WriteBehind]:
    async with open_write_behind(
        settings_for(stack_env, request.param, stack_env["REDIS_URL"])
    ) as opened:
        yield opened


def grown(version: int) -> StoredBlob:
    """Version `version` of a value that grows by one byte pattern per version."""
    body = b"".join(bytes([i]) * 1000 for i in range(version))
    return StoredBlob(
        "chat", version, ("bytes", b"%08d" % version + b"h" * 56 + b"x" * LARGE + body)
    )


def log_of(tiers: WriteBehind) -> RedisWriteBehindLog:
    assert isinstance(tiers.flusher.log, RedisWriteBehindLog)
    return tiers.flusher.log


async def epochs_of(tiers: WriteBehind, thread_id: str) -> list[bytes]:
    return sorted(await tiers.redis.keys(f"{{{thread_id}}}:*:ep:*"))


def thread_key(tiers: WriteBehind, thread_id: str, kind: str) -> str:
    return tiers.cache.thread_key(thread_id, kind)


async def net_input_bytes(tiers: WriteBehind) -> int:
    return int((await tiers.redis.info("stats"))["total_net_input_bytes"])


async def test_a_growing_conversation_is_one_epoch_read_back_whole_and_flushed(
    tiers: WriteBehind,
) -> None:
    graph = chat_graph(tiers.saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    message = "x" * LARGE
    await graph.ainvoke({"messages": [message]}, cfg, durability="async")
    await graph.ainvoke({"messages": [message + "y"]}, cfg, durability="async")

    hot = await tiers.saver.aget_tuple(cfg)
    assert hot is not None
    messages: list[Any] = hot.checkpoint["channel_values"]["messages"]
    assert messages[0] == message and messages[5] == message + "y" and len(messages) == 10
    # Every version of the list (and of the input) appended to the epoch it started:
    # the log refers to two epochs, not one per put.
    held = await tiers.redis.hgetall(thread_key(tiers, thread_id, HELD_EPOCHS_KIND))
    assert len(held) <= 2 and sum(int(count) for count in held.values()) >= 8

    await tiers.saver.aflush(thread_id)
    assert not await tiers.redis.exists(thread_key(tiers, thread_id, HELD_EPOCHS_KIND))
    assert not await tiers.redis.exists(thread_key(tiers, thread_id, REFERENCES_KIND))
    # What stays is what the cache refers to, expiring with it.
    cached = await tiers.redis.hkeys(thread_key(tiers, thread_id, CACHED_EPOCHS_KIND))
    assert sorted(cached) == await epochs_of(tiers, thread_id)
    assert all([await tiers.redis.ttl(epoch) > 3600 for epoch in cached])
    cold = await tiers.store.get_checkpoint(thread_id, "", None)
    assert cold is not None and cold.checkpoint_id == hot.config["configurable"]["checkpoint_id"]
    listed = [item async for item in tiers.saver.alist(cfg, limit=1)]
    assert listed[0].checkpoint["channel_values"]["messages"] == messages


async def test_a_grown_value_sends_its_tail_and_reads_back_whole(tiers: WriteBehind) -> None:
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    log = log_of(tiers)
    await log.append_put(checkpoint(thread_id, 1), [grown(1)], fence=None)
    before = await net_input_bytes(tiers)
    await log.append_put(checkpoint(thread_id, 2), [grown(2)], fence=None)
    assert await net_input_bytes(tiers) - before < LARGE // 4  # the value is ~4x that

    found = (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint
    assert found is not None and found.blobs == {"chat": grown(2).value}
    logged = [entry.op for entry in await log.read(thread_id, count=9)]
    assert [op.blobs for op in logged] == [[grown(1)], [grown(2)]]  # type: ignore[union-attr]
    assert len(await epochs_of(tiers, thread_id)) == 1


async def test_a_writer_whose_epoch_is_gone_sends_the_value_whole(tiers: WriteBehind) -> None:
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    log = log_of(tiers)
    await log.append_put(checkpoint(thread_id, 1), [grown(1)], fence=None)
    await tiers.redis.delete(*await epochs_of(tiers, thread_id))  # as a restart would

    await log.append_put(checkpoint(thread_id, 2), [grown(2)], fence=None)
    found = (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint
    assert found is not None and found.blobs == {"chat": grown(2).value}
    assert await tiers.redis.strlen((await epochs_of(tiers, thread_id))[0]) == len(
        grown(2).value[1]
    )
    # The first entry's epoch was deleted under it: no flusher of this store could apply it.
    await log.discard(thread_id)


async def test_a_refused_put_leaves_no_epoch_behind(tiers: WriteBehind) -> None:
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    log = log_of(tiers)
    await log.append_put(checkpoint(thread_id, 1), [grown(1)], fence=7, fence_checked=True)
    [kept] = await epochs_of(tiers, thread_id)
    with pytest.raises(StaleFencingToken):
        await log.append_put(checkpoint(thread_id, 2), [StoredBlob("chat", 2, ("bytes", b"z" * LARGE))], fence=5)  # fmt: skip
    assert await tiers.redis.strlen(kept) == len(grown(1).value[1])  # not appended to
    refused = [epoch for epoch in await epochs_of(tiers, thread_id) if epoch != kept]
    assert all([0 < await tiers.redis.pttl(epoch) <= STAGED_TTL_MS for epoch in refused])
    held = await tiers.redis.hgetall(thread_key(tiers, thread_id, HELD_EPOCHS_KIND))
    assert held == {kept: b"1"}


async def test_write_through_keeps_only_the_epoch_the_cache_refers_to(tiers: WriteBehind) -> None:
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    await tiers.cache.advance(checkpoint(thread_id, 1), [grown(1)])
    await tiers.cache.advance(checkpoint(thread_id, 2), [grown(2)])
    found = (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint
    assert found is not None and found.blobs == {"chat": grown(2).value}
    [epoch] = await epochs_of(tiers, thread_id)
    assert await tiers.redis.ttl(epoch) > 3600

    small = StoredBlob("chat", 3, ("bytes", b"small"))
    await tiers.cache.advance(checkpoint(thread_id, 3), [small])
    found = (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint
    assert found is not None and found.blobs == {"chat": small.value}
    assert await epochs_of(tiers, thread_id) == []


async def test_an_entry_whose_epoch_is_gone_reads_as_a_miss(
    tiers: WriteBehind, other: tuple[aioredis.Redis, RedisCheckpointCache, RedisWriteBehindLog]
) -> None:
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    await tiers.cache.advance(checkpoint(thread_id, 1), [grown(1)])
    await tiers.redis.delete(*await epochs_of(tiers, thread_id))  # evicted
    _, reader, _ = other
    assert (await reader.lookup(thread_id, "", lease=False)).checkpoint is None


async def test_a_process_reads_the_values_it_wrote_without_fetching_them(
    tiers: WriteBehind, other: tuple[aioredis.Redis, RedisCheckpointCache, RedisWriteBehindLog]
) -> None:
    """An epoch only grows: what this process stored of one is what Redis holds there. A
    value another process grew past it is read from Redis."""
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    await tiers.cache.advance(checkpoint(thread_id, 1), [grown(1)])
    sent = int((await tiers.redis.info("stats"))["total_net_output_bytes"])
    found = (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint
    assert found is not None and found.blobs == {"chat": grown(1).value}
    assert int((await tiers.redis.info("stats"))["total_net_output_bytes"]) - sent < LARGE // 4

    _, taking_over, _ = other
    assert (await taking_over.lookup(thread_id, "", lease=False)).checkpoint is not None
    await taking_over.advance(checkpoint(thread_id, 2), [grown(2)])
    found = (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint
    assert found is not None and found.blobs == {"chat": grown(2).value}


# --------------------------------------------------------------------------- races
# Another process's cache and log on the same Redis, each on a client of its own.


@pytest.fixture
async def other(
    tiers: WriteBehind, stack_env: dict[str, str]
) -> AsyncIterator[tuple[aioredis.Redis, RedisCheckpointCache, RedisWriteBehindLog]]:
    client = aioredis.Redis.from_url(stack_env["REDIS_URL"])
    cache = RedisCheckpointCache(
        client, namespace=tiers.cache.namespace, ttl_seconds=tiers.cache.ttl_seconds
    )
    yield client, cache, RedisWriteBehindLog(client, cache)
    await client.aclose()


def two_channels(thread_id: str, n: int) -> StoredCheckpoint:
    return replace(checkpoint(thread_id, n), channel_versions={"chat": 1, "step": n})


async def test_an_epoch_the_entry_refers_to_expires_with_it(tiers: WriteBehind) -> None:
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    step = StoredBlob("step", 1, ("json", b"1"))
    await tiers.cache.advance(two_channels(thread_id, 1), [grown(1), step])
    [epoch] = await epochs_of(tiers, thread_id)
    cached = thread_key(tiers, thread_id, CACHED_EPOCHS_KIND)
    for key in (epoch, cached):
        await tiers.redis.expire(key, 5)  # as if written long ago
    # Puts that change another channel only keep the large one's epoch as alive as the entry.
    await tiers.cache.advance(two_channels(thread_id, 2), [replace(step, version=2)])
    assert await tiers.redis.ttl(epoch) > 3600 and await tiers.redis.ttl(cached) > 3600


async def test_a_read_racing_a_put_that_releases_its_epoch_reads_again(
    tiers: WriteBehind,
    other: tuple[aioredis.Redis, RedisCheckpointCache, RedisWriteBehindLog],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    _, reader, _ = other
    await tiers.cache.advance(checkpoint(thread_id, 1), [grown(1)])
    rewritten = StoredBlob("chat", 2, ("bytes", b"Z" * LARGE))  # not grown: a new epoch
    raced = False

    async def entry_read_then_put(redis: aioredis.Redis, commands: Any) -> Any:
        nonlocal raced
        replies = await round_trip(redis, commands)
        if not raced and commands[0][0] == "HGETALL":
            raced = True
            await tiers.cache.advance(checkpoint(thread_id, 2), [rewritten])
        return replies

    monkeypatch.setattr(redis_client, "round_trip", entry_read_then_put)
    found = (await reader.lookup(thread_id, "", lease=False)).checkpoint
    assert raced
    assert found is not None and found.blobs == {"chat": rewritten.value}
    assert reader.stats.errors == 0 and await tiers.redis.exists(tiers.cache.key(thread_id, ""))


async def test_an_invalidate_racing_a_put_keeps_the_epoch_the_log_then_refers_to(
    tiers: WriteBehind, other: tuple[aioredis.Redis, RedisCheckpointCache, RedisWriteBehindLog]
) -> None:
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    log = log_of(tiers)
    await log.append_put(checkpoint(thread_id, 1), [grown(1)], fence=None)
    await log.ack(thread_id, [entry.entry_id for entry in await log.read(thread_id, count=9)])
    client, maintenance, _ = other  # only the cache refers to the epoch now
    list_fields = client.hkeys

    async def hkeys(key: str) -> Any:
        listed = await list_fields(key)
        client.hkeys = list_fields  # type: ignore[method-assign]
        # Appends to it (its parent, flushed, no longer cached: the cold tier has it).
        await log.append_put(checkpoint(thread_id, 2), [grown(2)], fence=None, parent_stored=True)
        return listed

    client.hkeys = hkeys  # type: ignore[method-assign]
    await maintenance.invalidate(thread_id)
    logged = [entry.op for entry in await log.read(thread_id, count=9)]
    assert [op.blobs for op in logged] == [[grown(2)]]  # type: ignore[union-attr]


async def test_a_delete_racing_a_put_leaves_no_epoch_behind(
    tiers: WriteBehind, other: tuple[aioredis.Redis, RedisCheckpointCache, RedisWriteBehindLog]
) -> None:
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    log = log_of(tiers)
    await log.append_put(checkpoint(thread_id, 1), [grown(1)], fence=None)
    client, maintenance, deleting = other
    list_fields = client.hkeys

    async def hkeys(key: str) -> Any:
        listed = await list_fields(key)
        client.hkeys = list_fields  # type: ignore[method-assign]
        rewritten = StoredBlob("chat", 9, ("bytes", b"Q" * LARGE))  # a new epoch, held
        await log.append_put(checkpoint(thread_id, 9), [rewritten], fence=None, parent_stored=True)  # fmt: skip
        return listed

    client.hkeys = hkeys  # type: ignore[method-assign]
    await deleting.discard(thread_id)
    await maintenance.invalidate(thread_id)
    assert await epochs_of(tiers, thread_id) == []


async def test_a_delete_that_appends_keep_outpacing_says_so_not_that_redis_is_down(
    tiers: WriteBehind, other: tuple[aioredis.Redis, RedisCheckpointCache, RedisWriteBehindLog]
) -> None:
    """A run appending a new epoch to the thread between each of the delete's listings and
    its script: the delete gives up, nothing deleted, saying why (Redis answered every call),
    still retried as an outage is; it goes through once the run pauses."""
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    log = log_of(tiers)
    await log.append_put(checkpoint(thread_id, 1), [grown(1)], fence=None)
    client, _, deleting = other
    list_fields = client.hkeys
    appended: list[int] = []

    async def hkeys(key: str) -> Any:
        listed = await list_fields(key)
        n = 2 + len(appended)
        rewritten = StoredBlob("chat", n, ("bytes", b"Q" * LARGE + b"%d" % n))  # a new epoch
        await log.append_put(checkpoint(thread_id, n), [rewritten], fence=None, parent_stored=True)  # fmt: skip
        appended.append(n)
        return listed

    client.hkeys = hkeys  # type: ignore[method-assign]
    try:
        with pytest.raises(StillWriting) as outpaced:
            await deleting.discard(thread_id)
    finally:
        client.hkeys = list_fields  # type: ignore[method-assign]

    assert len(appended) == DISCARD_ATTEMPTS
    assert isinstance(outpaced.value, BackendUnavailable)  # retried by callers
    assert "unavailable" not in str(outpaced.value), str(outpaced.value)
    assert len(await log.read(thread_id, count=99)) == 1 + DISCARD_ATTEMPTS
    await deleting.discard(thread_id)
    assert await log.read(thread_id, count=99) == []


async def test_an_append_sent_again_leaves_the_logs_epoch_as_it_was(tiers: WriteBehind) -> None:
    """A pipeline sent again after Redis lost its scripts repeats the SETs of new epochs;
    one the first send's append made the log's keeps its bytes and stays without a TTL."""
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    log = log_of(tiers)
    await log.append_put(checkpoint(thread_id, 1), [grown(1)], fence=None)
    [epoch] = await epochs_of(tiers, thread_id)
    keys, args, fence, _ = log._writes_call(thread_id, "", "00000001", [], False, "")
    await log._append(thread_id, "writes", (keys, args, fence, [(epoch.decode(), b"resent")]))
    assert await tiers.redis.ttl(epoch) == -1
    assert await tiers.redis.strlen(epoch) == len(grown(1).value[1])


async def test_a_process_taking_over_a_conversation_appends_after_its_first_read(
    tiers: WriteBehind, other: tuple[aioredis.Redis, RedisCheckpointCache, RedisWriteBehindLog]
) -> None:
    """Another instance (scale-out) continues a thread this one wrote: its first read of
    the cache tells it the epoch, so its put sends what grew, not the whole value."""
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    await tiers.cache.advance(checkpoint(thread_id, 1), [grown(1)])
    _, taking_over, _ = other
    assert (await taking_over.lookup(thread_id, "", lease=False)).checkpoint is not None
    before = await net_input_bytes(tiers)
    await taking_over.advance(checkpoint(thread_id, 2), [grown(2)])
    assert await net_input_bytes(tiers) - before < LARGE // 4
    found = (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint
    assert found is not None and found.blobs == {"chat": grown(2).value}
    assert len(await epochs_of(tiers, thread_id)) == 1


async def test_a_log_entry_whose_epoch_was_evicted_is_lost_like_redis_not_stuck(
    tiers: WriteBehind,
) -> None:
    """Under an `allkeys-*` policy Redis may evict an epoch the log refers to: the thread's
    unflushed tail is then lost as if Redis had lost it (the run resumes from the cold
    tier), not left in the log for every flush to fail on."""
    graph = chat_graph(tiers.saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    message = "x" * LARGE
    await graph.ainvoke({"messages": [message]}, cfg, durability="sync")
    boundary = await tiers.saver.aget_tuple(cfg)
    assert boundary is not None
    await graph.ainvoke({"messages": [message + "y"]}, cfg, durability="async")
    # Evicted: the epoch of the oldest entry in the log (the input's) only.
    [(oldest, _)] = await tiers.redis.xrange(thread_key(tiers, thread_id, LOG_KIND), count=1)
    listed = await tiers.redis.hget(thread_key(tiers, thread_id, REFERENCES_KIND), oldest)
    assert listed is not None
    [evicted] = json.loads(listed)
    await tiers.redis.delete(evicted)
    assert await tiers.saver.aget_tuple(cfg) is not None
    # The flusher holds none of the values (another worker's, or this one restarted).
    tiers.cache.epochs.forget(thread_id)

    with pytest.raises(HotStateLost):
        await tiers.saver.aflush(thread_id)
    assert not await tiers.redis.exists(thread_key(tiers, thread_id, LOG_KIND))
    assert not await tiers.redis.exists(thread_key(tiers, thread_id, HELD_EPOCHS_KIND))
    assert thread_id not in dict(await log_of(tiers).dirty_threads(limit=10_000))
    # The cold tier has the last boundary, whole; the thread goes on from it.
    cold = await tiers.store.get_checkpoint(thread_id, "", None)
    assert cold is not None
    assert cold.checkpoint_id == boundary.config["configurable"]["checkpoint_id"]
    resumed = config(thread_id)
    await graph.ainvoke({"messages": ["again"]}, resumed, durability="sync")
    latest = await tiers.saver.aget_tuple(resumed)
    assert latest is not None
    messages: list[Any] = latest.checkpoint["channel_values"]["messages"]
    assert messages[0] == message and messages[5] == "again" and len(messages) == 10


async def test_a_lost_entry_takes_the_cache_with_it(tiers: WriteBehind) -> None:
    """The cache may hold a newer checkpoint whose values are all still there: a put on it
    would reach the cold tier without its parent, so it goes with the lost entries."""
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    log = log_of(tiers)
    await log.append_put(checkpoint(thread_id, 1), [grown(1)], fence=None)
    await log.append_put(
        checkpoint(thread_id, 2), [StoredBlob("chat", 2, ("bytes", b"small"))], fence=None
    )
    await tiers.redis.delete(*await epochs_of(tiers, thread_id))  # evicted
    assert (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint is not None
    tiers.cache.epochs.forget(thread_id)  # the flusher holds none of the values

    await tiers.flusher.flush_thread(thread_id)
    assert (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint is None
    assert not await tiers.redis.exists(thread_key(tiers, thread_id, LOG_KIND))
    assert await tiers.store.get_checkpoint(thread_id, "", None) is None


async def test_an_epoch_released_by_a_late_acknowledgement_is_no_loss(tiers: WriteBehind) -> None:
    """A flusher whose lock ran out after it applied a batch acknowledges it late, releasing
    the entry's epoch while the next holder is between its read of the log and its read of
    the epochs: nothing was lost, and the next holder flushes the rest."""
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    log = log_of(tiers)
    await log.append_put(checkpoint(thread_id, 1), [grown(1)], fence=None)
    await log.append_put(
        checkpoint(thread_id, 2), [StoredBlob("chat", 2, ("bytes", b"small"))], fence=None
    )
    tiers.cache.epochs.forget(thread_id)  # the flushers hold none of the values
    late = RedisWriteBehindLog(tiers.redis, tiers.cache)
    token = await late.lock_thread(thread_id, ttl_ms=100)
    assert token is not None
    [first] = await late.read(thread_id, count=1)
    await tiers.store.apply_batch([first.op], fence=int(token))
    await asyncio.sleep(0.2)  # its lock ran out

    read_epochs = tiers.cache.read_epochs
    acknowledged: list[str] = []

    async def acknowledged_meanwhile(references: Sequence[Reference]) -> dict[str, EpochBytes]:
        if not acknowledged:
            acknowledged.append(first.entry_id)
            await late.ack(thread_id, acknowledged)
        return await read_epochs(references)

    tiers.cache.read_epochs = acknowledged_meanwhile  # type: ignore[method-assign]
    try:
        await tiers.flusher.flush_thread(thread_id)
    finally:
        tiers.cache.read_epochs = read_epochs  # type: ignore[method-assign]
    assert acknowledged
    cold = await tiers.store.get_checkpoint(thread_id, "", None)
    assert cold is not None and cold.checkpoint_id == f"{2:08}"


async def test_an_append_landing_as_a_lost_log_is_dropped_stays_listed(
    tiers: WriteBehind,
) -> None:
    """The run's next put_writes (no parent to check) lands between the drop and the
    thread's unlisting: it stays listed, for a flusher to take."""
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    log = log_of(tiers)
    await log.append_put(checkpoint(thread_id, 1), [grown(1)], fence=None)
    await tiers.redis.delete(*await epochs_of(tiers, thread_id))  # evicted
    tiers.cache.epochs.forget(thread_id)  # the flusher holds none of the values
    run = log._run
    landed = False

    async def appended_before_unlisting(script: str, keys: list[str], args: list[Any]) -> Any:
        nonlocal landed
        if script == "settle" and args[1] == "" and not landed:
            landed = True
            write = StoredWrite("task", "", 0, "chat", ("json", b"1"))
            await log.append_writes(thread_id, "", f"{1:08}", [write], upsert=False, fence=None)
        return await run(script, keys, args)

    log._run = appended_before_unlisting  # type: ignore[method-assign]
    try:
        await tiers.flusher.flush_thread(thread_id)
    finally:
        log._run = run  # type: ignore[method-assign]
    assert landed and await log.pending(thread_id)
    assert thread_id in dict(await log.dirty_threads(limit=10_000))
    await log.discard(thread_id)


async def test_every_cache_call_works_again_after_redis_lost_its_scripts(
    tiers: WriteBehind, stack_env: dict[str, str]
) -> None:
    """A restart without persistence or a failover empties the script cache: each call
    (a script alone, a script after a new epoch's SET, a script on the sync path) loads
    its script again and does its work."""
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    redis = tiers.redis
    blocking = redis_sync.Redis.from_url(stack_env["REDIS_URL"])
    cache = RedisCheckpointCache(
        redis,
        namespace=tiers.cache.namespace,
        ttl_seconds=tiers.cache.ttl_seconds,
        blocking_client=blocking,
    )
    write = StoredWrite("task", "~__pregel_pull, reply", 0, "chat", ("json", b'"hi"'))
    try:
        await redis.script_flush()
        await cache.advance(checkpoint(thread_id, 1), [grown(1)])  # SET of an epoch, script
        await redis.script_flush()
        await cache.add_writes(
            thread_id, "", checkpoint(thread_id, 1).checkpoint_id, [write], upsert=False
        )
        await redis.script_flush()
        found = (await cache.lookup(thread_id, "", lease=True, with_history=False)).checkpoint
        assert found is not None and found.blobs == {"chat": grown(1).value}
        assert found.writes == [write]
        await redis.script_flush()
        cache.epochs.forget(thread_id, "")  # the sync read fetches the epoch itself
        hit = cache.lookup_blocking(thread_id, "", with_history=False)
        assert hit is not None and hit.checkpoint == found
    finally:
        blocking.close()
