"""A rolling deploy: workers of the old and the new code share Redis and the cold store.

For minutes both serve the same threads, so a turn may run on a new worker and the next
on an old one. Whatever either wrote, the other must read it or refuse it, never serve
an older state as the latest. The hot checkpoint entry is keyed by its format
(`cp{ENTRY_FORMAT}:`) while the write-behind log and the cold store are shared, so a bump
of the format must not leave each version serving its own, stale, entry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint

from devstack import RedisServer, free_port
from state.checkpoint import TieredCheckpointSaver
from state.factory import backends_for
from state.hot import redis_checkpoints
from state.hot.redis_checkpoints import RedisCheckpointCache
from state.ports import StoredBlob
from state.settings import Settings
from tests.chat_graph import chat_graph
from tests.faults.proxy import LoopbackProxy
from tests.integration.test_hot_copy_after_partition import DROPPED_WITHIN_SECONDS
from tests.integration.test_hot_values import checkpoint, epochs_of, grown, log_of
from tests.integration.test_write_behind import (
    COLD_BACKENDS,
    config,
    open_write_behind,
    settings_for,
)
from tests.support.records import unique_thread


@asynccontextmanager
async def open_worker(settings: Settings, mode: str) -> AsyncIterator[TieredCheckpointSaver]:
    """A worker's saver: write-behind (the log scripts) or write-through (the cache's)."""
    async with open_write_behind(settings) as tiers:
        if mode == "write-through":
            yield TieredCheckpointSaver(tiers.store, tiers.cache)
        else:
            yield tiers.saver
            await tiers.flusher.drain()


MODES = ["write-behind", "write-through"]
# +1: a new worker takes the next turn (each format drops its predecessor's entry); -1: an
# old one does, after a new one (each format drops its successor's: a rollback, or old
# workers still serving while new ones start).
STEPS = pytest.mark.parametrize("step", [1, -1], ids=["newer-format", "older-format"])


@pytest.mark.parametrize("backend", COLD_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@STEPS
async def test_a_turn_taken_by_a_neighbouring_entry_format_is_seen_by_the_other_workers(
    backend: str, mode: str, step: int, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(stack_env, backend, stack_env["REDIS_URL"])
    today = redis_checkpoints.ENTRY_FORMAT
    cfg = config()
    async with open_worker(settings, mode) as first, open_worker(settings, mode) as reader:
        await chat_graph(first).ainvoke({"messages": ["turn 1"]}, cfg, durability="async")
        assert await first.aget_tuple(cfg) is not None

        # The code of the neighbouring entry format takes the second turn.
        monkeypatch.setattr(redis_checkpoints, "ENTRY_FORMAT", today + step)
        async with open_worker(settings, mode) as other:
            await chat_graph(other).ainvoke({"messages": ["turn 2"]}, cfg, durability="async")
            second = await other.aget_tuple(cfg)
        assert second is not None
        monkeypatch.setattr(redis_checkpoints, "ENTRY_FORMAT", today)

        # Another worker of the first format (no memo of its own) picks the thread up: its
        # entry held turn 1, which it must not serve as the latest (nor resume from).
        latest = await reader.aget_tuple(cfg)
        assert latest is not None
        assert (
            latest.config["configurable"]["checkpoint_id"]
            == (second.config["configurable"]["checkpoint_id"])
        ), "a worker served the checkpoint from before the other format's turn"


@pytest.mark.parametrize("backend", COLD_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@STEPS
@pytest.mark.parametrize("change", ["put", "writes"])
async def test_a_put_or_writes_alone_by_a_neighbouring_entry_format_drop_the_other_entry(
    backend: str,
    mode: str,
    step: int,
    change: str,
    stack_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A turn both puts and writes: each of the two must drop the other format's entry by
    itself (a put with no writes: a state update; writes with no put: a task's results)."""
    settings = settings_for(stack_env, backend, stack_env["REDIS_URL"])
    today = redis_checkpoints.ENTRY_FORMAT
    thread = {"configurable": {"thread_id": unique_thread("deploy"), "checkpoint_ns": ""}}
    async with open_worker(settings, mode) as first, open_worker(settings, mode) as reader:
        at_first = await first.aput(thread, empty_checkpoint(), {"step": 0}, {})
        monkeypatch.setattr(redis_checkpoints, "ENTRY_FORMAT", today + step)
        async with open_worker(settings, mode) as other:
            if change == "put":
                changed = await other.aput(at_first, empty_checkpoint(), {"step": 1}, {})
            else:
                changed = at_first
                await other.aput_writes(at_first, [("a", "late")], "task")
        monkeypatch.setattr(redis_checkpoints, "ENTRY_FORMAT", today)

        latest = await reader.aget_tuple(thread)
        assert latest is not None
        assert (
            latest.config["configurable"]["checkpoint_id"]
            == (changed["configurable"]["checkpoint_id"])
        ), "a worker served the checkpoint from before the other format's put"
        if change == "writes":
            assert latest.pending_writes == [("task", "a", "late")], (
                "a worker served the checkpoint without the other format's writes"
            )


@pytest.mark.parametrize("backend", COLD_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@STEPS
async def test_a_thread_deleted_by_a_neighbouring_entry_format_is_gone_for_the_other_workers(
    backend: str, mode: str, step: int, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(stack_env, backend, stack_env["REDIS_URL"])
    today = redis_checkpoints.ENTRY_FORMAT
    thread_id = unique_thread("deploy")
    thread = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    async with open_worker(settings, mode) as first, open_worker(settings, mode) as reader:
        await first.aput(thread, empty_checkpoint(), {"step": 0}, {})
        assert await reader.aget_tuple(thread) is not None
        monkeypatch.setattr(redis_checkpoints, "ENTRY_FORMAT", today + step)
        async with open_worker(settings, mode) as other:
            await other.adelete_thread(thread_id)
        monkeypatch.setattr(redis_checkpoints, "ENTRY_FORMAT", today)

        assert await reader.aget_tuple(thread) is None, (
            "a worker served a checkpoint of a thread the other format deleted"
        )


@pytest.mark.parametrize("backend", COLD_BACKENDS)
@STEPS
async def test_a_lost_log_entry_takes_the_neighbouring_formats_cache_with_it(
    backend: str, step: int, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flusher of one format drops a lost entry: the entry the other format's workers
    read would otherwise still name the lost checkpoint as a parent Redis knows."""
    settings = settings_for(stack_env, backend, stack_env["REDIS_URL"])
    today = redis_checkpoints.ENTRY_FORMAT
    thread_id = unique_thread("deploy")
    async with open_write_behind(settings) as tiers:
        monkeypatch.setattr(redis_checkpoints, "ENTRY_FORMAT", today + step)
        await log_of(tiers).append_put(checkpoint(thread_id, 1), [grown(1)], fence=None)
        small = StoredBlob("chat", 2, ("bytes", b"small"))
        await log_of(tiers).append_put(checkpoint(thread_id, 2), [small], fence=None)
        await tiers.redis.delete(*await epochs_of(tiers, thread_id))  # evicted
        assert (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint is not None
        tiers.cache.epochs.forget(thread_id)  # the flusher holds none of the values

        monkeypatch.setattr(redis_checkpoints, "ENTRY_FORMAT", today)
        await tiers.flusher.flush_thread(thread_id)
        monkeypatch.setattr(redis_checkpoints, "ENTRY_FORMAT", today + step)
        assert (await tiers.cache.lookup(thread_id, "", lease=False)).checkpoint is None


@pytest.mark.parametrize("mode", MODES)
@STEPS
async def test_an_entry_a_partition_left_behind_goes_in_every_format_once_redis_answers(
    mode: str,
    step: int,
    stack_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker cut off from Redis writes its turn to the cold tier alone, and drops its
    entry once Redis answers (`test_hot_copy_after_partition`): the other format's entry,
    which the other version's workers are served, goes with it."""
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    proxy = LoopbackProxy(redis.port).start()
    direct = aioredis.from_url(redis.url)
    today = redis_checkpoints.ENTRY_FORMAT
    try:
        other = Settings.model_validate(
            {
                **settings_for(stack_env, "postgres", redis.url).model_dump(),
                "state_write_mode": mode,
            }
        )
        cut_off = Settings.model_validate(
            {**other.model_dump(), "redis_url": f"redis://127.0.0.1:{proxy.port}/0"}
        )
        async with backends_for(cut_off) as a_tiers, backends_for(other) as b_tiers:
            a = TieredCheckpointSaver.from_backends(a_tiers)
            b = TieredCheckpointSaver.from_backends(b_tiers)
            assert isinstance(b.cache, RedisCheckpointCache)
            thread_id = unique_thread("deploy")
            latest: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
            first = create_checkpoint(empty_checkpoint(), None, 1)
            at = await a.aput(latest, first, {"source": "loop", "step": 1}, {})
            await a.aflush(thread_id)
            seen = await b.aget_tuple(latest)
            assert seen is not None and seen.metadata["step"] == 1
            served = b.cache.key(thread_id, "")
            assert await direct.exists(served)

            monkeypatch.setattr(redis_checkpoints, "ENTRY_FORMAT", today + step)
            proxy.cut("reset")
            await a.aput(at, create_checkpoint(first, None, 2), {"source": "loop", "step": 2}, {})
            await a.aflush(thread_id)  # acknowledged: the cold tier has step 2
            proxy.restore()
            deadline = time.monotonic() + DROPPED_WITHIN_SECONDS
            while time.monotonic() < deadline:
                if not await direct.exists(served):
                    break
                await asyncio.sleep(0.1)
            monkeypatch.setattr(redis_checkpoints, "ENTRY_FORMAT", today)

            found = await b.aget_tuple(latest)
            assert found is not None
            assert found.metadata["step"] == 2, "a worker was served the step before the cut"
    finally:
        await direct.aclose()
        proxy.stop()
        redis.stop()
