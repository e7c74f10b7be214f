"""A write-behind append is sent once (a lost reply is not resent), so it must not go out
on a pooled connection the server already closed while it sat idle (a restart, a
failover, CLIENT KILL, an idle timeout): nothing of it would reach Redis, and the put
would fall back to the cold tier on every worker, one pooled connection after another."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint

from devstack import RedisServer
from state.ports import StoredWrite
from tests.integration.test_hot_values import checkpoint
from tests.integration.test_write_behind import open_write_behind, settings_for


async def _drop_client_connections(url: str) -> None:
    """What a restart or failover does to every client: the server closes its sockets."""
    admin = aioredis.Redis.from_url(url)
    try:
        await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    finally:
        await admin.aclose()
    await asyncio.sleep(0.1)  # the FIN reaches the client


async def test_an_append_on_a_connection_the_server_closed_reaches_redis(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    async with open_write_behind(settings_for(stack_env, "postgres", own_redis.url)) as tiers:
        thread_id = f"closed-{uuid.uuid4().hex[:8]}"
        checkpoint_id = checkpoint(thread_id, 1).checkpoint_id
        await tiers.cache.advance(checkpoint(thread_id, 1), [])
        log = tiers.flusher.log
        write = StoredWrite("task-1", "", 0, "chat", ("json", b'"w"'))
        await log.append_writes(thread_id, "", checkpoint_id, [write], upsert=False, fence=None)
        await _drop_client_connections(own_redis.url)
        # Before: BackendUnavailable("Connection closed by server"), nothing sent.
        await log.append_writes(thread_id, "", checkpoint_id, [write], upsert=True, fence=None)
        assert len(await log.read(thread_id, count=100)) == 2


async def test_a_write_behind_put_after_a_redis_restart_stays_on_the_hot_path(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    async with open_write_behind(settings_for(stack_env, "postgres", own_redis.url)) as tiers:
        saver = tiers.saver
        thread_id = f"closed-{uuid.uuid4().hex[:8]}"
        latest: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        first = create_checkpoint(empty_checkpoint(), None, 1)
        at = await saver.aput(latest, first, {"source": "loop", "step": 1}, {})
        await _drop_client_connections(own_redis.url)
        errors_before = tiers.cache.stats.errors
        await saver.aput(at, create_checkpoint(first, None, 2), {"source": "loop", "step": 2}, {})
        assert tiers.cache.stats.errors == errors_before, "the put saw Redis failing"
        # Logged for the flusher, not written through to the cold tier.
        entries = await tiers.flusher.log.read(thread_id, count=100)
        assert len(entries) == 2, f"{len(entries)} puts logged: the second went to the cold tier"
