"""Large values by reference in the hot tier, on a real redis-server.

A value of `BY_REFERENCE_BYTES` or more goes to Redis by a plain HSET ahead of the
script that refers to it (`state.hot.redis_checkpoints`): these tests check that such
values read back whole from the cache and from the write-behind log, reach the cold
tier, and leave Redis when nothing refers to them any more: once flushed, once their
channel moved on, or when the put that sent them was refused.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from state.errors import BackendUnavailable, StaleFencingToken
from state.hot.redis_checkpoints import (
    BY_REFERENCE_BYTES,
    checkpoint_fields,
    referenced_blob_fields,
)
from state.hot.redis_write_behind import REFERENCES_KIND, VALUES_KIND, RedisWriteBehindLog
from state.ports import CheckpointPut, StoredBlob, StoredCheckpoint
from tests.chat_graph import chat_graph
from tests.integration.test_write_behind import (
    COLD_BACKENDS,
    WriteBehind,
    config,
    open_write_behind,
    settings_for,
)

LARGE = BY_REFERENCE_BYTES + 1


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


def large(version: int, size: int = LARGE) -> StoredBlob:
    return StoredBlob("chat", version, ("bytes", bytes([version]) * size))


def log_of(tiers: WriteBehind) -> RedisWriteBehindLog:
    assert isinstance(tiers.flusher.log, RedisWriteBehindLog)
    return tiers.flusher.log


async def value_fields(tiers: WriteBehind, thread_id: str) -> list[bytes]:
    fields = await tiers.redis.hkeys(tiers.cache.key(thread_id, ""))
    return sorted(field for field in fields if field.startswith(b"v:"))


async def logged_values(tiers: WriteBehind, thread_id: str) -> tuple[int, int]:
    log = log_of(tiers)
    return (
        await tiers.redis.hlen(log._key(thread_id, VALUES_KIND)),
        await tiers.redis.hlen(log._key(thread_id, REFERENCES_KIND)),
    )


async def test_large_values_read_back_whole_and_leave_redis_once_flushed(
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
    # Only the channel's latest version stays in the cache entry.
    held = await value_fields(tiers, thread_id)
    assert len([field for field in held if field.startswith(b"v:messages\0")]) == 1
    values, references = await logged_values(tiers, thread_id)
    assert values >= 2 and references == values  # every large put of the two invokes

    await tiers.saver.aflush(thread_id)
    assert await logged_values(tiers, thread_id) == (0, 0)
    cold = await tiers.store.get_checkpoint(thread_id, "", None)
    assert cold is not None
    assert cold.checkpoint_id == hot.config["configurable"]["checkpoint_id"]
    listed = [item async for item in tiers.saver.alist(cfg, limit=1)]
    assert listed[0].checkpoint["channel_values"]["messages"] == messages


async def test_a_channel_set_inline_drops_the_value_it_referred_to(tiers: WriteBehind) -> None:
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    await tiers.cache.advance(checkpoint(thread_id, 1), [large(1)])
    await tiers.cache.advance(checkpoint(thread_id, 2), [large(2)])
    found = (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint
    assert found is not None and found.blobs == {"chat": large(2).value}
    assert len(await value_fields(tiers, thread_id)) == 1

    small = StoredBlob("chat", 3, ("bytes", b"small"))
    await tiers.cache.advance(checkpoint(thread_id, 3), [small])
    found = (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint
    assert found is not None and found.blobs == {"chat": small.value}
    assert await value_fields(tiers, thread_id) == []


async def test_a_refused_put_leaves_none_of_its_values(tiers: WriteBehind) -> None:
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    log = log_of(tiers)
    await log.append_put(checkpoint(thread_id, 1), [large(1)], fence=7)
    with pytest.raises(StaleFencingToken):
        await log.append_put(checkpoint(thread_id, 2), [large(2)], fence=5)
    assert await logged_values(tiers, thread_id) == (1, 1)
    assert len(await value_fields(tiers, thread_id)) == 1
    found = (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint
    assert found is not None and found.blobs == {"chat": large(1).value}


async def test_a_put_whose_value_is_gone_before_its_script_is_not_applied(
    tiers: WriteBehind,
) -> None:
    """What a concurrent delete (or a lost server) between a put's HSET and its script
    looks like to the script: the put is refused, not logged with a dangling value."""
    thread_id = f"values-{uuid.uuid4().hex[:8]}"
    log = log_of(tiers)
    await log.append_put(checkpoint(thread_id, 1), [large(1)], fence=None)
    keys, args, fence, _ = log._put_call(checkpoint(thread_id, 2), [large(2)], None, False)
    with pytest.raises(BackendUnavailable):
        await log._append(thread_id, "put", keys, args, fence, [])  # the HSETs never ran
    logged = [entry.op for entry in await log.read(thread_id, count=9)]
    assert logged == [CheckpointPut(checkpoint(thread_id, 1), [large(1)])]

    # The same for the cache alone (write-through): the entry is dropped, not left naming
    # a value it does not hold; the next reader fills it from the cold tier.
    cache = tiers.cache
    fields, _ = referenced_blob_fields([large(2)])
    stored = checkpoint(thread_id, 2)
    key = cache.key(thread_id, "")
    assert await tiers.redis.hget(key, "id") == checkpoint(thread_id, 1).checkpoint_id.encode()
    await cache._advance(
        keys=[key, cache.namespaces_key(thread_id)],
        args=[stored.checkpoint_id, "00000001", 60, "", *checkpoint_fields(stored), *fields],
    )
    assert not await tiers.redis.exists(key)
