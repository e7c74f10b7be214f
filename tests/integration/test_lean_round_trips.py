"""The hot path's lean round trips (`state.hot.redis_client.round_trip`, `run_script`) against a
real redis-server: every converted call site after the server lost its scripts, under RESP3
and RESP2; a connection a cancelled or timed-out round trip leaves behind; a batch sent again
after its reply was lost; a send-once batch on a pooled connection the server closed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis
from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint

from devstack import RedisServer
from state.checkpoint import TieredCheckpointSaver
from state.errors import BackendUnavailable
from state.hot.redis_client import (
    FAIL_FAST_SECONDS,
    create_blocking_redis_client,
    create_redis_client,
    hot_namespace,
)
from state.hot.redis_events import RedisEventLog
from state.hot.redis_store import RedisHotStore
from state.hot.redis_write_behind import RedisWriteBehindLog
from state.ports import StoredWrite, WritesPut
from tests.integration.test_hot_values import checkpoint, grown, log_of
from tests.integration.test_write_behind import (
    WriteBehind,
    config,
    open_write_behind,
    settings_for,
)
from tests.support.records import unique_thread, workflow_record

# A script that keeps the server busy for ARGV[1] ms (DEBUG SLEEP is refused here).
BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
while true do
  local n = redis.call('TIME')
  if n[1] * 1000000 + n[2] - start > tonumber(ARGV[1]) * 1000 then break end
end
return 1
"""


def _url(stack_env: dict[str, str], protocol: int | None) -> str:
    """The stack's Redis; `None`: redis-py's default (RESP3 on the wire, RESP2 shapes)."""
    url = stack_env["REDIS_URL"]
    return url if protocol is None else f"{url}?protocol={protocol}"


@pytest.fixture(params=[None, 3, 2], ids=["default", "resp3", "resp2"])
async def tiers(
    request: pytest.FixtureRequest, stack_env: dict[str, str]
) -> AsyncIterator[WriteBehind]:
    settings = settings_for(stack_env, "postgres", _url(stack_env, request.param))
    async with open_write_behind(settings) as opened:
        yield opened


async def test_every_converted_call_site_reloads_lost_scripts(tiers: WriteBehind) -> None:
    thread_id = f"lean-{uuid.uuid4().hex[:8]}"
    cache, flush = tiers.cache, tiers.redis.script_flush
    await flush()
    # advance with a new epoch: SETs and the advance script in one round trip.
    await cache.advance(checkpoint(thread_id, 1), [grown(1)])
    await flush()
    await cache.advance(checkpoint(thread_id, 2), [grown(2)])
    await flush()
    found = (await cache.lookup(thread_id, "", lease=False)).checkpoint
    assert found is not None and found.checkpoint_id == checkpoint(thread_id, 2).checkpoint_id
    assert found.blobs == {"chat": grown(2).value}
    await flush()
    found = (await cache.lookup(thread_id, "", lease=False, with_history=False)).checkpoint
    assert found is not None and found.blobs == {"chat": grown(2).value}
    await flush()
    # HGETALL and the history lease script in one round trip.
    await cache.history(thread_id, "", checkpoint(thread_id, 2).checkpoint_id, ["chat"])
    await flush()
    write = StoredWrite("task-1", "", 0, "chat", ("json", b'"w"'))
    await cache.add_writes(
        thread_id, "", checkpoint(thread_id, 2).checkpoint_id, [write], upsert=False
    )
    await flush()
    # A namespace of its own: read through the script that checks the namespace index.
    sub = dataclasses.replace(checkpoint(thread_id, 1), checkpoint_ns="sub")
    await cache.advance(sub, [grown(1)])
    await flush()
    found = (await cache.lookup(thread_id, "sub", lease=False)).checkpoint
    assert found is not None and found.blobs == {"chat": grown(1).value}
    await flush()
    missing = f"lean-{uuid.uuid4().hex[:8]}"
    leased = await cache.lookup(missing, "", lease=True)
    assert leased.lease is not None
    assert cache.stats.errors == 0


async def test_the_record_store_and_event_log_reload_lost_scripts(
    stack_env: dict[str, str],
) -> None:
    for protocol in (None, 3, 2):  # asked for: XREAD answers in its own shapes
        settings = settings_for(stack_env, "postgres", _url(stack_env, protocol))
        client = create_redis_client(settings)
        hot = RedisHotStore(client, namespace=hot_namespace(settings))
        events = RedisEventLog(
            client, namespace=hot_namespace(settings), max_events=10, ttl_seconds=60
        )
        try:
            thread_id = unique_thread("lean")
            await client.script_flush()
            assert (await hot.read(thread_id)).record is None
            await client.script_flush()
            intent = await hot.begin_write(thread_id, bound_ms=60_000, ttl_seconds=60)
            await client.script_flush()
            assert await hot.install(workflow_record(thread_id, a=1), ttl_seconds=60, intent=intent)
            await client.script_flush()
            assert await hot.get(thread_id) == workflow_record(thread_id, a=1)
            await client.script_flush()
            lock = await hot.acquire_lock(thread_id, ttl_ms=5_000)
            assert lock is not None
            await client.script_flush()
            assert await hot.renew_lock(lock)
            await client.script_flush()
            assert await hot.release_lock(lock)
            await client.script_flush()
            event_id = await events.append(thread_id, {"n": 1})
            assert [e.id for e in await events.read(thread_id)] == [event_id]
            await client.script_flush()
            await hot.invalidate(thread_id)
        finally:
            await client.aclose()


@pytest.mark.parametrize("protocol", [None, 3, 2])
def test_a_sync_append_reloads_lost_scripts(
    stack_env: dict[str, str], protocol: int | None
) -> None:
    settings = settings_for(stack_env, "postgres", _url(stack_env, protocol))
    with TieredCheckpointSaver.open_sync(settings) as saver:
        from langgraph.checkpoint.base import empty_checkpoint

        base = config()
        thread_id = base["configurable"]["thread_id"]
        ckpt = empty_checkpoint()
        ckpt["channel_values"] = {"messages": ["a" * 2000]}
        ckpt["channel_versions"] = {"messages": saver.get_next_version(None, None)}
        stored = saver.put(base, ckpt, {"source": "input", "step": -1}, ckpt["channel_versions"])
        url = settings.redis_url
        assert url is not None
        with redis.Redis.from_url(url.get_secret_value()) as raw:
            raw.script_flush()
        saver.put_writes(stored, [("messages", ["b"])], "task-1")
        latest = saver.get_tuple(config(thread_id))
        assert latest is not None and latest.pending_writes == [("task-1", "messages", ["b"])]


# --------------------------------------------------------------------------- a lost reply


async def _busy(url: str, ms: int) -> asyncio.Task[object]:
    """The server busy for `ms` (longer than the client's 2 s socket timeout): a command sent
    meanwhile runs once it is free, after its sender gave up waiting for the reply."""
    client = aioredis.Redis.from_url(url)

    async def run() -> object:
        try:
            return await client.eval(BUSY, 0, ms)
        finally:
            await client.aclose()

    task = asyncio.create_task(run())
    await asyncio.sleep(0.2)
    return task


async def _thread_at_step_one(tiers: WriteBehind) -> tuple[RedisWriteBehindLog, str, str]:
    """The write-behind log, and a thread of it at a cached checkpoint to append writes to."""
    thread_id = f"lean-{uuid.uuid4().hex[:8]}"
    await tiers.cache.advance(checkpoint(thread_id, 1), [])
    return log_of(tiers), thread_id, checkpoint(thread_id, 1).checkpoint_id


WRITE = StoredWrite("task-1", "", 0, "chat", ("json", b'"w"'))


async def test_a_write_behind_append_whose_reply_was_lost_is_logged_once(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    async with open_write_behind(settings_for(stack_env, "postgres", own_redis.url)) as tiers:
        log, thread_id, checkpoint_id = await _thread_at_step_one(tiers)
        write = WRITE
        # Its scripts loaded, and a connection ready, before the server is busy.
        warm = f"lean-{uuid.uuid4().hex[:8]}"
        await tiers.cache.advance(checkpoint(warm, 1), [])
        await log.append_writes(warm, "", checkpoint_id, [write], upsert=False, fence=None)
        await tiers.redis.set(f"{{wb:{tiers.cache.namespace}}}:entries", 0)
        busy = await _busy(own_redis.url, 2_500)
        # An outcome left unknown may be reported; a duplicate may not be made.
        with contextlib.suppress(BackendUnavailable):
            await log.append_writes(thread_id, "", checkpoint_id, [write], upsert=False, fence=None)
        await busy
        # The timeout made this process rest the server (`ServerCircuit`): read after that.
        await asyncio.sleep(FAIL_FAST_SECONDS)
        entries = await log.read(thread_id, count=100)
        assert [type(e.op) for e in entries] == [WritesPut]
        assert int(await tiers.redis.get(f"{{wb:{tiers.cache.namespace}}}:entries") or 0) == 1


async def _drop_client_connections(url: str) -> None:
    """What a restart or failover does to every client: the server closes its sockets."""
    admin = aioredis.Redis.from_url(url)
    try:
        await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    finally:
        await admin.aclose()
    await asyncio.sleep(0.1)  # the FIN reaches the client


async def test_an_append_on_a_connection_the_server_closed_while_idle_reaches_redis(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """An append is sent once, so it must not go out on a pooled connection the server
    closed while it sat idle (a restart, a failover, an idle timeout): nothing of it
    would reach Redis."""
    async with open_write_behind(settings_for(stack_env, "postgres", own_redis.url)) as tiers:
        log, thread_id, checkpoint_id = await _thread_at_step_one(tiers)
        await log.append_writes(thread_id, "", checkpoint_id, [WRITE], upsert=False, fence=None)
        await _drop_client_connections(own_redis.url)
        # Before: BackendUnavailable("Connection closed by server"), nothing sent.
        await log.append_writes(thread_id, "", checkpoint_id, [WRITE], upsert=True, fence=None)
        assert len(await log.read(thread_id, count=100)) == 2


async def test_a_write_behind_put_after_a_redis_restart_stays_on_the_hot_path(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    async with open_write_behind(settings_for(stack_env, "postgres", own_redis.url)) as tiers:
        thread_id = f"lean-{uuid.uuid4().hex[:8]}"
        first = create_checkpoint(empty_checkpoint(), None, 1)
        at = await tiers.saver.aput(config(thread_id), first, {"source": "loop", "step": 1}, {})
        await _drop_client_connections(own_redis.url)
        errors_before = tiers.cache.stats.errors
        second = create_checkpoint(first, None, 2)
        await tiers.saver.aput(at, second, {"source": "loop", "step": 2}, {})
        assert tiers.cache.stats.errors == errors_before, "the put saw Redis failing"
        # Logged for the flusher, not written through to the cold tier.
        entries = await tiers.flusher.log.read(thread_id, count=100)
        assert len(entries) == 2, f"{len(entries)} puts logged: the second went to the cold tier"


async def test_a_lock_whose_reply_was_lost_is_not_left_held_by_nobody(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    settings = settings_for(stack_env, "postgres", own_redis.url)
    client = create_redis_client(settings)
    hot = RedisHotStore(client, namespace=hot_namespace(settings))
    try:
        name = unique_thread("lean-lock")
        # Its script loaded, and a connection ready, before the server is busy.
        warm = await hot.acquire_lock(unique_thread("lean-lock"), ttl_ms=1_000)
        assert warm is not None and await hot.release_lock(warm)
        busy = await _busy(own_redis.url, 2_500)
        try:
            lock = await hot.acquire_lock(name, ttl_ms=60_000)
        except BackendUnavailable:
            lock = None  # an outcome left unknown may be reported
        await busy
        await asyncio.sleep(FAIL_FAST_SECONDS)  # as above: the server rested
        if lock is None:
            # Not ours: then nobody holds it, and the next caller gets it at once.
            assert await hot.acquire_lock(name, ttl_ms=60_000) is not None
    finally:
        await client.aclose()


async def test_a_sync_append_whose_reply_was_lost_is_logged_once(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    settings = settings_for(stack_env, "postgres", own_redis.url)
    async with open_write_behind(settings) as tiers:
        blocking = create_blocking_redis_client(settings)
        log = RedisWriteBehindLog(tiers.redis, tiers.cache, blocking_client=blocking)
        thread_id = f"lean-{uuid.uuid4().hex[:8]}"
        checkpoint_id = checkpoint(thread_id, 1).checkpoint_id
        await tiers.cache.advance(checkpoint(thread_id, 1), [])
        write = StoredWrite("task-1", "", 0, "chat", ("json", b'"w"'))
        warm = f"lean-{uuid.uuid4().hex[:8]}"
        await tiers.cache.advance(checkpoint(warm, 1), [])
        log.append_writes_blocking(warm, "", checkpoint_id, [write], upsert=False, fence=None)
        busy = await _busy(own_redis.url, 2_500)
        with contextlib.suppress(BackendUnavailable):
            await asyncio.to_thread(
                log.append_writes_blocking,
                thread_id,
                "",
                checkpoint_id,
                [write],
                upsert=False,
                fence=None,
            )
        await busy
        await asyncio.sleep(FAIL_FAST_SECONDS)  # as above: the server rested
        assert [type(e.op) for e in await log.read(thread_id, count=100)] == [WritesPut]
        blocking.close()


async def test_round_trips_cancelled_mid_read_leave_no_reply_for_the_next_caller(
    stack_env: dict[str, str],
) -> None:
    """Cancelled at random points of their reads (a large reply takes several), no round
    trip hands another's reply on: every one that completes reads its own keys."""
    from state.hot import redis_client

    client = create_redis_client(settings_for(stack_env, "postgres", stack_env["REDIS_URL"]))
    prefix = unique_thread("lean-cancel")
    keys = [f"{prefix}:{i}" for i in range(50)]
    try:
        for i, key in enumerate(keys):
            await client.set(key, b"x" * (i * 20_000) + f"|{i}".encode())
        wrong = completed = 0

        async def one(i: int, within: float) -> None:
            nonlocal wrong, completed
            j = (i + 1) % len(keys)
            commands = [("GET", keys[i]), ("HGETALL", f"{prefix}:h"), ("GET", keys[j])]
            try:
                first, _, second = await asyncio.wait_for(
                    redis_client.round_trip(client, commands), within
                )
            except TimeoutError:
                return
            completed += 1
            wrong += not (first.endswith(b"|%d" % i) and second.endswith(b"|%d" % j))

        for attempt in range(10):
            await asyncio.gather(
                *(one(i, 0.001 + (i % 10) * 0.002 * attempt) for i in range(len(keys)))
            )
        for i in range(len(keys)):
            await one(i, 10)
        assert wrong == 0 and completed >= len(keys)
        pool = client.connection_pool
        assert not pool._in_use_connections  # type: ignore[attr-defined]
    finally:
        await client.delete(*keys)
        await client.aclose()
