"""Checkpointer calls cancelled midway, on real servers, for each cold backend.

LangGraph cancels a checkpointer call when its run is cancelled (a client that
disconnects, an `asyncio.timeout` around `ainvoke`), at whatever await the call is in.
A Redis command or a cold request cancelled there may still have been carried out, its
reply lost: the thread must then read the same everywhere, and no flush lock outlive
the call.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import Checkpoint, empty_checkpoint

from state.checkpoint import TieredCheckpointSaver
from state.checkpoint.saver import DURABILITY_KEY
from state.hot.redis_checkpoints import RedisCheckpointCache
from state.hot.redis_client import hot_namespace
from tests.integration.test_write_behind import (
    COLD_BACKENDS,
    WriteBehind,
    open_write_behind,
    settings_for,
)

# The flush lock's TTL here: a lock left behind holds a flush up this long.
LOCK_TTL_MS = 2_000
# A flush of one small thread with no lock left behind takes milliseconds.
PROMPT_SECONDS = 1.0
# The round trip a slowed call takes.
SLOW_SECONDS = 0.05
# Channels or writes past what one write-behind log entry holds (`LogEntryTooLarge`).
MANY_VALUES = 5_000


@asynccontextmanager
async def opened(stack_env: dict[str, str], backend: str, mode: str) -> AsyncIterator[WriteBehind]:
    """The tiers in write-behind mode, or with a write-through saver over the same ones."""
    settings = settings_for(stack_env, backend, stack_env["REDIS_URL"])
    async with open_write_behind(settings) as tiers:
        if mode == "write-through":
            cache = RedisCheckpointCache(
                tiers.redis,
                namespace=hot_namespace(settings),
                ttl_seconds=settings.state_hot_ttl_seconds,
            )
            tiers.saver, tiers.cache = TieredCheckpointSaver(tiers.store, cache), cache
        yield tiers


def thread_config(thread_id: str, checkpoint_id: str | None = None, **extra: Any) -> RunnableConfig:
    configurable: dict[str, Any] = {"thread_id": thread_id, "checkpoint_ns": "", **extra}
    if checkpoint_id is not None:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


def step(saver: TieredCheckpointSaver, text: str) -> Checkpoint:
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"messages": [text * 200]}
    checkpoint["channel_versions"] = {"messages": saver.get_next_version(None, None)}
    return checkpoint


async def put(
    saver: TieredCheckpointSaver, thread_id: str, parent: str | None, text: str, **extra: Any
) -> str:
    checkpoint = step(saver, text)
    await saver.aput(
        thread_config(thread_id, parent, **extra),
        checkpoint,
        {"source": "loop", "step": 0},
        checkpoint["channel_versions"],
    )
    return checkpoint["id"]


def slowed(call: Callable[..., Any], *, sent: bool) -> tuple[Callable[..., Any], asyncio.Event]:
    """`call` with a slow round trip, and an event set midway, where the caller is
    cancelled: once the server carried the call out (`sent`: its reply on the way), or
    before it was sent (the call waiting for a pooled connection)."""
    reached = asyncio.Event()

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if sent:
            result = await call(*args, **kwargs)
            reached.set()
            await asyncio.sleep(SLOW_SECONDS)
            return result
        reached.set()
        await asyncio.sleep(SLOW_SECONDS)
        return await call(*args, **kwargs)

    return wrapper, reached


async def cancelled_at(reached: asyncio.Event, call: Any) -> None:
    task = asyncio.ensure_future(call)
    await asyncio.wait_for(reached.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def reads(tiers: WriteBehind, thread_id: str) -> tuple[str | None, list[str], str | None]:
    """The thread's latest as a read gets it, its listing, and the cold tier's latest."""
    latest = await tiers.saver.aget_tuple(thread_config(thread_id))
    listed = [found.checkpoint["id"] async for found in tiers.saver.alist(thread_config(thread_id))]
    cold = await tiers.store.get_checkpoint(thread_id, "", None)
    return (
        None if latest is None else latest.checkpoint["id"],
        listed,
        None if cold is None else cold.checkpoint_id,
    )


@pytest.mark.parametrize("backend", COLD_BACKENDS)
@pytest.mark.parametrize("stall", ["cold reply lost", "hot advance"])
async def test_a_write_through_put_cancelled_after_its_cold_write_is_read_as_the_latest(
    stack_env: dict[str, str], backend: str, stall: str
) -> None:
    """Cancelled once the cold tier has the checkpoint (its reply lost, or the hot copy's
    advance under way), the put is the thread's latest for every reader: the hot copy,
    left showing its parent, is not served."""
    async with opened(stack_env, backend, "write-through") as tiers:
        saver = tiers.saver
        thread_id = f"cx-{uuid.uuid4().hex[:12]}"
        first = await put(saver, thread_id, None, "a")
        assert saver.cache is not None
        if stall == "cold reply lost":
            tiers.store.put_checkpoint, reached = slowed(tiers.store.put_checkpoint, sent=True)  # type: ignore[method-assign]
        else:
            saver.cache.advance, reached = slowed(saver.cache.advance, sent=False)  # type: ignore[method-assign]
        checkpoint = step(saver, "b")
        await cancelled_at(
            reached,
            saver.aput(
                thread_config(thread_id, first),
                checkpoint,
                {"source": "loop", "step": 1},
                checkpoint["channel_versions"],
            ),
        )

        latest, listed, cold = await reads(tiers, thread_id)
        assert cold == checkpoint["id"]
        assert (latest, listed) == (cold, [cold, first])


@pytest.mark.parametrize("backend", COLD_BACKENDS)
@pytest.mark.parametrize("stall", ["cold reply lost", "hot write"])
async def test_write_through_writes_cancelled_after_their_cold_write_are_read_with_their_checkpoint(
    stack_env: dict[str, str], backend: str, stall: str
) -> None:
    """As a put: a read of the latest has the writes the cold tier holds."""
    async with opened(stack_env, backend, "write-through") as tiers:
        saver = tiers.saver
        thread_id = f"cx-{uuid.uuid4().hex[:12]}"
        first = await put(saver, thread_id, None, "a")
        assert saver.cache is not None
        if stall == "cold reply lost":
            tiers.store.put_writes, reached = slowed(tiers.store.put_writes, sent=True)  # type: ignore[method-assign]
        else:
            saver.cache.add_writes, reached = slowed(saver.cache.add_writes, sent=False)  # type: ignore[method-assign]
        await cancelled_at(
            reached,
            saver.aput_writes(thread_config(thread_id, first), [("messages", "w")], "task-1"),
        )

        latest = await saver.aget_tuple(thread_config(thread_id))
        listed = [found async for found in saver.alist(thread_config(thread_id))]
        assert latest is not None
        assert [write[1:] for write in latest.pending_writes or []] == [("messages", "w")]
        assert latest.pending_writes == listed[0].pending_writes


@pytest.mark.parametrize("backend", COLD_BACKENDS)
@pytest.mark.parametrize("write", ["put", "put_writes"])
async def test_a_write_too_large_for_the_log_cancelled_after_its_cold_write_is_read_with_it(
    stack_env: dict[str, str], backend: str, write: str
) -> None:
    """Found by review: a write-behind write too large for one log entry goes to the cold
    tier instead; cancelled once the cold tier has it (its reply lost), it left the hot
    copy trusted, and a read was served the parent as the latest, or the checkpoint without
    those writes, as a write-through write's is not."""
    async with opened(stack_env, backend, "write-behind") as tiers:
        saver = tiers.saver
        thread_id = f"cx-{uuid.uuid4().hex[:12]}"
        first = await put(saver, thread_id, None, "a")
        await saver.aflush(thread_id)
        assert (await saver.aget_tuple(thread_config(thread_id))) is not None  # cached
        wide = step(saver, "b")
        wide["channel_values"] |= {f"c{i}": [i] * 20 for i in range(MANY_VALUES)}
        wide["channel_versions"] |= dict.fromkeys(wide["channel_values"], 1)
        writes = [(f"c{i % 7}", i) for i in range(MANY_VALUES)]
        stored_by = "put_checkpoint" if write == "put" else "put_writes"
        real = getattr(tiers.store, stored_by)
        wrapper, reached = slowed(real, sent=True)
        setattr(tiers.store, stored_by, wrapper)
        if write == "put":
            sent = saver.aput(
                thread_config(thread_id, first),
                wide,
                {"source": "loop", "step": 1},
                wide["channel_versions"],
            )
        else:
            sent = saver.aput_writes(thread_config(thread_id, first), writes, "task-1")
        await cancelled_at(reached, sent)
        setattr(tiers.store, stored_by, real)

        latest = await saver.aget_tuple(thread_config(thread_id))
        assert latest is not None
        if write == "put":
            assert latest.checkpoint["id"] == wide["id"]
        else:
            assert latest.checkpoint["id"] == first
            assert len(latest.pending_writes or []) == MANY_VALUES


@pytest.mark.parametrize("backend", COLD_BACKENDS)
@pytest.mark.parametrize(
    ("call", "sent"),
    [("lock_thread", True), ("unlock_thread", False)],
    ids=["lock taken, reply lost", "unlock not sent"],
)
async def test_a_boundary_cancelled_at_the_flush_lock_leaves_no_lock_held(
    stack_env: dict[str, str], backend: str, call: str, sent: bool
) -> None:
    """A synchronous put cancelled while it takes or releases the thread's flush lock:
    the next flush of the thread is prompt, not held up by the lock until its TTL."""
    async with opened(stack_env, backend, "write-behind") as tiers:
        saver, log = tiers.saver, tiers.flusher.log
        thread_id = f"cx-{uuid.uuid4().hex[:12]}"
        first = await put(saver, thread_id, None, "a", **{DURABILITY_KEY: "sync"})
        real = getattr(log, call)
        wrapper, reached = slowed(real, sent=sent)
        setattr(log, call, wrapper)
        await cancelled_at(reached, put(saver, thread_id, first, "b", **{DURABILITY_KEY: "sync"}))
        setattr(log, call, real)

        started = time.monotonic()
        await saver.aflush(thread_id)
        assert time.monotonic() - started < PROMPT_SECONDS
        latest, listed, cold = await reads(tiers, thread_id)
        assert latest == cold == listed[0]
        assert len(listed) == 2
        assert await put(saver, thread_id, latest, "c", **{DURABILITY_KEY: "sync"})
