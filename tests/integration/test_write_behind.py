"""Write-behind mode on real servers, for each cold backend: what a put costs, when the cold
tier receives it, what readers see before then, fencing, deletes, and a flusher that dies."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis.asyncio as aioredis
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import CheckpointTuple, empty_checkpoint
from langgraph.types import Command

from devstack import RedisServer, free_port
from state.checkpoint import TieredCheckpointSaver
from state.checkpoint import flusher as flusher_module
from state.checkpoint.flusher import Flusher
from state.checkpoint.saver import DURABILITY_KEY
from state.errors import (
    BackendUnavailable,
    FlushLockBusy,
    RequestRejected,
    StaleFencingToken,
    UnsupportedSchemaVersion,
)
from state.hot.redis_checkpoints import ENTRY_FORMAT, LOG_KIND, RedisCheckpointCache
from state.hot.redis_client import create_redis_client, hot_key, hot_namespace
from state.hot.redis_write_behind import RedisWriteBehindLog
from state.ports import CheckpointStore, Counters, StoredWrite, WritesPut
from state.settings import Settings
from tests.chat_graph import CHECKPOINTS_PER_INVOKE, chat_graph
from tests.support.redis_round_trips import RedisRoundTrips

COLD_BACKENDS = ["cosmos", "postgres"]


def config(thread_id: str | None = None, **extra: Any) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id or f"wb-{uuid.uuid4().hex[:12]}", **extra}}


@dataclass
class WriteBehind:
    """The saver in write-behind mode over its adapters; the flusher runs only when asked."""

    saver: TieredCheckpointSaver
    flusher: Flusher
    store: CheckpointStore
    cold_counters: Counters
    redis: aioredis.Redis
    round_trips: RedisRoundTrips
    cache: RedisCheckpointCache


def settings_for(stack_env: dict[str, str], backend: str, redis_url: str) -> Settings:
    return Settings.model_validate(
        {
            "state_cold_backend": backend,
            "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
            "cosmos_key": stack_env["COSMOS_KEY"],
            "cosmos_create_if_missing": True,
            "postgres_url": stack_env["POSTGRES_URL"],
            "redis_url": redis_url,
            "state_write_mode": "write-behind",
            "state_lock_ttl_ms": 2_000,
        }
    )


@asynccontextmanager
async def open_write_behind(settings: Settings) -> AsyncIterator[WriteBehind]:
    store: CheckpointStore
    if settings.state_cold_backend.value == "cosmos":
        from state.cold.cosmos_checkpoints import CosmosCheckpointStore
        from state.cold.cosmos_client import CosmosConnection

        cosmos = CosmosConnection(settings.cosmos)
        store, counters, close = (
            CosmosCheckpointStore(
                cosmos,
                max_item_bytes=settings.state_max_item_bytes,
                compress_threshold_bytes=settings.state_compress_threshold_bytes,
            ),
            cosmos.counters,
            cosmos.close,
        )
    else:
        from state.cold.postgres_checkpoints import PostgresCheckpointStore
        from state.cold.postgres_client import PostgresConnection

        pg = PostgresConnection(settings.postgres)
        store, counters, close = PostgresCheckpointStore(pg), pg.counters, pg.close
    redis = create_redis_client(settings)
    round_trips = RedisRoundTrips()
    unwatch = round_trips.watch(redis)
    try:
        await store.setup()
        cache = RedisCheckpointCache(
            redis, namespace=hot_namespace(settings), ttl_seconds=settings.state_hot_ttl_seconds
        )
        flusher = Flusher(
            RedisWriteBehindLog(redis, cache), store, lock_ttl_ms=settings.state_lock_ttl_ms
        )
        saver = TieredCheckpointSaver(store, cache, flusher=flusher)
        yield WriteBehind(saver, flusher, store, counters, redis, round_trips, cache)
    finally:
        unwatch()
        await redis.aclose()
        await close()


@pytest.fixture(params=COLD_BACKENDS)
async def tiers(
    request: pytest.FixtureRequest, stack_env: dict[str, str]
) -> AsyncIterator[WriteBehind]:
    async with open_write_behind(
        settings_for(stack_env, request.param, stack_env["REDIS_URL"])
    ) as opened:
        # Earlier tests' backlogs on this worker's Redis (some end with one): a test counting
        # what a drain applies counts its own entries only.
        await opened.flusher.drain()
        yield opened


async def cold_latest_id(tiers: WriteBehind, thread_id: str) -> str | None:
    stored = await tiers.store.get_checkpoint(thread_id, "", None)
    return None if stored is None else stored.checkpoint_id


async def invoked_once(tiers: WriteBehind) -> tuple[Any, RunnableConfig, str, CheckpointTuple]:
    """The chat graph on a new thread after one invoke, its checkpoints left in the log:
    the graph, its config, the thread and the latest checkpoint as the hot tier has it."""
    graph = chat_graph(tiers.saver)
    cfg = config()
    await graph.ainvoke({"messages": ["hello"]}, cfg, durability="async")
    hot = await tiers.saver.aget_tuple(cfg)
    assert hot is not None
    return graph, cfg, cfg["configurable"]["thread_id"], hot


async def test_an_invoke_makes_no_cold_request_and_one_round_trip_per_write(
    tiers: WriteBehind,
) -> None:
    graph = chat_graph(tiers.saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    await graph.ainvoke({"messages": ["hello"]}, cfg)  # the thread exists from now on
    # A second run first: the first of its kind on this Redis loads the scripts it uses.
    await graph.ainvoke({"messages": ["warm"]}, cfg)
    calls: list[str] = []
    for name in ("aput", "aput_writes"):
        original = getattr(tiers.saver, name)

        async def counted(*args: Any, _original: Any = original, _name: str = name) -> Any:
            calls.append(_name)
            return await _original(*args)

        setattr(tiers.saver, name, counted)
    entries_before = len(await tiers.flusher.log.read(thread_id, count=1000))
    tiers.cold_counters.reset()
    tiers.round_trips.count = 0

    await graph.ainvoke({"messages": ["again"]}, cfg, durability="async")

    assert tiers.cold_counters.requests == 0, tiers.cold_counters.by_operation
    # One round trip per put / put_writes, plus the one read of the latest checkpoint.
    assert len(calls) >= 9
    assert tiers.round_trips.count == len(calls) + 1
    # Every write of the run waits in the log for the flusher.
    entries = await tiers.flusher.log.read(thread_id, count=1000)
    assert len(entries) == entries_before + len(calls)


async def test_an_append_after_redis_lost_its_scripts_reloads_them_in_one_round_trip(
    tiers: WriteBehind,
) -> None:
    _, _, thread_id, hot = await invoked_once(tiers)
    await tiers.redis.script_flush()  # what a restart without persistence, or a failover, does
    tiers.round_trips.count = 0
    await tiers.saver.aput_writes(hot.config, [("messages", ["late"])], task_id="late-task")
    # The refused append, every script loaded at once, the append again.
    assert tiers.round_trips.count == 3
    entries = await tiers.flusher.log.read(thread_id, count=1000)
    assert any(
        isinstance(entry.op, WritesPut) and entry.op.writes[0].task_id == "late-task"
        for entry in entries
    )


async def test_flush_makes_the_cold_tier_match_and_reads_never_see_a_gap(
    tiers: WriteBehind,
) -> None:
    graph, cfg, thread_id, hot = await invoked_once(tiers)
    assert await cold_latest_id(tiers, thread_id) is None  # not flushed yet
    backlog = await tiers.flusher.backlog()
    assert backlog.entries > 0 and backlog.threads >= 1 and backlog.oldest_age_seconds is not None

    # A listing is answered by the cold tier: it settles the thread's backlog first.
    listed = [item async for item in tiers.saver.alist(cfg)]
    assert (
        listed[0].config["configurable"]["checkpoint_id"]
        == hot.config["configurable"]["checkpoint_id"]
    )
    assert len(listed) == CHECKPOINTS_PER_INVOKE
    assert await cold_latest_id(tiers, thread_id) == hot.config["configurable"]["checkpoint_id"]
    assert not await tiers.flusher.log.pending(thread_id)

    await graph.ainvoke({"messages": ["more"]}, cfg, durability="async")
    await tiers.saver.aflush(thread_id)
    latest = await tiers.saver.aget_tuple(cfg)
    assert latest is not None
    assert await cold_latest_id(tiers, thread_id) == latest.config["configurable"]["checkpoint_id"]
    cold = await tiers.store.get_checkpoint(thread_id, "", None)
    assert cold is not None
    assert len(latest.checkpoint["channel_values"]["messages"]) == 10


async def test_a_cache_miss_learns_of_the_backlog_in_its_lease_round_trip(
    tiers: WriteBehind,
) -> None:
    graph = chat_graph(tiers.saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    await graph.ainvoke({"messages": ["hello"]}, cfg, durability="async")
    hot = await tiers.saver.aget_tuple(cfg)
    assert hot is not None
    newest = hot.config["configurable"]["checkpoint_id"]
    asked_log: list[str] = []
    pending = tiers.flusher.log.pending

    async def counted_pending(thread: str) -> bool:
        asked_log.append(thread)
        return await pending(thread)

    tiers.flusher.log.pending = counted_pending  # type: ignore[method-assign]

    # A backlog and no cache entry: the miss flushes it before the cold read, so the read
    # returns the newest checkpoint, not the cold tier's older (here: no) state.
    assert tiers.saver.cache is not None
    await tiers.saver.cache.invalidate(thread_id)
    found = await tiers.saver.aget_tuple(cfg)
    assert found is not None and found.config["configurable"]["checkpoint_id"] == newest
    assert await cold_latest_id(tiers, thread_id) == newest

    # No backlog: the cache read, its lease (which says the log is empty) and the fill.
    await tiers.saver.cache.invalidate(thread_id)
    asked_log.clear()
    tiers.round_trips.count = 0
    tiers.cold_counters.reset()
    found = await tiers.saver.aget_tuple(cfg)
    assert found is not None and found.config["configurable"]["checkpoint_id"] == newest
    assert asked_log == []  # the lease's answer stood in for the log's
    assert tiers.round_trips.count == 3
    assert tiers.cold_counters.requests > 0


async def test_an_interrupt_and_durability_sync_are_synchronous_boundaries(
    tiers: WriteBehind,
) -> None:
    graph = chat_graph(tiers.saver, ask=True)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    await graph.ainvoke({"messages": ["hello"]}, cfg, durability="async")

    # No flush asked for: the interrupt's write already took the backlog to the cold tier.
    assert not await tiers.flusher.log.pending(thread_id)
    cold = await tiers.store.get_checkpoint(thread_id, "", None)
    assert cold is not None
    writes = await tiers.store.get_writes(thread_id, "", cold.checkpoint_id)
    assert any(write.channel == "__interrupt__" for write in writes)

    # durability="sync": every put returns only once it is cold.
    seen_pending = []
    original = tiers.saver.aput

    async def put_then_look(*args: Any) -> Any:
        result = await original(*args)
        seen_pending.append(await tiers.flusher.log.pending(thread_id))
        return result

    tiers.saver.aput = put_then_look  # type: ignore[method-assign]
    await graph.ainvoke(Command(resume=True), cfg, durability="sync")
    assert seen_pending and not any(seen_pending)
    state = await graph.aget_state(cfg)
    assert state.values["approved"] is True


async def test_a_checkpoint_put_after_its_error_was_written_is_a_boundary_too(
    tiers: WriteBehind,
) -> None:
    """LangGraph saves a step's checkpoint and its tasks' writes concurrently (durability
    "async"): a put arriving after the error its task wrote returns once it is cold."""
    base = config(checkpoint_ns="", **{DURABILITY_KEY: "async"})
    thread_id = base["configurable"]["thread_id"]
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"messages": ["a" * 1000]}
    checkpoint["channel_versions"] = {"messages": tiers.saver.get_next_version(None, None)}
    at_checkpoint = config(thread_id, checkpoint_ns="", checkpoint_id=checkpoint["id"])
    await tiers.saver.aput_writes(at_checkpoint, [("__error__", "boom")], "task-1")
    await tiers.saver.aput(
        base, checkpoint, {"source": "loop", "step": 0}, checkpoint["channel_versions"]
    )

    assert not await tiers.flusher.log.pending(thread_id)
    assert await cold_latest_id(tiers, thread_id) == checkpoint["id"]


async def test_durability_exit_returns_once_the_runs_one_save_is_cold(
    tiers: WriteBehind,
) -> None:
    """LangGraph saves nothing of an "exit" run before it exits: that save is its boundary."""
    graph = chat_graph(tiers.saver)  # the flusher runs only when asked: the run's own saves
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    done = await graph.ainvoke({"messages": ["hello"]}, cfg, durability="exit")
    assert not await tiers.flusher.log.pending(thread_id)
    cold = await tiers.store.get_checkpoint(thread_id, "", None)
    assert cold is not None
    cold_only = TieredCheckpointSaver(tiers.store)
    state = await chat_graph(cold_only).aget_state(cfg)
    assert state.values["messages"] == done["messages"]


async def test_with_redis_out_a_finished_subgraphs_pending_step_does_not_fail_the_run(
    tiers: WriteBehind,
) -> None:
    """A subgraph's step waits in the log (its namespace named after its task), Redis goes,
    the parent's newest checkpoint goes to the cold tier whole: the run's end returns (the
    subgraph's result is in its parent's state)."""
    thread_id = f"wb-{uuid.uuid4().hex[:12]}"
    child: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": "sub:1"}}
    state = empty_checkpoint()
    state["channel_values"], state["channel_versions"] = {"v": "x" * 50}, {"v": "1"}
    await tiers.saver.aput(child, state, {"step": 0}, {"v": "1"})
    log = tiers.flusher.log

    async def out(*_: Any, **__: Any) -> Any:
        raise BackendUnavailable(log.name, "refused (injected)")

    log.append_put = out  # type: ignore[method-assign]
    tiers.flusher.flush_thread = out  # type: ignore[method-assign]
    parent = empty_checkpoint()
    parent["channel_values"], parent["channel_versions"] = {"v": "y" * 50}, {"v": "2"}
    await tiers.saver.aput(config(thread_id), parent, {"step": 1}, {"v": "2"})
    await tiers.saver.aflush(thread_id)
    assert await tiers.store.get_checkpoint(thread_id, "", None) is not None


async def test_a_stale_fencing_token_is_refused_at_the_hot_tier(tiers: WriteBehind) -> None:
    graph = chat_graph(tiers.saver)
    thread_id = f"wb-{uuid.uuid4().hex[:12]}"
    await graph.ainvoke({"messages": ["first"]}, config(thread_id, fencing_token=7))
    entries_before = len(await tiers.flusher.log.read(thread_id, count=1000))

    with pytest.raises(StaleFencingToken) as refused:
        await graph.ainvoke({"messages": ["late"]}, config(thread_id, fencing_token=6))

    assert (refused.value.presented, refused.value.highest) == (6, 7)
    assert len(await tiers.flusher.log.read(thread_id, count=1000)) == entries_before
    await graph.ainvoke({"messages": ["newer"]}, config(thread_id, fencing_token=8))
    latest = await tiers.saver.aget_tuple(config(thread_id))
    assert latest is not None
    assert not any("late" in message for message in latest.checkpoint["channel_values"]["messages"])


async def test_delete_drops_the_backlog_and_a_later_flush_resurrects_nothing(
    tiers: WriteBehind,
) -> None:
    graph = chat_graph(tiers.saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    await graph.ainvoke({"messages": ["hello"]}, cfg, durability="async")
    await tiers.saver.aflush(thread_id)
    await graph.ainvoke({"messages": ["unflushed"]}, cfg, durability="async")
    assert await tiers.flusher.log.pending(thread_id)

    await tiers.saver.adelete_thread(thread_id)
    await tiers.flusher.drain()

    assert await tiers.saver.aget_tuple(cfg) is None
    assert await cold_latest_id(tiers, thread_id) is None
    assert [item async for item in tiers.saver.alist(cfg)] == []


async def test_a_working_flusher_keeps_its_lock_past_the_ttl_and_a_paused_one_loses_it(
    tiers: WriteBehind,
) -> None:
    log = tiers.flusher.log
    thread_id = config()["configurable"]["thread_id"]
    # Renewed every third of its TTL: at 300 ms, a renewal 200 ms late on a loaded machine
    # lost it.
    working = Flusher(log, tiers.store, lock_ttl_ms=1_000)
    async with working.holding(thread_id):
        await asyncio.sleep(2.0)  # two TTLs: renewed meanwhile
        assert await log.lock_thread(thread_id, ttl_ms=300) is None

    # A paused holder cannot renew: the lock runs out one TTL later and others go on.
    paused = await log.lock_thread(thread_id, ttl_ms=300)
    assert paused is not None
    await asyncio.sleep(0.4)
    assert await working.flush_thread(thread_id) == 0
    # Back from its pause, the old holder neither renews nor releases the new one's lock.
    taken = await log.lock_thread(thread_id, ttl_ms=5_000)
    assert taken is not None
    assert not await log.renew_thread_lock(thread_id, paused, ttl_ms=300)
    await log.unlock_thread(thread_id, paused)
    assert await log.lock_thread(thread_id, ttl_ms=300) is None
    await log.unlock_thread(thread_id, taken)


async def test_a_flusher_that_dies_mid_batch_leaves_it_to_the_next_with_no_duplicate(
    tiers: WriteBehind,
) -> None:
    graph = chat_graph(tiers.saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    await graph.ainvoke({"messages": ["hello"]}, cfg, durability="async")
    log = tiers.flusher.log
    entries = await log.read(thread_id, count=1000)

    # What a dead flusher leaves: half the batch applied, never acknowledged, and its lock
    # until the TTL. The lock is taken after the cold write: a loaded machine's slow write
    # outlasted the 300 ms before the drain below could see it held.
    await tiers.store.apply_batch([entry.op for entry in entries[: len(entries) // 2]])
    assert await log.lock_thread(thread_id, ttl_ms=300) is not None
    assert await tiers.flusher.drain() == 0  # its lock still holds
    await asyncio.sleep(0.4)

    assert await tiers.flusher.drain() == len(entries)
    assert not await log.pending(thread_id)
    hot = await tiers.saver.aget_tuple(cfg)
    history = [item async for item in tiers.saver.alist(cfg)]
    assert len(history) == CHECKPOINTS_PER_INVOKE
    assert len({item.config["configurable"]["checkpoint_id"] for item in history}) == len(history)
    assert history[0].checkpoint == hot.checkpoint if hot else False
    for item in history:
        assert len(item.pending_writes or []) == len(
            {(w[0], w[1]) for w in item.pending_writes or []}
        )


async def drain_held_up(tiers: WriteBehind) -> tuple[asyncio.Task[int], asyncio.Event]:
    """Another flusher's drain pass (the background one, another worker's), held up inside
    its first cold batch until the returned event is set; returned once it is there."""
    applying, go_on = asyncio.Event(), asyncio.Event()
    apply_batch = tiers.store.apply_batch

    async def held_up(ops: Any, **options: Any) -> None:
        applying.set()
        await go_on.wait()
        await apply_batch(ops, **options)

    other = Flusher(tiers.flusher.log, tiers.store, lock_ttl_ms=5_000)
    other.store = SimpleNamespace(apply_batch=held_up)  # type: ignore[assignment]
    other_pass = asyncio.create_task(other.drain())
    await applying.wait()
    return other_pass, go_on


@pytest.mark.parametrize("operation", ["delete_for_runs", "list_every_thread"])
async def test_operations_across_threads_wait_for_a_flush_another_flusher_has_in_hand(
    tiers: WriteBehind, operation: str
) -> None:
    """Another flusher (the background one, another worker's) is applying the thread's
    batch when `delete_for_runs` or a listing across threads starts: they wait for it, or
    the deleted run would land afterwards and the listing would miss it."""
    graph = chat_graph(tiers.saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    first, second = f"first-{thread_id}", f"second-{thread_id}"
    await graph.ainvoke({"messages": ["a"]}, config(thread_id, run_id=first))
    await tiers.saver.aflush(thread_id)
    await graph.ainvoke({"messages": ["b"]}, config(thread_id, run_id=second), durability="async")
    assert await tiers.flusher.log.pending(thread_id)

    other_pass, go_on = await drain_held_up(tiers)
    if operation == "delete_for_runs":
        waiting = asyncio.create_task(tiers.saver.adelete_for_runs([second]))
    else:
        waiting = asyncio.create_task(listed(tiers.saver.alist(None, filter={"run_id": second})))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    go_on.set()
    await other_pass
    found = await waiting

    if operation == "delete_for_runs":
        cold_runs = [
            stored.metadata.get("run_id")
            async for stored in tiers.store.list_checkpoints(
                thread_id=thread_id,
                checkpoint_ns=None,
                before=None,
                limit=None,
                metadata_filter=None,
            )
        ]
        assert second not in cold_runs and first in cold_runs
        latest = await tiers.saver.aget_tuple(cfg)
        assert latest is not None and latest.metadata.get("run_id") == first
    else:
        assert len(found or []) == CHECKPOINTS_PER_INVOKE


async def test_a_read_past_a_flush_lock_held_elsewhere_fails_rather_than_fork_the_thread(
    tiers: WriteBehind, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the thread's flush lock (renewed: its flush of a long backlog
    goes on) past a cold read's wait. Redis answered, so the thread's newest checkpoints
    are in its log, not in the cold tier: the read, and a run going on from it, fail with
    `FlushLockBusy` rather than answer the cold tier's older state. Going on from that
    state, a run would write a second child of an older checkpoint and its steps, flushed
    after the backlog, would become the thread's latest without the acknowledged run."""
    graph = chat_graph(tiers.saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    await graph.ainvoke({"messages": ["a"]}, cfg)
    await tiers.saver.aflush(thread_id)
    await graph.ainvoke({"messages": ["b"]}, cfg, durability="async")
    hot = await tiers.saver.aget_tuple(cfg)
    assert hot is not None
    newest = hot.config["configurable"]["checkpoint_id"]
    cold_before = await cold_latest_id(tiers, thread_id)
    assert cold_before != newest
    entries_before = len(await tiers.flusher.log.read(thread_id, count=1000))
    monkeypatch.setattr(flusher_module, "LOCK_WAIT_SECONDS", 0.3, raising=True)

    elsewhere = Flusher(
        RedisWriteBehindLog(tiers.redis, tiers.cache), tiers.store, lock_ttl_ms=2_000
    )
    async with elsewhere.holding(thread_id):
        # A run about to go on from the cold tier's copy (the case app's `fresh`).
        with pytest.raises(FlushLockBusy):
            await tiers.saver.arefresh(thread_id)
        # A cache miss (the copy evicted, or dropped by a refresh), and a listing.
        await tiers.cache.invalidate(thread_id)
        with pytest.raises(FlushLockBusy):
            await tiers.saver.aget_tuple(cfg)
        with pytest.raises(FlushLockBusy):
            await graph.aget_state(cfg)
        with pytest.raises(FlushLockBusy):
            await listed(tiers.saver.alist(cfg))
        with pytest.raises(FlushLockBusy):
            await graph.ainvoke({"messages": ["c"]}, cfg, durability="async")
    # The run wrote nothing: no step of it waits in the log to be flushed.
    assert len(await tiers.flusher.log.read(thread_id, count=1000)) == entries_before
    assert await cold_latest_id(tiers, thread_id) == cold_before

    # Once the lock is free, the run goes on from the newest checkpoint: one chain.
    await graph.ainvoke({"messages": ["c"]}, cfg, durability="async")
    await tiers.saver.aflush(thread_id)
    children: dict[str | None, list[str]] = {}
    async for stored in tiers.store.list_checkpoints(
        thread_id=thread_id, checkpoint_ns=None, before=None, limit=None, metadata_filter=None
    ):
        children.setdefault(stored.parent_checkpoint_id, []).append(stored.checkpoint_id)
    assert all(len(ids) == 1 for ids in children.values()), children
    latest = await tiers.saver.aget_tuple(cfg)
    assert latest is not None
    assert [m for m in latest.checkpoint["channel_values"]["messages"] if len(m) == 1] == [
        "a",
        "b",
        "c",
    ]


async def test_a_batch_held_up_past_a_lost_lock_cannot_bring_a_deleted_thread_back(
    tiers: WriteBehind,
) -> None:
    """A flusher's batch is on its way to the cold tier when Redis loses the flush lock (a
    FLUSHALL, a failover), so `delete_thread` takes the lock at once and deletes the thread;
    the batch arriving afterwards is refused by the cold store's fence, not applied."""
    graph = chat_graph(tiers.saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    await graph.ainvoke({"messages": ["hello"]}, cfg, durability="async")
    assert await tiers.flusher.log.pending(thread_id)

    other_pass, go_on = await drain_held_up(tiers)
    await tiers.redis.delete(hot_key(thread_id, "wb-flushing", namespace=tiers.cache.namespace))
    await asyncio.wait_for(tiers.saver.adelete_thread(thread_id), timeout=10)
    go_on.set()

    assert await other_pass == 0  # refused: nothing applied
    assert await cold_latest_id(tiers, thread_id) is None
    assert await tiers.saver.aget_tuple(cfg) is None
    assert await listed(tiers.saver.alist(cfg)) == []


async def test_a_thread_the_cold_store_refuses_does_not_stop_a_delete_for_runs_elsewhere(
    tiers: WriteBehind,
) -> None:
    """One thread's backlog the cold store keeps refusing stays in the log (as the background
    drain leaves it); `delete_for_runs` still flushes and deletes on every other thread,
    and succeeds, as that backlog holds none of the runs' checkpoints."""
    graph = chat_graph(tiers.saver)
    refused, other = config(), config()
    refused_id, other_id = refused["configurable"]["thread_id"], other["configurable"]["thread_id"]
    run = f"run-{other_id}"
    await graph.ainvoke({"messages": ["a"]}, refused, durability="async")
    await graph.ainvoke({"messages": ["b"]}, config(other_id, run_id=run), durability="async")
    apply_batch = tiers.store.apply_batch

    async def refusing(ops: Any, **options: Any) -> None:
        if any(getattr(op, "thread_id", None) == refused_id for op in ops) or any(
            getattr(getattr(op, "checkpoint", None), "thread_id", None) == refused_id for op in ops
        ):
            raise RequestRejected("cold", "refused for the test")
        await apply_batch(ops, **options)

    tiers.flusher.store = SimpleNamespace(apply_batch=refusing)  # type: ignore[assignment]
    try:
        await tiers.saver.adelete_for_runs([run])
    finally:
        tiers.flusher.store = tiers.store
    assert await tiers.flusher.log.pending(refused_id)
    assert await tiers.saver.aget_tuple(other) is None
    assert await cold_latest_id(tiers, other_id) is None
    # Recorded as stuck: no test after this one on the shared Redis may find it there.
    assert refused_id in {stuck.thread_id for stuck in await tiers.flusher.stuck()}
    await tiers.flusher.delete_thread(refused_id)
    assert refused_id not in {stuck.thread_id for stuck in await tiers.flusher.stuck()}


async def listed(items: AsyncIterator[CheckpointTuple]) -> list[CheckpointTuple]:
    return [item async for item in items]


def log_key(tiers: WriteBehind, thread_id: str) -> str:
    return hot_key(thread_id, LOG_KIND, namespace=tiers.cache.namespace)


async def rewrite_log(tiers: WriteBehind, thread_id: str, entry_format: bytes | None) -> int:
    """Rewrites the thread's log as code of another entry format would have written it
    (`None`: before entries named their format); how many entries it holds."""
    key = log_key(tiers, thread_id)
    entries = await tiers.redis.xrange(key)
    await tiers.redis.delete(key)
    for _, fields in entries:
        fields.pop(b"f", None)
        if entry_format is not None:
            fields = {b"f": entry_format, **fields}
        await tiers.redis.xadd(key, fields)
    return len(entries)


async def test_a_log_entry_of_a_newer_format_waits_for_newer_code_and_older_ones_flush(
    tiers: WriteBehind,
) -> None:
    """A rolling deploy runs two versions: a flusher never misreads what newer code wrote."""
    _, _, thread_id, hot = await invoked_once(tiers)
    entries = await rewrite_log(tiers, thread_id, str(ENTRY_FORMAT + 1).encode())

    with pytest.raises(UnsupportedSchemaVersion):
        await tiers.flusher.flush_thread(thread_id)
    await tiers.flusher.drain()  # logs the refusal and goes on with other threads
    # So does the pass before an operation across threads, naming the thread it left.
    assert list(await tiers.flusher.settle_all()) == [thread_id]
    assert await tiers.redis.xlen(log_key(tiers, thread_id)) == entries  # none acknowledged
    assert await cold_latest_id(tiers, thread_id) is None

    # Entries from before the format was named (format 2) read as they always did.
    await rewrite_log(tiers, thread_id, None)
    assert await tiers.flusher.flush_thread(thread_id) == entries
    cold = await tiers.store.get_checkpoint(thread_id, "", None)
    assert cold is not None
    assert cold.checkpoint_id == hot.config["configurable"]["checkpoint_id"]


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_unflushed_entries_survive_memory_pressure_and_flushall_loses_only_them(
    backend: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    server = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    server.start()
    try:
        settings = settings_for(stack_env, backend, server.url)
        async with open_write_behind(settings) as tiers:
            await tiers.redis.config_set("maxmemory", 4 * 1024 * 1024)
            await tiers.redis.config_set("maxmemory-policy", "volatile-lru")
            graph = chat_graph(tiers.saver)
            cfg = config()
            thread_id = cfg["configurable"]["thread_id"]
            await graph.ainvoke({"messages": ["hello"]}, cfg, durability="async")
            backlog = len(await tiers.flusher.log.read(thread_id, count=1000))
            # Fill memory with keys that carry a TTL (as the hot cache's do) until Redis evicts.
            filler = b"f" * 64 * 1024
            for n in range(200):
                await tiers.redis.set(f"filler:{n}", filler, ex=3600)
            info = await tiers.redis.info("stats")
            assert int(info["evicted_keys"]) > 0
            assert len(await tiers.flusher.log.read(thread_id, count=1000)) == backlog

            # The boundary (end of run) is flushed; what comes after it is lost with Redis.
            await tiers.saver.aflush(thread_id)
            boundary = await cold_latest_id(tiers, thread_id)
            await tiers.redis.config_set("maxmemory", 0)
            await graph.ainvoke({"messages": ["after the boundary"]}, cfg, durability="async")
            await tiers.redis.flushall()
            latest = await tiers.saver.aget_tuple(cfg)
            assert latest is not None
            assert latest.config["configurable"]["checkpoint_id"] == boundary
            assert len(latest.checkpoint["channel_values"]["messages"]) == 5
    finally:
        server.stop()


async def test_a_flushall_between_a_discard_and_its_count_leaves_the_backlog_counted(
    stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis loses everything (FLUSHALL) right after a delete dropped a thread's log and
    before the shared entry count takes the dropped entries off: the count must not go
    below zero, or the next thread's unflushed entries are reported as no backlog."""
    server = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    server.start()
    try:
        async with open_write_behind(settings_for(stack_env, "postgres", server.url)) as tiers:
            graph = chat_graph(tiers.saver)
            deleted, kept = config(), config()
            await graph.ainvoke({"messages": ["to delete"]}, deleted, durability="async")
            log = tiers.flusher.log
            assert isinstance(log, RedisWriteBehindLog)
            delete_listed = log._delete_listed

            async def then_flushall(*args: Any, **kwargs: Any) -> int:
                dropped = await delete_listed(*args, **kwargs)
                await tiers.redis.flushall()
                return dropped

            monkeypatch.setattr(log, "_delete_listed", then_flushall)
            await tiers.saver.adelete_thread(deleted["configurable"]["thread_id"])
            monkeypatch.undo()

            await graph.ainvoke({"messages": ["unflushed"]}, kept, durability="async")
            unflushed = len(await log.read(kept["configurable"]["thread_id"], count=1000))
            assert unflushed > 0
            assert (await tiers.flusher.backlog()).entries == unflushed
    finally:
        server.stop()


async def test_the_timers_pass_leaves_a_thread_to_the_worker_flushing_it(
    tiers: WriteBehind, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = chat_graph(tiers.saver)
    old, young = config(), config()
    await graph.ainvoke({"messages": ["old"]}, old, durability="async")
    await asyncio.sleep(0.6)
    young_started = time.monotonic()
    await graph.ainvoke({"messages": ["young"]}, young, durability="async")
    # Past young's whole run, 0.3 s short of old's wait: a fixed 0.5 s let a loaded
    # machine's slow young run count as left behind.
    adopt_after = time.monotonic() - young_started + 0.3
    monkeypatch.setattr(flusher_module, "ADOPT_AFTER_SECONDS", adopt_after)
    log = tiers.flusher.log
    old_id, young_id = old["configurable"]["thread_id"], young["configurable"]["thread_id"]

    # Unflushed for 0.6 s more than young: left behind. Appended just now: its worker's.
    assert await tiers.flusher.drain_abandoned() > 0
    assert not await log.pending(old_id)
    assert await log.pending(young_id)
    await asyncio.sleep(adopt_after + 0.1)
    assert await tiers.flusher.drain_abandoned() > 0
    assert not await log.pending(young_id)


async def test_a_partly_flushed_thread_is_listed_from_its_oldest_unflushed_entry(
    tiers: WriteBehind,
) -> None:
    graph = chat_graph(tiers.saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    log = tiers.flusher.log
    await graph.ainvoke({"messages": ["first"]}, cfg, durability="async")
    first = await log.read(thread_id, count=1000)
    await asyncio.sleep(0.6)
    await graph.ainvoke({"messages": ["second"]}, cfg, durability="async")
    assert [t for t, _ in await log.dirty_threads(limit=1000, unflushed_for=0.5)].count(
        thread_id
    ) == 1

    # The first invoke's entries flushed and acknowledged: what is left was appended
    # just now, so the thread no longer looks left behind (nor the backlog old).
    await tiers.store.apply_batch([entry.op for entry in first])
    assert await log.ack(thread_id, [entry.entry_id for entry in first]) > 0
    assert thread_id not in [t for t, _ in await log.dirty_threads(limit=1000, unflushed_for=0.5)]
    assert thread_id in [t for t, _ in await log.dirty_threads(limit=1000)]
    await tiers.flusher.flush_thread(thread_id)


# --------------------------------------------------------------------------- keys evicted
# Under `volatile-lru` Redis may evict any key with a TTL: the namespace index, the flush
# lock. Deleting a thread must not depend on either.


async def test_a_deleted_thread_stays_deleted_when_redis_evicted_its_namespace_index(
    tiers: WriteBehind,
) -> None:
    graph = chat_graph(tiers.saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    await graph.ainvoke({"messages": ["before"]}, cfg)
    await tiers.saver.aflush(thread_id)
    await tiers.redis.delete(tiers.cache.namespaces_key(thread_id))  # evicted

    await tiers.saver.adelete_thread(thread_id)
    assert await tiers.saver.aget_tuple(cfg) is None
    await graph.ainvoke({"messages": ["after"]}, cfg)
    await tiers.saver.aflush(thread_id)
    latest = await TieredCheckpointSaver(tiers.store).aget_tuple(cfg)
    assert latest is not None and "before" not in latest.checkpoint["channel_values"]["messages"]


def another_workers_flusher(tiers: WriteBehind, store: Any) -> Flusher:
    """A flusher of another worker: the same Redis and log, its own cache, onto `store`."""
    other_cache = RedisCheckpointCache(
        tiers.redis, namespace=tiers.cache.namespace, ttl_seconds=tiers.cache.ttl_seconds
    )
    return Flusher(RedisWriteBehindLog(tiers.redis, other_cache), store, lock_ttl_ms=2_000)


class _HeldBack:
    """The cold store, its `apply_batch` held until `go` (a flusher slow to send)."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self.reached, self.go = asyncio.Event(), asyncio.Event()

    async def apply_batch(self, ops: Any, *, fence: int | None = None) -> Any:
        self.reached.set()
        await self.go.wait()
        return await self.store.apply_batch(ops, fence=fence)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_a_deleted_thread_stays_deleted_when_redis_evicted_the_deletes_flush_lock(
    tiers: WriteBehind,
) -> None:
    """The delete holds the thread's flush lock; Redis evicts it; another worker's flusher
    takes the lock (a later token), reads the backlog before the delete drops it, and sends
    its batch after the delete: refused, the thread stays deleted."""
    graph = chat_graph(tiers.saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    await graph.ainvoke({"messages": ["flushed"]}, cfg)
    await tiers.saver.aflush(thread_id)
    await graph.ainvoke({"messages": ["unflushed"]}, cfg, durability="async")
    held_back = _HeldBack(tiers.store)
    other = another_workers_flusher(tiers, held_back)
    log = tiers.flusher.log
    discard = log.discard
    other_flushes: list[asyncio.Task[int]] = []

    async def discard_after_the_lock_was_evicted(thread: str, **kwargs: Any) -> None:
        await tiers.redis.delete(hot_key(thread, "wb-flushing", namespace=tiers.cache.namespace))
        other_flushes.append(asyncio.create_task(other.flush_thread(thread)))
        await held_back.reached.wait()
        await discard(thread, **kwargs)

    log.discard = discard_after_the_lock_was_evicted  # type: ignore[method-assign]
    try:
        await tiers.saver.adelete_thread(thread_id)
    finally:
        log.discard = discard  # type: ignore[method-assign]
    held_back.go.set()
    await other_flushes[0]
    assert await tiers.store.get_checkpoint(thread_id, "", None) is None


# Fields of a log entry overwritten in Redis: a truncated blob field, a head that is no object.
LOG_ENTRY_DAMAGES = pytest.mark.parametrize(
    "damage",
    [{b"b:": b"\x00\x00"}, {b"head": b"[]"}],
    ids=["truncated-blob-field", "head-not-an-object"],
)


@LOG_ENTRY_DAMAGES
async def test_a_malformed_log_entry_holds_back_its_thread_only(
    tiers: WriteBehind, damage: dict[bytes, bytes]
) -> None:
    """An entry damaged in Redis (a truncated blob field, a head that is no object) is that
    thread's trouble: the drain, the timer's included, still flushes every other thread."""
    _, _, poisoned, _ = await invoked_once(tiers)
    _, _, healthy, hot = await invoked_once(tiers)
    key = log_key(tiers, poisoned)
    entries = await tiers.redis.xrange(key)
    await tiers.redis.delete(key)
    for _, fields in entries:
        damaged = {
            name: next((v for prefix, v in damage.items() if name.startswith(prefix)), value)
            for name, value in fields.items()
        }
        await tiers.redis.xadd(key, damaged)

    await tiers.flusher.drain()

    # The entries before the first damaged one are flushed (the order of a step's entries
    # varies); it and every later one wait.
    first_damaged = next(
        index
        for index, (_, fields) in enumerate(entries)
        if any(name.startswith(prefix) for name in fields for prefix in damage)
    )
    held = entries[first_damaged:]
    assert await tiers.redis.xlen(key) == len(held)
    assert await cold_latest_id(tiers, healthy) == hot.config["configurable"]["checkpoint_id"]
    # Repaired, it flushes (and leaves no backlog behind for the tests that follow).
    await tiers.redis.delete(key)
    for _, fields in held:
        await tiers.redis.xadd(key, fields)
    assert await tiers.flusher.flush_thread(poisoned) == len(held)


async def a_flushed_thread(tiers: WriteBehind) -> tuple[Any, RunnableConfig, str]:
    """The chat graph after one run on a new thread, flushed (what a discard drops is in the
    cold tier): the graph, its config and the thread."""
    graph = chat_graph(tiers.saver)
    cfg = config()
    await graph.ainvoke({"messages": ["hello"]}, cfg)
    await tiers.flusher.drain()
    return graph, cfg, cfg["configurable"]["thread_id"]


async def swept_and_cancelled(
    tiers: WriteBehind, block: str, thread_id: str, reached: asyncio.Event, cancels: int
) -> asyncio.Task[None]:
    """The retention `block` on the thread, cancelled `cancels` times once `reached`."""

    async def sweep() -> None:
        async with getattr(tiers.flusher, block)(thread_id):
            pass

    swept = asyncio.create_task(sweep())
    await reached.wait()
    for _ in range(cancels):
        swept.cancel()
        # Each cancel reaches the block before the next; a block that waits for its command
        # waits this long (the wait does not decide the outcome).
        await asyncio.wait({swept}, timeout=0.1)
    return swept


async def assert_appends_accepted(graph: Any, cfg: RunnableConfig) -> None:
    await graph.ainvoke({"messages": ["still here"]}, cfg)
    state = await graph.aget_state(cfg)
    assert state.values["messages"][0] == "hello" and "still here" in state.values["messages"]


@pytest.mark.parametrize("cancels", [1, 2], ids=["cancelled", "cancelled-twice"])
@pytest.mark.parametrize(
    ("block", "sets_refusal"), [("refusing", "refuse_appends"), ("discarding", "discard")]
)
async def test_a_block_cancelled_while_its_refusal_is_on_its_way_leaves_appends_accepted(
    tiers: WriteBehind,
    monkeypatch: pytest.MonkeyPatch,
    block: str,
    sets_refusal: str,
    cancels: int,
) -> None:
    """A retention sweep cancelled (a deadline, a shutdown; or both, the second while it
    waits) once it sent the command that refuses the thread's appends: the block's end must
    not end the refusal before that command lands, or the refusal stands after it for
    EXPIRING_REFUSAL_MS (an hour of `ThreadExpiring` for every run of the thread)."""
    graph, cfg, thread_id = await a_flushed_thread(tiers)
    log = tiers.flusher.log
    send, end_refusal = getattr(log, sets_refusal), log.accept_appends
    sent, land = asyncio.Event(), asyncio.Event()
    on_the_wire: list[asyncio.Future[None]] = []

    async def in_flight(*args: Any, **kwargs: Any) -> None:
        async def delivered() -> None:
            await land.wait()
            await send(*args, **kwargs)

        # Sent: it lands whatever becomes of the caller.
        on_the_wire.append(asyncio.ensure_future(delivered()))
        sent.set()
        await asyncio.shield(on_the_wire[-1])

    async def accepting(thread: str) -> None:
        await end_refusal(thread)
        land.set()  # anything still on its way lands after the refusal was ended

    monkeypatch.setattr(log, sets_refusal, in_flight)
    monkeypatch.setattr(log, "accept_appends", accepting)
    swept = await swept_and_cancelled(tiers, block, thread_id, sent, cancels)
    land.set()
    with pytest.raises(asyncio.CancelledError):
        await swept
    await on_the_wire[0]
    monkeypatch.undo()
    await assert_appends_accepted(graph, cfg)


@pytest.mark.parametrize("block", ["refusing", "discarding"])
async def test_a_block_cancelled_as_it_ends_its_refusal_leaves_appends_accepted(
    tiers: WriteBehind, monkeypatch: pytest.MonkeyPatch, block: str
) -> None:
    """A retention sweep cancelled at its block's end, while the command ending its appends
    refusal waits for a connection (not sent yet): the refusal is ended all the same, not
    left to refuse every run of the thread (`ThreadExpiring`) for EXPIRING_REFUSAL_MS."""
    graph, cfg, thread_id = await a_flushed_thread(tiers)
    log = tiers.flusher.log
    end_refusal = log.accept_appends
    waiting, connected = asyncio.Event(), asyncio.Event()

    async def after_a_connection(thread: str) -> None:
        waiting.set()
        await connected.wait()  # cancelled here, the command is never sent
        await end_refusal(thread)

    monkeypatch.setattr(log, "accept_appends", after_a_connection)
    swept = await swept_and_cancelled(tiers, block, thread_id, waiting, 1)
    connected.set()
    with pytest.raises(asyncio.CancelledError):
        await swept
    monkeypatch.undo()
    await assert_appends_accepted(graph, cfg)


async def test_a_thread_an_append_reaches_as_its_flush_ends_is_listed_from_that_append(
    tiers: WriteBehind,
) -> None:
    """A flush that empties the log, then finds the thread's listing moved (an append landed
    between its last acknowledgement and its unlisting), leaves the thread listed: from that
    append on, not from the oldest entry it just flushed. It stayed listed that old: the
    backlog's age reported the flushed batch's, and the timer's pass took a thread its own
    worker was flushing as one left behind."""
    _, _, thread_id, hot = await invoked_once(tiers)
    await asyncio.sleep(0.6)
    log = tiers.flusher.log
    settle = log.settle

    async def append_first(thread: str, marker: float) -> bool:
        write = StoredWrite("task-late", "", 0, "messages", ("json", b'"late"'))
        checkpoint_id = hot.config["configurable"]["checkpoint_id"]
        await log.append_writes(thread, "", checkpoint_id, [write], upsert=False, fence=None)
        return await settle(thread, marker)

    log.settle = append_first  # type: ignore[method-assign]
    try:
        await tiers.flusher.flush_thread(thread_id)
    finally:
        del log.settle

    assert await log.pending(thread_id)  # the late append, left listed
    assert thread_id in [t for t, _ in await log.dirty_threads(limit=1000)]
    assert thread_id not in [t for t, _ in await log.dirty_threads(limit=1000, unflushed_for=0.5)]
    await tiers.flusher.flush_thread(thread_id)
