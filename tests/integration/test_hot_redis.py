"""What only the Redis hot tier has, against a real redis-server: TTLs, the encoding of
values, key layout and namespaces, a server that loses its data or cannot be reached.

The `HotStateStore` contract (installs, write intents, fenced locks) runs on Redis and on
the in-memory fake in tests/contract/test_hot_state_store.py.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import TimeoutError as RedisTimeoutError

from devstack import RedisServer, free_port
from state.errors import BackendUnavailable, FenceUnknown, StaleFencingToken
from state.hot import redis_client
from state.hot.redis_checkpoints import RedisCheckpointCache
from state.hot.redis_client import create_redis_client, hot_key, hot_namespace, run_script
from state.hot.redis_events import EVENTS_KIND, RedisEventLog
from state.hot.redis_store import RedisHotStore
from state.hot.redis_write_behind import RedisWriteBehindLog
from state.ports import StoredCheckpoint, StoredWrite
from state.schema import CURRENT
from state.settings import Settings
from tests.support.records import unique_thread, workflow_record

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
    store = RedisHotStore(create_redis_client(settings), namespace=hot_namespace(settings))
    yield store
    await store.close()


@pytest.fixture
async def raw(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """A plain client to look at what the store wrote (and to damage it on purpose)."""
    client = create_redis_client(settings)
    yield client
    await client.aclose()


async def test_install_then_get_returns_the_sameworkflow_record(
    hot: RedisHotStore, raw: aioredis.Redis
) -> None:
    thread_id = unique_thread("hot")
    record = workflow_record(
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
    """A miss leaves only its fill lease behind, which expires within a minute."""
    thread_id = unique_thread("hot")
    assert await hot.get(thread_id) is None
    fields = await raw.hkeys(hot.key(thread_id))
    assert [field.startswith(b"r:") for field in fields] == [True]
    assert 0 < await raw.pttl(hot.key(thread_id)) <= 60_000


async def test_a_copy_of_another_schema_version_is_a_miss(
    hot: RedisHotStore, raw: aioredis.Redis
) -> None:
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, a=1), ttl_seconds=60)
    await raw.hset(hot.key(thread_id), "schema_version", CURRENT["workflow"] + 1)
    assert await hot.get(thread_id) is None


async def test_a_damaged_copy_is_a_miss_and_a_new_install_replaces_it(
    hot: RedisHotStore, raw: aioredis.Redis
) -> None:
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, a=1), ttl_seconds=60)
    await raw.hset(hot.key(thread_id), "s:a", "{not json")
    assert await hot.get(thread_id) is None
    assert await hot.install(workflow_record(thread_id, a=1), ttl_seconds=60)
    assert await hot.get(thread_id) == workflow_record(thread_id, a=1)


# --------------------------------------------------------------------------- write intents


async def test_an_intent_on_an_uncached_thread_creates_an_entry_that_expires(
    hot: RedisHotStore, raw: aioredis.Redis
) -> None:
    thread_id = unique_thread("hot")
    await hot.begin_write(thread_id, bound_ms=1000, ttl_seconds=60)
    assert (await hot.read(thread_id)).pending
    assert 55 <= await raw.ttl(hot.key(thread_id)) <= 60


async def test_an_intent_keeps_an_expiring_entry_until_its_deadline(
    hot: RedisHotStore, raw: aioredis.Redis
) -> None:
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, s="v1"), ttl_seconds=1)
    await hot.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=1)
    assert 55 <= await raw.ttl(hot.key(thread_id)) <= 60


# --------------------------------------------------------------------------- namespaces


def _store_settings(stack_env: dict[str, str], **values: object) -> Settings:
    return Settings.model_validate(
        {"cosmos_endpoint": stack_env["COSMOS_ENDPOINT"], "redis_url": stack_env["REDIS_URL"]}
        | values
    )


def test_the_namespace_names_the_cold_store_and_no_secret(stack_env: dict[str, str]) -> None:
    # Two account keys (base64 of 64 bytes, as Azure's are).
    key_1, key_2 = (base64.b64encode(bytes([n]) * 64).decode() for n in (1, 2))
    cosmos = _store_settings(stack_env, cosmos_key=key_1)
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
    assert hot_namespace(_store_settings(stack_env, cosmos_key=key_2)) == hot_namespace(cosmos)
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
    first = RedisHotStore(
        create_redis_client(first_settings), namespace=hot_namespace(first_settings)
    )
    second = RedisHotStore(
        create_redis_client(second_settings), namespace=hot_namespace(second_settings)
    )
    try:
        thread_id = unique_thread("hot")
        await first.install(workflow_record(thread_id, 5, s="first"), ttl_seconds=60)
        assert await second.get(thread_id) is None
        assert await second.install(workflow_record(thread_id, 1, s="second"), ttl_seconds=60)
        assert await first.get(thread_id) == workflow_record(thread_id, 5, s="first")
        assert await second.get(thread_id) == workflow_record(thread_id, 1, s="second")
        held = await first.acquire_lock(thread_id, ttl_ms=10_000)
        assert held is not None and await second.acquire_lock(thread_id, ttl_ms=10_000)

        checkpoint = StoredCheckpoint(
            thread_id, "", "0001", None, ("json", b"{}"), {}, {}, blobs={}, writes=[]
        )
        first_cache = RedisCheckpointCache(
            raw,
            namespace=hot_namespace(first_settings),
            ttl_seconds=first_settings.state_hot_ttl_seconds,
        )
        second_cache = RedisCheckpointCache(
            raw,
            namespace=hot_namespace(second_settings),
            ttl_seconds=second_settings.state_hot_ttl_seconds,
        )
        await first_cache.advance(checkpoint, [])
        assert (await first_cache.lookup(thread_id, "", lease=False)).checkpoint is not None
        assert (await second_cache.lookup(thread_id, "", lease=False)).checkpoint is None
    finally:
        await first.close()
        await second.close()


async def test_fencing_tokens_stay_monotonic_when_redis_loses_its_data(
    tmp_path: Path, stack_env: dict[str, str]
) -> None:
    server = RedisServer(port=free_port(), workdir=tmp_path)
    server.start()
    try:
        settings = _settings(server.url, stack_env)
        store = RedisHotStore(create_redis_client(settings), namespace=hot_namespace(settings))
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
    thread_id = unique_thread("hot")
    await hot.install(workflow_record(thread_id, a=1), ttl_seconds=60)
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
    store = RedisHotStore(create_redis_client(settings), namespace=hot_namespace(settings))
    try:
        with pytest.raises(BackendUnavailable) as raised:
            await store.get(unique_thread("hot"))
        assert raised.value.backend == "redis"
        with pytest.raises(BackendUnavailable):
            await store.acquire_lock("case_8842", ttl_ms=1000)
        health = await store.health()
        assert (health.name, health.up) == ("redis", False)
    finally:
        await store.close()


async def test_an_event_append_retried_after_a_lost_reply_is_stored_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = create_redis_client(settings)
    events = RedisEventLog(
        client, namespace=hot_namespace(settings), max_events=100, ttl_seconds=60
    )
    replies_lost = 0

    async def lands_then_times_out(*args: Any, **kwargs: Any) -> Any:
        nonlocal replies_lost
        stored = await run_script(*args, **kwargs)
        if replies_lost < 2:
            replies_lost += 1
            raise RedisTimeoutError("reply lost after the script ran")
        return stored

    monkeypatch.setattr(redis_client, "run_script", lands_then_times_out)
    thread = unique_thread("events")
    event_id = await events.append(thread, {"n": 1})
    assert replies_lost == 2
    stored = await events.read(thread)
    assert [(e.id, e.data) for e in stored] == [(event_id, {"n": 1})]

    # Every try failing is the tier's failure, typed.
    async def down(*_args: Any, **_kwargs: Any) -> Any:
        raise RedisTimeoutError("down")

    monkeypatch.setattr(redis_client, "run_script", down)
    with pytest.raises(BackendUnavailable):
        await events.append(thread, {"n": 2})
    await client.aclose()


async def test_an_event_append_whose_first_try_lands_after_its_retry_is_stored_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first try that timed out may still reach Redis after the retry ran: its bytes held
    up in the network or a proxy (Azure Managed Redis's) while the retry went on a new
    connection. Whichever runs second must find the other's token, the first try too."""
    client = create_redis_client(settings)
    events = RedisEventLog(
        client, namespace=hot_namespace(settings), max_events=100, ttl_seconds=60
    )
    held: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    async def first_try_late(*args: Any, **kwargs: Any) -> Any:
        if not held:
            held.append((args, kwargs))  # on its way, not yet run
            raise RedisTimeoutError("no reply in time")
        stored = await run_script(*args, **kwargs)
        late_args, late_kwargs = held[0]
        await run_script(*late_args, **late_kwargs)  # the first try reaches Redis now
        return stored

    monkeypatch.setattr(redis_client, "run_script", first_try_late)
    thread = unique_thread("events")
    try:
        event_id = await events.append(thread, {"n": 1})
        stored = await events.read(thread)
        assert [(e.id, e.data) for e in stored] == [(event_id, {"n": 1})]
    finally:
        await client.aclose()


async def test_the_one_command_fence_check_leaves_a_refused_writers_fence_as_it_was(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """The fence is set and read in one command: a writer it refuses must not leave its
    token behind, neither where Redis holds no fence nor where it holds a higher one."""
    settings = _settings(own_redis.url, stack_env)
    client = create_redis_client(settings)
    cache = RedisCheckpointCache(client, namespace=hot_namespace(settings), ttl_seconds=60)
    log = RedisWriteBehindLog(client, cache)
    thread_id = unique_thread("fenced")
    fence = hot_key(thread_id, "wb-fence", namespace=cache.namespace)
    write = StoredWrite("task-1", "", 0, "messages", ("json", b'"hello"'))
    try:
        with pytest.raises(FenceUnknown):
            await log.append_writes(thread_id, "", "c1", [write], upsert=False, fence=5)
        assert await client.exists(fence) == 0
        await log.append_writes(thread_id, "", "c1", [write], upsert=False, fence=5, fence_checked=True)  # fmt: skip
        await client.expire(fence, 30)
        with pytest.raises(StaleFencingToken) as refused:
            await log.append_writes(thread_id, "", "c1", [write], upsert=False, fence=4)
        assert (refused.value.presented, refused.value.highest) == (4, 5)
        assert await client.get(fence) == b"5"
        await log.append_writes(thread_id, "", "c1", [write], upsert=True, fence=5)  # the same
        assert await client.get(fence) == b"5"
        assert 30 < await client.ttl(fence) <= 60  # renewed by the write it let through
        assert len(await log.read(thread_id, count=10)) == 2
    finally:
        await client.aclose()


async def test_an_event_append_costs_the_server_these_commands(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """15 event appends a case (issue #16): each looks for itself among the stream's newest
    entries, the first try too (it may land after its retry)."""
    settings = _settings(own_redis.url, stack_env)  # nobody else's commands on this server
    client = create_redis_client(settings)
    counters = create_redis_client(settings)
    events = RedisEventLog(
        client, namespace=hot_namespace(settings), max_events=100, ttl_seconds=60
    )
    thread = unique_thread("events")
    try:
        first = await events.append(thread, {"n": 1})  # the script loaded
        await counters.config_resetstat()
        second = await events.append(thread, {"n": 2})
        assert await _server_commands(counters) == {
            "evalsha": 1,
            "xrevrange": 1,
            "xadd": 1,
            "expire": 1,
        }
        stored = await events.read(thread)
        assert [(e.id, e.data) for e in stored] == [(first, {"n": 1}), (second, {"n": 2})]
        key = hot_key(thread, EVENTS_KIND, namespace=hot_namespace(settings))
        assert 0 < await counters.ttl(key) <= 60
    finally:
        await counters.aclose()
        await client.aclose()


async def test_misses_share_one_fill_lease_instead_of_piling_up_fields(
    hot: RedisHotStore, raw: aioredis.Redis
) -> None:
    """On an entry a write intent hides (up to STATE_LOCK_TTL_MS), or of a thread that does
    not exist (60 s), every miss added a lease field and every read returns the whole hash:
    after ~9,400 misses a read (an HGETALL, blocking Redis) took 12.7 ms instead of 0.35."""
    hidden, unknown = unique_thread("leases"), unique_thread("leases")
    await hot.begin_write(hidden, bound_ms=30_000, ttl_seconds=60)  # a writer in flight
    for _ in range(500):
        assert (await hot.read(hidden)).lease is not None
        assert (await hot.read(unknown)).lease is not None
    assert await raw.hlen(hot.key(hidden)) <= 2  # the intent and a lease
    assert await raw.hlen(hot.key(unknown)) <= 1


async def _server_commands(client: aioredis.Redis) -> dict[str, int]:
    """What the server ran since its counters were reset, scripts' own commands included."""
    stats = await client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.removeprefix("cmdstat_").split("|")[0] not in ("info", "config")
    }


async def test_a_hit_and_a_write_cost_the_server_these_commands(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """A case's record reads are mostly hits and each of its writes is an intent and an
    install (issue #16 counts the server's commands per case): a hit needs no clock, and an
    install reads the version and every intent's deadline in one command."""
    settings = _settings(own_redis.url, stack_env)  # nobody else's commands on this server
    store = RedisHotStore(create_redis_client(settings), namespace=hot_namespace(settings))
    counters = create_redis_client(settings)
    thread_id = unique_thread("counted")
    try:
        await store.install(workflow_record(thread_id, 1, s="v1"), ttl_seconds=60)
        # Another writer's intent in flight: the install keeps it, reading its deadline.
        other = await store.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
        await store.abandon_write(other)
        assert (await store.read(thread_id)).record is not None  # the script loaded
        await counters.config_resetstat()
        assert (await store.read(thread_id)).record is not None
        assert await _server_commands(counters) == {"evalsha": 1, "hgetall": 1}

        other = await store.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
        intent = await store.begin_write(thread_id, bound_ms=LIVE_MS, ttl_seconds=60)
        await counters.config_resetstat()
        record = workflow_record(thread_id, 2, s="v2")
        assert await store.install(record, ttl_seconds=60, intent=intent, written=True)
        assert await _server_commands(counters) == {
            "evalsha": 1,
            "hkeys": 1,
            "hmget": 1,
            "del": 1,
            "hset": 2,  # the record, then the other writer's intent kept
            "expire": 1,
        }
        await store.abandon_write(other)
        assert await store.get(thread_id) == record
    finally:
        await counters.aclose()
        await store.close()


async def test_an_append_to_a_listed_thread_costs_the_server_these_commands(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """A write-behind append (issue #16: 14 a case) checks and renews the fence with one
    command, and lists a thread already listed without reading the server's clock."""
    settings = _settings(own_redis.url, stack_env)  # nobody else's commands on this server
    client = create_redis_client(settings)
    cache = RedisCheckpointCache(client, namespace=hot_namespace(settings), ttl_seconds=60)
    log = RedisWriteBehindLog(client, cache)
    counters = create_redis_client(settings)
    thread_id = unique_thread("counted")
    write = StoredWrite("task-1", "", 0, "messages", ("json", b'"hello"'))
    try:
        # The first: checked against the durable fence, it sets Redis's; the thread listed.
        await log.append_writes(thread_id, "", "c1", [write], upsert=False, fence=5, fence_checked=True)  # fmt: skip
        since = await counters.zscore(f"{{wb:{cache.namespace}}}:since", thread_id)
        await counters.config_resetstat()
        await log.append_writes(thread_id, "", "c1", [write], upsert=True, fence=7)
        commands = await _server_commands(counters)
        assert commands == {
            "evalsha": 2,  # the append, then the listing (another slot)
            "get": 1,  # the expiring mark: none
            "set": 1,  # the fence raised and renewed, what it held read at once
            "ttl": 1,  # the cache entry's writes (`add_writes`)
            "hget": 1,
            "hset": 1,
            "hdel": 1,
            "del": 1,  # the entry's other formats
            "xadd": 1,
            # Listed already: its score bumped, its `since` kept, the server's clock unread.
            "zincrby": 1,
            "incrby": 1,  # the entry counted
        }
        fence = hot_key(thread_id, "wb-fence", namespace=cache.namespace)
        assert await counters.get(fence) == b"7"
        assert 0 < await counters.ttl(fence) <= 60
        assert await counters.zscore(f"{{wb:{cache.namespace}}}:since", thread_id) == since
        assert await counters.zscore(f"{{wb:{cache.namespace}}}:dirty", thread_id) == 2
        assert await counters.get(f"{{wb:{cache.namespace}}}:entries") == b"2"
    finally:
        await counters.aclose()
        await client.aclose()
