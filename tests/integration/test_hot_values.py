"""Large values in the hot tier as append-only epochs (`state.hot.redis_values`), on a real
redis-server: a grown value is sent as its tail, reads back whole from the cache and from
the write-behind log, reaches the cold tier, and its epochs leave Redis once nothing
refers to them; a writer whose epoch moved on sends the value whole again.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from state.errors import StaleFencingToken
from state.hot.redis_checkpoints import CACHED_EPOCHS_KIND, HELD_EPOCHS_KIND
from state.hot.redis_values import BY_REFERENCE_BYTES, STAGED_TTL_MS
from state.hot.redis_write_behind import REFERENCES_KIND, RedisWriteBehindLog
from state.ports import StoredBlob, StoredCheckpoint
from tests.chat_graph import chat_graph
from tests.integration.test_write_behind import (
    COLD_BACKENDS,
    WriteBehind,
    config,
    open_write_behind,
    settings_for,
)

LARGE = 4 * BY_REFERENCE_BYTES


@pytest.fixture(params=COLD_BACKENDS)
async def tiers(
    request: pytest.FixtureRequest, stack_env: dict[str, str]
) -> AsyncIterator[WriteBehind]:
    async with open_write_behind(
        settings_for(stack_env, request.param, stack_env["REDIS_URL"])
    ) as opened:
        yield opened


def checkpoint(thread_id: str, n: int) -> StoredCheckpoint:
    return StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns="",
        checkpoint_id=f"{n:08}",
        parent_checkpoint_id=f"{n - 1:08}" if n > 1 else None,
        checkpoint=("json", b'{"n": %d}' % n),
        metadata={"step": n},
        channel_versions={"chat": n},
    )


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


async def test_a_refused_put_leaves_no_epoch_behind(tiers: WriteBehind) -> None:
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    log = log_of(tiers)
    await log.append_put(checkpoint(thread_id, 1), [grown(1)], fence=7)
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


async def test_an_entry_whose_epoch_is_gone_reads_as_a_miss(tiers: WriteBehind) -> None:
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    await tiers.cache.advance(checkpoint(thread_id, 1), [grown(1)])
    await tiers.redis.delete(*await epochs_of(tiers, thread_id))  # evicted
    assert (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint is None
