"""What the hot tier's scripts cost the server: the commands each call runs inside Redis,
its scripts' inner calls included (`INFO commandstats` deltas on a Redis of the test's own,
which nothing else uses), for the calls a support case makes most (issue #16), with the
state each call leaves checked alongside."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable

import pytest
import redis.asyncio as aioredis

from devstack import RedisServer
from state.hot.redis_checkpoints import RedisCheckpointCache
from state.hot.redis_store import RedisHotStore
from state.hot.redis_write_behind import RedisWriteBehindLog
from state.ports import StoredBlob, StoredWrite
from tests.support.records import unique_thread, workflow_record
from tests.support.stored import checkpoint

NAMESPACE = "counts"
TTL_SECONDS = 3600
# A write's deadline, far below the hot TTL (as the app's are).
BOUND_MS = 30_000


@pytest.fixture
async def redis(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(own_redis.url)
    yield client
    await client.aclose()


async def commands_of(redis: aioredis.Redis, call: Awaitable[object]) -> Counter[str]:
    """The commands Redis ran for `call`, by name (EVALSHA and each inner call apart)."""
    await redis.config_resetstat()
    await call
    stats = await redis.info("commandstats")
    counted = Counter(
        {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}
    )
    del counted["config|resetstat"]
    return counted


def blob(n: int) -> StoredBlob:
    return StoredBlob("chat", n, ("json", b'"message %d"' % n))


def writes(task: str, value: bytes, count: int) -> list[StoredWrite]:
    return [StoredWrite(task, "", idx, "chat", ("json", value)) for idx in range(count)]


# --------------------------------------------------------------------------- records


async def test_an_intent_on_a_cached_record_leaves_its_ttl_alone(redis: aioredis.Redis) -> None:
    """The entry's TTL outlasts the deadline: no PEXPIRE (it set the TTL it had)."""
    hot = RedisHotStore(redis, namespace=NAMESPACE)
    thread_id = unique_thread("counts")
    await hot.install(workflow_record(thread_id, a=1), ttl_seconds=TTL_SECONDS)
    # Its script loaded (an intent elsewhere), so the call counted runs it and nothing else.
    await hot.begin_write(unique_thread("counts"), bound_ms=BOUND_MS, ttl_seconds=TTL_SECONDS)
    before = await redis.pttl(hot.key(thread_id))
    ran = await commands_of(
        redis, hot.begin_write(thread_id, bound_ms=BOUND_MS, ttl_seconds=TTL_SECONDS)
    )
    assert ran == Counter({"evalsha": 1, "time": 1, "hset": 1, "pttl": 1})
    assert before - 1000 < await redis.pttl(hot.key(thread_id)) <= before
    assert (await hot.read(thread_id)).pending


async def test_an_intent_still_extends_an_entry_expiring_before_its_deadline(
    redis: aioredis.Redis,
) -> None:
    hot = RedisHotStore(redis, namespace=NAMESPACE)
    thread_id = unique_thread("counts")
    await hot.install(workflow_record(thread_id, a=1), ttl_seconds=1)
    ran = await commands_of(redis, hot.begin_write(thread_id, bound_ms=BOUND_MS, ttl_seconds=1))
    assert ran["pexpire"] == 1
    assert BOUND_MS - 1000 < await redis.pttl(hot.key(thread_id)) <= BOUND_MS


async def test_an_intent_creating_the_entry_gives_it_the_hot_ttl(redis: aioredis.Redis) -> None:
    hot = RedisHotStore(redis, namespace=NAMESPACE)
    thread_id = unique_thread("counts")
    ran = await commands_of(
        redis, hot.begin_write(thread_id, bound_ms=BOUND_MS, ttl_seconds=TTL_SECONDS)
    )
    assert ran["pexpire"] == 1
    assert await redis.pttl(hot.key(thread_id)) > TTL_SECONDS * 1000 - 1000


@pytest.mark.parametrize(
    ("ttl_seconds", "expected_ms"), [(TTL_SECONDS, TTL_SECONDS * 1000), (1, BOUND_MS)]
)
async def test_an_intent_on_an_entry_without_a_ttl_gives_it_one(
    redis: aioredis.Redis, ttl_seconds: int, expected_ms: int
) -> None:
    """An entry kept with no TTL (PTTL -1, as one the intent creates): the hot TTL, or the
    deadline where that is later."""
    hot = RedisHotStore(redis, namespace=NAMESPACE)
    thread_id = unique_thread("counts")
    await hot.install(workflow_record(thread_id, a=1), ttl_seconds=TTL_SECONDS)
    await redis.persist(hot.key(thread_id))
    await hot.begin_write(thread_id, bound_ms=BOUND_MS, ttl_seconds=ttl_seconds)
    assert expected_ms - 1000 < await redis.pttl(hot.key(thread_id)) <= expected_ms


async def test_a_miss_on_an_absent_record_takes_its_lease_without_asking_a_ttl(
    redis: aioredis.Redis,
) -> None:
    """The entry the lease creates has no TTL to ask about: it is given one directly."""
    hot = RedisHotStore(redis, namespace=NAMESPACE)
    await hot.read(unique_thread("counts"))  # its script loaded
    thread_id = unique_thread("counts")
    ran = await commands_of(redis, hot.read(thread_id))
    assert ran == Counter({"evalsha": 1, "hgetall": 1, "time": 1, "hset": 1, "pexpire": 1})
    assert (await hot.read(thread_id)).lease is not None
    assert 0 < await redis.pttl(hot.key(thread_id)) <= 60_000


# --------------------------------------------------------------------------- checkpoints


async def test_a_first_put_sends_no_hdel_and_a_put_after_a_lease_drops_it(
    redis: aioredis.Redis,
) -> None:
    """A put drops the entry's `lease` and `seen` only when they are there."""
    cache = RedisCheckpointCache(redis, namespace=NAMESPACE, ttl_seconds=TTL_SECONDS)
    await cache.advance(checkpoint(unique_thread("counts"), 1), [blob(1)])  # its script loaded
    thread_id = unique_thread("counts")
    ran = await commands_of(redis, cache.advance(checkpoint(thread_id, 1), [blob(1)]))
    assert ran["hdel"] == 0 and ran["hset"] == 1
    other = unique_thread("counts")
    assert (await cache.lookup(other, "", lease=True)).lease is not None
    ran = await commands_of(redis, cache.advance(checkpoint(other, 1), [blob(1)]))
    assert ran["hdel"] == 1
    assert not await redis.hexists(cache.key(other, ""), "lease")
    found = (await cache.lookup(other, "", lease=False, with_history=False)).checkpoint
    assert found is not None and found.checkpoint_id == checkpoint(other, 1).checkpoint_id


@pytest.mark.parametrize(
    ("upsert", "count"),
    [(False, 5), (True, 5), (False, 2100)],
    ids=["insert", "upsert", "insert-beyond-one-batch"],
)
async def test_writes_of_a_cached_checkpoint_cost_one_hset_per_batch_not_one_command_each(
    redis: aioredis.Redis, upsert: bool, count: int
) -> None:
    """One HSET (and, keeping the first of each, one HMGET) per 1000 writes: more than one
    script call takes (`unpack` has a limit) go in batches, every write set."""
    cache = RedisCheckpointCache(redis, namespace=NAMESPACE, ttl_seconds=TTL_SECONDS)
    thread_id = unique_thread("counts")
    first = checkpoint(thread_id, 1)
    await cache.advance(first, [blob(1)])
    await cache.add_writes(
        thread_id, "", first.checkpoint_id, writes("t", b'"old"', 2), upsert=False
    )
    ran = await commands_of(
        redis,
        cache.add_writes(
            thread_id, "", first.checkpoint_id, writes("t", b'"new"', count), upsert=upsert
        ),
    )
    batches = -(-count // 1000)
    assert ran["hsetnx"] == 0 and ran["hset"] == batches
    assert ran["hmget"] == (0 if upsert else batches)
    found = (await cache.lookup(thread_id, "", lease=False, with_history=False)).checkpoint
    assert found is not None
    kept = b'"new"' if upsert else b'"old"'
    values = {w.idx: w.value[1] for w in found.writes}
    assert values == {idx: kept if idx < 2 else b'"new"' for idx in range(count)}


async def test_early_writes_cost_one_hset_and_keep_the_first_of_each(
    redis: aioredis.Redis,
) -> None:
    """Writes of a checkpoint whose put is still in flight: kept for it, then its own."""
    cache = RedisCheckpointCache(redis, namespace=NAMESPACE, ttl_seconds=TTL_SECONDS)
    thread_id = unique_thread("counts")
    await cache.advance(checkpoint(thread_id, 1), [blob(1)])
    second = checkpoint(thread_id, 2)
    await cache.add_writes(
        thread_id, "", second.checkpoint_id, writes("t", b'"a"', 1), upsert=False
    )
    ran = await commands_of(
        redis,
        cache.add_writes(thread_id, "", second.checkpoint_id, writes("t", b'"b"', 4), upsert=False),
    )
    assert ran["hsetnx"] == 0 and ran["hmget"] == 1 and ran["hset"] == 1
    await cache.advance(second, [blob(2)])
    found = (await cache.lookup(thread_id, "", lease=False, with_history=False)).checkpoint
    assert found is not None and found.checkpoint_id == second.checkpoint_id
    assert [(w.idx, w.value[1]) for w in found.writes] == [
        (0, b'"a"'),
        (1, b'"b"'),
        (2, b'"b"'),
        (3, b'"b"'),
    ]


async def test_a_logged_put_reads_the_cached_id_once(redis: aioredis.Redis) -> None:
    """A put whose parent the caller does not know stored: the script checks the cached id,
    and moving the entry on reuses what it read."""
    cache = RedisCheckpointCache(redis, namespace=NAMESPACE, ttl_seconds=TTL_SECONDS)
    log = RedisWriteBehindLog(redis, cache)
    thread_id = unique_thread("counts")
    await log.append_put(checkpoint(thread_id, 1), [blob(1)], fence=None)
    ran = await commands_of(redis, log.append_put(checkpoint(thread_id, 2), [blob(2)], fence=None))
    # The id (once), and the delta history's checkpoint (`d@`).
    assert ran["hget"] == 2
    found = (await cache.lookup(thread_id, "", lease=False, with_history=False)).checkpoint
    assert found is not None and found.checkpoint_id == checkpoint(thread_id, 2).checkpoint_id
    assert await redis.xlen(cache.log_key(thread_id)) == 2
