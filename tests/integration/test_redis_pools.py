"""The Redis clients' connection pools, against a real redis-server of the test's own:
bounded (REDIS_MAX_CONNECTIONS), a full pool failing typed and quickly after a moment's
wait, and the event streams' waiting reads (XREAD BLOCK) on a pool of their own, so that
however many streams are open the tier's other commands still get connections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from devstack import RedisServer
from state.errors import BackendUnavailable
from state.factory import backends_for
from state.hot.redis_client import POOL_WAIT_SECONDS, create_redis_client, hot_namespace
from state.hot.redis_events import MAX_WAIT_MS
from state.hot.redis_store import RedisHotStore
from state.settings import Settings
from tests.support.records import unique_thread

# The app's default CASE_MAX_EVENT_STREAMS: as many streams as one worker serves at once.
OPEN_STREAMS = 100


def _settings(stack_env: dict[str, str], redis_url: str, **overrides: object) -> Settings:
    return Settings.model_validate(
        {
            "state_cold_backend": "postgres",
            "postgres_url": stack_env["POSTGRES_URL"],
            "redis_url": redis_url,
            **overrides,
        }
    )


async def _until(condition: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_open_event_streams_leave_connections_for_the_other_commands(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """As many waiting reads as a worker serves streams (each blocked at the server) took
    the whole shared pool: every other command of the tier (a record read, an event
    append) failed with "Too many connections" while they waited."""
    settings = _settings(stack_env, own_redis.url)
    admin = aioredis.Redis.from_url(own_redis.url)
    async with backends_for(settings) as backends:
        assert backends.events is not None and backends.hot is not None
        quiet = unique_thread("quiet")
        waiting = [
            asyncio.create_task(backends.events.read(quiet, wait_ms=MAX_WAIT_MS))
            for _ in range(OPEN_STREAMS)
        ]
        try:

            async def all_blocked() -> bool:
                clients = await admin.info("clients")
                return int(clients["blocked_clients"]) >= OPEN_STREAMS

            await _until(all_blocked)
            # While every one of them waits at the server (for MAX_WAIT_MS).
            other = unique_thread("other")
            assert await backends.events.append(other, {"n": 1})
            assert (await backends.hot.read(other)) is not None
        finally:
            found = await asyncio.gather(*waiting)
            await admin.aclose()
        assert found == [[]] * OPEN_STREAMS


async def test_a_full_pool_fails_typed_after_a_moment_and_a_connection_given_back_serves(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    settings = _settings(stack_env, own_redis.url, redis_max_connections=2)
    client = create_redis_client(settings)
    store = RedisHotStore(client, namespace=hot_namespace(settings))
    pool = client.connection_pool
    thread = unique_thread("pool")
    try:
        held = [await pool.get_connection() for _ in range(2)]
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await store.read(thread)
        # A moment's wait for a connection, then the tier's typed failure: no socket more.
        assert time.monotonic() - started < POOL_WAIT_SECONDS + 1.0
        assert len(pool._in_use_connections) + len(pool._available_connections) == 2
        # A connection given back while a command waits serves it.
        reading = asyncio.create_task(store.read(thread))
        await asyncio.sleep(0)
        await pool.release(held.pop())
        assert (await reading) is not None
        await pool.release(held.pop())
    finally:
        await store.close()


async def test_the_health_probe_measures_redis_not_a_full_pool(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """Every connection of the commands' pool in use (a burst): the health probe waited
    POOL_WAIT_SECONDS for one, then reported the hot tier down, though Redis answered.
    With Redis really stopped it is still reported down."""
    settings = _settings(stack_env, own_redis.url, redis_max_connections=2)
    async with backends_for(settings) as backends:
        hot = backends.hot
        assert isinstance(hot, RedisHotStore)
        pool = hot._client.connection_pool
        held = [await pool.get_connection() for _ in range(2)]
        try:
            busy = await hot.health()
            assert busy.up, busy.detail
            own_redis.stop()
            stopped = await hot.health()
            assert not stopped.up
        finally:
            for connection in held:
                await pool.release(connection)


async def test_a_connection_given_back_to_a_waiter_that_is_cancelled_serves_the_next_one(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """A connection given back wakes one waiting caller. That caller cancelled before it
    took the connection (an event stream whose client left) took the wake with it: the next
    waiter waited out POOL_WAIT_SECONDS and failed, the connection idle in the pool."""
    settings = _settings(stack_env, own_redis.url, redis_max_connections=1)
    client = create_redis_client(settings)
    pool = client.connection_pool
    try:
        held = await pool.get_connection()
        gone = asyncio.create_task(pool.get_connection())
        waiting = asyncio.create_task(pool.get_connection())
        await asyncio.sleep(0)  # both wait for a connection
        await pool.release(held)  # wakes `gone`, cancelled before it runs again
        assert not gone.done()
        gone.cancel()
        connection = await asyncio.wait_for(waiting, POOL_WAIT_SECONDS / 2)
        await pool.release(connection)
        with pytest.raises(asyncio.CancelledError):
            await gone
    finally:
        await client.aclose()
