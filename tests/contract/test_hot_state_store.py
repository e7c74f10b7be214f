"""The `HotStateStore` contract on a real redis-server and on the in-memory fake: installs
that never go back a version, write intents, fenced locks that expire and renew.

What only the Redis adapter has (its TTLs, key layout, hash tags, namespaces, encoding of
values, a server that loses its data) is in tests/integration/test_hot_redis.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from state.hot.redis_client import create_redis_client, hot_namespace
from state.hot.redis_store import RedisHotStore
from state.ports import HotStateStore
from state.settings import Settings
from tests.support.fakes import MEMORY, MemoryHotStore
from tests.support.records import unique_thread, workflow_record

# A write bound no test outlives: the intent stays live throughout.
LIVE_MS = 60_000


@pytest.fixture(params=["redis", MEMORY])
async def hot(request: pytest.FixtureRequest) -> AsyncIterator[HotStateStore]:
    if request.param == MEMORY:
        yield MemoryHotStore()
        return
    stack_env: dict[str, str] = request.getfixturevalue("stack_env")
    settings = Settings.model_validate(
        {"cosmos_endpoint": stack_env["COSMOS_ENDPOINT"], "redis_url": stack_env["REDIS_URL"]}
    )
    store = RedisHotStore(create_redis_client(settings), namespace=hot_namespace(settings))
    yield store
    await store.close()


def test_implements_the_port(hot: HotStateStore) -> None:
    assert isinstance(hot, HotStateStore)


async def test_install_never_replaces_a_newer_version(hot: HotStateStore) -> None:
    thread_id = unique_thread("hot")
    assert await hot.install(workflow_record(thread_id, 5, s="v5"), ttl_seconds=60)
    assert not await hot.install(workflow_record(thread_id, 4, s="v4"), ttl_seconds=60)
    assert await hot.get(thread_id) == workflow_record(thread_id, 5, s="v5")
    # The same version may be re-installed (refreshes the TTL), a newer one replaces.
    assert await hot.install(workflow_record(thread_id, 5, s="v5"), ttl_seconds=60)
    assert await hot.install(workflow_record(thread_id, 6, t="v6"), ttl_seconds=60)
    assert await hot.get(thread_id) == workflow_record(thread_id, 6, t="v6")


async def test_invalidate_removes_the_copy(hot: HotStateStore) -> None:
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, a=1), ttl_seconds=60)
    await hot.invalidate(thread_id)
    assert await hot.get(thread_id) is None


async def test_a_write_intent_hides_the_copy_until_its_writer_installs(
    hot: HotStateStore,
) -> None:
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, 1, s="v1"), ttl_seconds=60)
    intent = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    seen = await hot.read(thread_id)
    assert (seen.record, seen.pending) == (None, True)
    assert await hot.install(workflow_record(thread_id, 2, s="v2"), ttl_seconds=60, intent=intent)
    assert await hot.get(thread_id) == workflow_record(thread_id, 2, s="v2")


async def test_each_writer_removes_only_its_own_intent(hot: HotStateStore) -> None:
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, 1, s="v1"), ttl_seconds=60)
    first = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    second = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    assert await hot.install(workflow_record(thread_id, 2, s="v2"), ttl_seconds=60, intent=first)
    assert (await hot.read(thread_id)).pending  # the second writer may have committed v3
    # Refused as older than what is cached, yet it still removes its writer's intent.
    await hot.install(workflow_record(thread_id, 3, s="v3"), ttl_seconds=60)
    assert not await hot.install(
        workflow_record(thread_id, 2, s="v2"), ttl_seconds=60, intent=second
    )
    assert await hot.get(thread_id) == workflow_record(thread_id, 3, s="v3")


async def test_an_abandoned_write_removes_its_intent(hot: HotStateStore) -> None:
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, s="v1"), ttl_seconds=60)
    intent = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    await hot.abandon_write(intent)
    assert await hot.get(thread_id) == workflow_record(thread_id, s="v1")


async def test_a_reader_install_keeps_intents_that_had_not_expired_at_its_read(
    hot: HotStateStore,
) -> None:
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, 1, s="v1"), ttl_seconds=60)
    live = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    observed = (await hot.read(thread_id)).observed_at
    # Registered after the reader's read: already expired, yet its writer may have
    # committed after the reader's cold read.
    later = await hot.begin_write(thread_id, bound_ms=0, ttl_seconds=60)
    assert later.registered_at >= observed
    await hot.install(
        workflow_record(thread_id, 1, s="v1"), ttl_seconds=60, expired_before=observed
    )
    await hot.abandon_write(live)
    assert (await hot.read(thread_id)).pending  # `later` still hides the copy


async def test_a_reader_install_clears_intents_expired_before_its_read(hot: HotStateStore) -> None:
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, 1, s="v1"), ttl_seconds=60)
    dead = await hot.begin_write(thread_id, bound_ms=0, ttl_seconds=60)
    seen = await hot.read(thread_id)
    while seen.observed_at <= dead.registered_at:  # the server clock has to tick once
        seen = await hot.read(thread_id)
    assert seen.pending
    fresh = workflow_record(thread_id, 2, s="v2")  # what that reader then read from cold
    assert await hot.install(fresh, ttl_seconds=60, expired_before=seen.observed_at)
    assert await hot.get(thread_id) == fresh


async def test_invalidate_drops_the_record_but_keeps_intents(hot: HotStateStore) -> None:
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, 4, s="v4"), ttl_seconds=60)
    await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    await hot.invalidate(thread_id)
    assert await hot.install(workflow_record(thread_id, 1, s="v1"), ttl_seconds=60)
    assert (await hot.read(thread_id)).pending


async def test_an_intent_that_clears_drops_the_record_and_keeps_other_intents(
    hot: HotStateStore,
) -> None:
    """A create's invalidation and intent in one step: a copy left from an earlier record
    of the thread id (version 4) no longer outranks the new version 1."""
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, 4, s="v4"), ttl_seconds=60)
    other = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    mine = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60, clear=True)
    created = workflow_record(thread_id, 1, s="v1")
    assert await hot.install(created, ttl_seconds=60, intent=mine, written=True)
    assert (await hot.read(thread_id)).pending  # the other writer's intent still hides it
    await hot.abandon_write(other)
    assert await hot.get(thread_id) == created


async def test_lock_is_exclusive_and_only_its_owner_releases_it(hot: HotStateStore) -> None:
    name = f"case_{uuid.uuid4().hex[:8]}"
    held = await hot.acquire_lock(name, ttl_ms=10_000)
    assert held is not None and held.name == name and held.ttl_ms == 10_000
    assert await hot.acquire_lock(name, ttl_ms=10_000) is None

    impostor = type(held)(name=name, token="not-the-owner", fence=held.fence, ttl_ms=10_000)
    assert not await hot.release_lock(impostor)
    assert await hot.acquire_lock(name, ttl_ms=10_000) is None  # still held

    assert await hot.release_lock(held)
    assert not await hot.release_lock(held)  # a second release finds nothing of ours


async def test_each_new_holder_gets_a_higher_fencing_token(hot: HotStateStore) -> None:
    name = f"case_{uuid.uuid4().hex[:8]}"
    first = await hot.acquire_lock(name, ttl_ms=10_000)
    assert first is not None
    assert await hot.release_lock(first)
    second = await hot.acquire_lock(name, ttl_ms=100)
    assert second is not None and second.fence > first.fence
    await asyncio.sleep(0.2)  # expires without a release
    third = await hot.acquire_lock(name, ttl_ms=10_000)
    assert third is not None and third.fence > second.fence
    # The expired holder can no longer release the new holder's lock.
    assert not await hot.release_lock(second)
    assert await hot.release_lock(third)


async def test_health_reports_a_reachable_server(hot: HotStateStore) -> None:
    health = await hot.health()
    assert health.up and health.latency_ms is not None


async def test_only_the_owner_renews_a_lock_and_a_renewed_lock_outlives_its_first_ttl(
    hot: HotStateStore,
) -> None:
    name = f"case_{uuid.uuid4().hex[:8]}"
    # Renewed at half its TTL: a loaded machine may run the renewal (or the look at the
    # TTL after it) a few hundred ms late; at 300 ms renewed every 150 ms, that lost it.
    held = await hot.acquire_lock(name, ttl_ms=1_000)
    assert held is not None
    for _ in range(3):
        await asyncio.sleep(0.5)
        assert await hot.renew_lock(held)
    # 1.5 s after taking a 1 s lock: still ours, because it was renewed.
    assert await hot.acquire_lock(name, ttl_ms=10_000) is None
    remaining = await hot.lock_ttl_ms(name)
    assert remaining is not None and 500 < remaining <= 1_000

    impostor = type(held)(name=name, token="not-the-owner", fence=held.fence, ttl_ms=60_000)
    assert not await hot.renew_lock(impostor)
    await asyncio.sleep(1.1)  # not renewed: it expires, and another worker takes it
    taker = await hot.acquire_lock(name, ttl_ms=10_000)
    assert taker is not None and taker.fence > held.fence
    assert not await hot.renew_lock(held)  # the lock is someone else's now
    assert await hot.lock_ttl_ms(name) is not None and await hot.release_lock(taker)


async def evict(hot: HotStateStore, thread_id: str) -> None:
    """What a volatile-* eviction policy does to the entry under memory pressure."""
    if isinstance(hot, MemoryHotStore):
        hot.evict(thread_id)
    else:
        assert isinstance(hot, RedisHotStore)
        await hot._client.delete(hot.key(thread_id))


async def test_a_writer_whose_intent_the_entry_lost_installs_nothing(hot: HotStateStore) -> None:
    """Two writers: B installs v3 and acknowledges, the entry is evicted, then A, slower,
    installs its v2. It installed it on the empty entry (served, older than B's
    acknowledged write); an install needs its writer's intent still there."""
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, 1, s="v1"), ttl_seconds=60)
    a = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    b = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    v2, v3 = workflow_record(thread_id, 2, s="v2"), workflow_record(thread_id, 3, s="v3")
    await hot.install(v3, ttl_seconds=60, intent=b, written=True)
    await evict(hot, thread_id)
    assert not await hot.install(v2, ttl_seconds=60, intent=a, written=True)
    assert await hot.get(thread_id) is None


async def test_a_reader_installs_only_under_the_lease_its_miss_took(hot: HotStateStore) -> None:
    """A reader misses, reads v2 from the cold tier; meanwhile a writer installs v3 and the
    entry is evicted. The reader installed its v2 on the empty entry; its lease, revoked by
    the writer's install (and gone with the entry), now keeps it out."""
    thread_id = unique_thread("hot")
    missed = await hot.read(thread_id)
    assert missed.record is None and missed.lease is not None
    writer = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    await hot.install(
        workflow_record(thread_id, 3, s="v3"), ttl_seconds=60, intent=writer, written=True
    )
    await evict(hot, thread_id)
    assert not await hot.install(
        workflow_record(thread_id, 2, s="v2"), ttl_seconds=60, lease=missed.lease
    )
    assert await hot.get(thread_id) is None
    again = await hot.read(thread_id)  # a later miss fills as ever
    stored = workflow_record(thread_id, 3, s="v3")
    assert await hot.install(stored, ttl_seconds=60, lease=again.lease)
    assert await hot.get(thread_id) == stored


async def test_a_writer_finding_its_intent_lost_revokes_the_leases_taken_since(
    hot: HotStateStore,
) -> None:
    """The entry is evicted while a writer's cold write is in flight; a reader then misses,
    takes a lease and reads v1 from the cold tier before the writer commits v2. The writer's
    install, finding its intent gone, drops what the entry holds, the reader's lease too:
    that reader's v1 would otherwise be served over the acknowledged v2."""
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, 1, s="v1"), ttl_seconds=60)
    writer = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    await evict(hot, thread_id)
    missed = await hot.read(thread_id)
    assert missed.record is None and missed.lease is not None
    assert not await hot.install(
        workflow_record(thread_id, 2, s="v2"), ttl_seconds=60, intent=writer, written=True
    )
    assert not await hot.install(
        workflow_record(thread_id, 1, s="v1"), ttl_seconds=60, lease=missed.lease
    )
    assert await hot.get(thread_id) is None
