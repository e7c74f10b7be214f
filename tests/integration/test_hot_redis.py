"""The Redis hot tier against a real redis-server: installs, write intents, TTL, fenced locks."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from devstack import RedisServer, free_port
from state.errors import BackendUnavailable
from state.hot.redis_checkpoints import RedisCheckpointCache
from state.hot.redis_client import create_redis_client, hot_namespace
from state.hot.redis_store import RedisHotStore
from state.ports import HotStateStore, StoredCheckpoint, WorkflowRecord
from state.schema import CURRENT
from state.settings import Settings

# A write bound no test outlives: the intent stays live throughout.
LIVE_MS = 60_000


def _settings(redis_url: str, stack_env: dict[str, str]) -> Settings:
    return Settings.model_validate(
        {"cosmos_endpoint": stack_env["COSMOS_ENDPOINT"], "redis_url": redis_url}
    )


@pytest.fixture
def settings(stack_env: dict[str, str]) -> Settings:
    return _settings(stack_env["REDIS_URL"], stack_env)


@pytest.fixture
async def hot(settings: Settings) -> AsyncIterator[RedisHotStore]:
    store = RedisHotStore(create_redis_client(settings), settings)
    yield store
    await store.close()


@pytest.fixture
async def raw(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """A plain client to look at what the store wrote (and to damage it on purpose)."""
    client = create_redis_client(settings)
    yield client
    await client.aclose()


def _thread() -> str:
    return f"hot-{uuid.uuid4().hex[:12]}"


def _record(thread_id: str, version: int = 1, **sections: object) -> WorkflowRecord:
    return WorkflowRecord(
        thread_id=thread_id,
        version=version,
        sections=dict(sections),
        schema_version=CURRENT["workflow"],
        created_at="2025-01-01T00:00:00+00:00",
        updated_at="2025-01-01T00:00:00+00:00",
        fence=0,
    )


def test_implements_the_port(hot: RedisHotStore) -> None:
    assert isinstance(hot, HotStateStore)


async def test_install_then_get_returns_the_same_record(
    hot: RedisHotStore, raw: aioredis.Redis
) -> None:
    thread_id = _thread()
    record = _record(
        thread_id,
        version=3,
        case={"id": "case_8842", "amount": 12345678901234567890, "ratio": 0.1 + 0.2},
        messages=[],
        notes={"empty": {}, "tags": [], "text": "charged twice — can't log in"},
        flag=None,
    )
    assert await hot.install(record, ttl_seconds=60)
    assert await hot.get(thread_id) == record
    assert 55 <= await raw.ttl(hot.key(thread_id)) <= 60


async def test_get_of_uncached_thread_is_none(hot: RedisHotStore, raw: aioredis.Redis) -> None:
    thread_id = _thread()
    assert await hot.get(thread_id) is None
    assert await raw.exists(hot.key(thread_id)) == 0


async def test_install_never_replaces_a_newer_version(hot: RedisHotStore) -> None:
    thread_id = _thread()
    assert await hot.install(_record(thread_id, 5, s="v5"), ttl_seconds=60)
    assert not await hot.install(_record(thread_id, 4, s="v4"), ttl_seconds=60)
    assert await hot.get(thread_id) == _record(thread_id, 5, s="v5")
    # The same version may be re-installed (refreshes the TTL), a newer one replaces.
    assert await hot.install(_record(thread_id, 5, s="v5"), ttl_seconds=60)
    assert await hot.install(_record(thread_id, 6, t="v6"), ttl_seconds=60)
    assert await hot.get(thread_id) == _record(thread_id, 6, t="v6")


async def test_invalidate_removes_the_copy(hot: RedisHotStore) -> None:
    thread_id = _thread()
    await hot.install(_record(thread_id, a=1), ttl_seconds=60)
    await hot.invalidate(thread_id)
    assert await hot.get(thread_id) is None


async def test_a_copy_of_another_schema_version_is_a_miss(
    hot: RedisHotStore, raw: aioredis.Redis
) -> None:
    thread_id = _thread()
    await hot.install(_record(thread_id, a=1), ttl_seconds=60)
    await raw.hset(hot.key(thread_id), "schema_version", CURRENT["workflow"] + 1)
    assert await hot.get(thread_id) is None


async def test_a_damaged_copy_is_a_miss_and_a_new_install_replaces_it(
    hot: RedisHotStore, raw: aioredis.Redis
) -> None:
    thread_id = _thread()
    await hot.install(_record(thread_id, a=1), ttl_seconds=60)
    await raw.hset(hot.key(thread_id), "s:a", "{not json")
    assert await hot.get(thread_id) is None
    assert await hot.install(_record(thread_id, a=1), ttl_seconds=60)
    assert await hot.get(thread_id) == _record(thread_id, a=1)


# --------------------------------------------------------------------------- write intents


async def test_a_write_intent_hides_the_copy_until_its_writer_installs(
    hot: RedisHotStore,
) -> None:
    thread_id = _thread()
    await hot.install(_record(thread_id, 1, s="v1"), ttl_seconds=60)
    intent = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    seen = await hot.read(thread_id)
    assert (seen.record, seen.pending) == (None, True)
    assert await hot.install(_record(thread_id, 2, s="v2"), ttl_seconds=60, intent=intent)
    assert await hot.get(thread_id) == _record(thread_id, 2, s="v2")


async def test_an_intent_on_an_uncached_thread_creates_an_entry_that_expires(
    hot: RedisHotStore, raw: aioredis.Redis
) -> None:
    thread_id = _thread()
    await hot.begin_write(thread_id, bound_ms=1000, ttl_seconds=60)
    assert (await hot.read(thread_id)).pending
    assert 55 <= await raw.ttl(hot.key(thread_id)) <= 60


async def test_an_intent_keeps_an_expiring_entry_until_its_deadline(
    hot: RedisHotStore, raw: aioredis.Redis
) -> None:
    thread_id = _thread()
    await hot.install(_record(thread_id, s="v1"), ttl_seconds=1)
    await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=1)
    assert 55 <= await raw.ttl(hot.key(thread_id)) <= 60


async def test_each_writer_removes_only_its_own_intent(hot: RedisHotStore) -> None:
    thread_id = _thread()
    await hot.install(_record(thread_id, 1, s="v1"), ttl_seconds=60)
    first = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    second = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    assert await hot.install(_record(thread_id, 2, s="v2"), ttl_seconds=60, intent=first)
    assert (await hot.read(thread_id)).pending  # the second writer may have committed v3
    # Refused as older than what is cached, yet it still removes its writer's intent.
    await hot.install(_record(thread_id, 3, s="v3"), ttl_seconds=60)
    assert not await hot.install(_record(thread_id, 2, s="v2"), ttl_seconds=60, intent=second)
    assert await hot.get(thread_id) == _record(thread_id, 3, s="v3")


async def test_an_abandoned_write_removes_its_intent(hot: RedisHotStore) -> None:
    thread_id = _thread()
    await hot.install(_record(thread_id, s="v1"), ttl_seconds=60)
    intent = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    await hot.abandon_write(intent)
    assert await hot.get(thread_id) == _record(thread_id, s="v1")


async def test_a_reader_install_keeps_intents_that_had_not_expired_at_its_read(
    hot: RedisHotStore,
) -> None:
    thread_id = _thread()
    await hot.install(_record(thread_id, 1, s="v1"), ttl_seconds=60)
    live = await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    observed = (await hot.read(thread_id)).observed_at
    # Registered after the reader's read: already expired, yet its writer may have
    # committed after the reader's cold read.
    later = await hot.begin_write(thread_id, bound_ms=0, ttl_seconds=60)
    assert later.registered_at >= observed
    await hot.install(_record(thread_id, 1, s="v1"), ttl_seconds=60, expired_before=observed)
    await hot.abandon_write(live)
    assert (await hot.read(thread_id)).pending  # `later` still hides the copy


async def test_a_reader_install_clears_intents_expired_before_its_read(hot: RedisHotStore) -> None:
    thread_id = _thread()
    await hot.install(_record(thread_id, 1, s="v1"), ttl_seconds=60)
    dead = await hot.begin_write(thread_id, bound_ms=0, ttl_seconds=60)
    seen = await hot.read(thread_id)
    while seen.observed_at <= dead.registered_at:  # the server clock has to tick once
        seen = await hot.read(thread_id)
    assert seen.pending
    fresh = _record(thread_id, 2, s="v2")  # what that reader then read from cold
    assert await hot.install(fresh, ttl_seconds=60, expired_before=seen.observed_at)
    assert await hot.get(thread_id) == fresh


async def test_invalidate_drops_the_record_but_keeps_intents(hot: RedisHotStore) -> None:
    thread_id = _thread()
    await hot.install(_record(thread_id, 4, s="v4"), ttl_seconds=60)
    await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
    await hot.invalidate(thread_id)
    assert await hot.install(_record(thread_id, 1, s="v1"), ttl_seconds=60)
    assert (await hot.read(thread_id)).pending


# --------------------------------------------------------------------------- namespaces


def _store_settings(stack_env: dict[str, str], **values: object) -> Settings:
    return Settings.model_validate(
        {"cosmos_endpoint": stack_env["COSMOS_ENDPOINT"], "redis_url": stack_env["REDIS_URL"]}
        | values
    )


def test_the_namespace_names_the_cold_store_and_no_secret(stack_env: dict[str, str]) -> None:
    cosmos = _store_settings(stack_env, cosmos_key="key-1")
    pg_url = "postgresql://app:secret-1@db.example:5433/cases"
    postgres = _store_settings(stack_env, state_cold_backend="postgres", postgres_url=pg_url)
    namespaces = {
        hot_namespace(settings)
        for settings in (
            cosmos,
            _store_settings(stack_env, cosmos_container="other"),
            _store_settings(stack_env, cosmos_database="other"),
            _store_settings(stack_env, cosmos_endpoint="https://other.documents.azure.com:443/"),
            postgres,
            _store_settings(
                stack_env, state_cold_backend="postgres", postgres_url=pg_url.replace("5433", "5")
            ),
            _store_settings(
                stack_env, state_cold_backend="postgres", postgres_url=pg_url + "-archive"
            ),
            _store_settings(
                stack_env,
                state_cold_backend="postgres",
                postgres_host="db.example",
                postgres_user="app",
            ),
        )
    }
    assert len(namespaces) == 8
    assert all(len(namespace) <= 12 and ":" not in namespace for namespace in namespaces)
    # Credentials are not part of the identity: rotating them keeps the cache.
    assert hot_namespace(_store_settings(stack_env, cosmos_key="key-2")) == hot_namespace(cosmos)
    rotated = pg_url.replace("secret-1", "secret-2")
    assert hot_namespace(
        _store_settings(stack_env, state_cold_backend="postgres", postgres_url=rotated)
    ) == hot_namespace(postgres)
    as_conninfo = "host=db.example port=5433 dbname=cases user=app password=x"
    assert hot_namespace(
        _store_settings(stack_env, state_cold_backend="postgres", postgres_url=as_conninfo)
    ) == hot_namespace(postgres)


async def test_stores_of_different_cold_stores_share_no_key(
    stack_env: dict[str, str], raw: aioredis.Redis
) -> None:
    first_settings = _store_settings(stack_env)
    second_settings = _store_settings(stack_env, cosmos_container="other")
    first = RedisHotStore(create_redis_client(first_settings), first_settings)
    second = RedisHotStore(create_redis_client(second_settings), second_settings)
    try:
        thread_id = _thread()
        await first.install(_record(thread_id, 5, s="first"), ttl_seconds=60)
        assert await second.get(thread_id) is None
        assert await second.install(_record(thread_id, 1, s="second"), ttl_seconds=60)
        assert await first.get(thread_id) == _record(thread_id, 5, s="first")
        assert await second.get(thread_id) == _record(thread_id, 1, s="second")
        held = await first.acquire_lock(thread_id, ttl_ms=10_000)
        assert held is not None and await second.acquire_lock(thread_id, ttl_ms=10_000)

        checkpoint = StoredCheckpoint(
            thread_id, "", "0001", None, ("json", b"{}"), {}, {}, blobs={}, writes=[]
        )
        first_cache = RedisCheckpointCache(raw, first_settings)
        second_cache = RedisCheckpointCache(raw, second_settings)
        await first_cache.advance(checkpoint, [])
        assert (await first_cache.lookup(thread_id, "", lease=False)).checkpoint is not None
        assert (await second_cache.lookup(thread_id, "", lease=False)).checkpoint is None
    finally:
        await first.close()
        await second.close()


async def test_lock_is_exclusive_and_only_its_owner_releases_it(hot: RedisHotStore) -> None:
    name = f"case_{uuid.uuid4().hex[:8]}"
    held = await hot.acquire_lock(name, ttl_ms=10_000)
    assert held is not None and held.name == name and held.ttl_ms == 10_000
    assert await hot.acquire_lock(name, ttl_ms=10_000) is None

    impostor = type(held)(name=name, token="not-the-owner", fence=held.fence, ttl_ms=10_000)
    assert not await hot.release_lock(impostor)
    assert await hot.acquire_lock(name, ttl_ms=10_000) is None  # still held

    assert await hot.release_lock(held)
    assert not await hot.release_lock(held)  # a second release finds nothing of ours


async def test_each_new_holder_gets_a_higher_fencing_token(hot: RedisHotStore) -> None:
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


async def test_fencing_tokens_stay_monotonic_when_redis_loses_its_data(
    tmp_path: Path, stack_env: dict[str, str]
) -> None:
    server = RedisServer(port=free_port(), workdir=tmp_path)
    server.start()
    try:
        settings = _settings(server.url, stack_env)
        store = RedisHotStore(create_redis_client(settings), settings)
        try:
            before = await store.acquire_lock("case_8842", ttl_ms=60_000)
            assert before is not None
            server.stop()  # no persistence: the lock and the fence counter are gone
            server.start()
            after = await store.acquire_lock("case_8842", ttl_ms=60_000)
            assert after is not None and after.fence > before.fence
        finally:
            await store.close()
    finally:
        server.stop()


async def test_every_key_of_a_thread_shares_its_hash_tag(
    hot: RedisHotStore, raw: aioredis.Redis, settings: Settings
) -> None:
    thread_id = _thread()
    await hot.install(_record(thread_id, a=1), ttl_seconds=60)
    held = await hot.acquire_lock(thread_id, ttl_ms=10_000)
    assert held is not None
    keys = sorted([key.decode() async for key in raw.scan_iter(match=f"*{thread_id}*")])
    namespace = hot_namespace(settings)
    assert keys == [f"{{{thread_id}}}:{namespace}:{kind}" for kind in ("fence", "lock", "wf")]
    assert len({key_slot(key.encode()) for key in keys}) == 1
    await hot.release_lock(held)


async def test_unreachable_redis_is_a_typed_error_and_health_reports_it(
    stack_env: dict[str, str],
) -> None:
    settings = _settings(f"redis://127.0.0.1:{free_port()}/0", stack_env)
    store = RedisHotStore(create_redis_client(settings), settings)
    try:
        with pytest.raises(BackendUnavailable) as raised:
            await store.get(_thread())
        assert raised.value.backend == "redis"
        with pytest.raises(BackendUnavailable):
            await store.acquire_lock("case_8842", ttl_ms=1000)
        health = await store.health()
        assert (health.name, health.up) == ("redis", False)
    finally:
        await store.close()


async def test_health_reports_a_reachable_server(hot: RedisHotStore) -> None:
    health = await hot.health()
    assert health.up and health.latency_ms is not None


async def test_only_the_owner_renews_a_lock_and_a_renewed_lock_outlives_its_first_ttl(
    hot: RedisHotStore,
) -> None:
    name = f"case_{uuid.uuid4().hex[:8]}"
    held = await hot.acquire_lock(name, ttl_ms=300)
    assert held is not None
    for _ in range(3):
        await asyncio.sleep(0.15)
        assert await hot.renew_lock(held)
    # 450 ms after taking a 300 ms lock: still ours, because it was renewed.
    assert await hot.acquire_lock(name, ttl_ms=10_000) is None
    remaining = await hot.lock_ttl_ms(name)
    assert remaining is not None and 150 < remaining <= 300

    impostor = type(held)(name=name, token="not-the-owner", fence=held.fence, ttl_ms=60_000)
    assert not await hot.renew_lock(impostor)
    await asyncio.sleep(0.35)  # not renewed: it expires, and another worker takes it
    taker = await hot.acquire_lock(name, ttl_ms=10_000)
    assert taker is not None and taker.fence > held.fence
    assert not await hot.renew_lock(held)  # the lock is someone else's now
    assert await hot.lock_ttl_ms(name) is not None and await hot.release_lock(taker)
