"""Redis losing a write-behind thread's unflushed checkpoints (FLUSHALL, a restart without
persistence), on real servers for each cold backend: the run that wrote them stops
(`HotStateLost`, a `BackendUnavailable`: the case app leaves it for the timer, which
resumes it from the cold tier), a flush never reports them stored, and the cold tier keeps
the last boundary whole, never a checkpoint whose parent or values went missing (found by
a fault hunt). A put whose parent only the cold tier has (a fork) still goes through; one whose parent a
prune took just before (the cache dropped with it), or from a thread deleted since, is
refused, the thread not lost.
Redis crashing at a boundary: the boundary rides out a restart (bounded), reports flushed
a batch that reached the cold tier before its acknowledgement failed, and reports lost a
backlog the restart emptied (a fresh-clone run failed on that window)."""

from __future__ import annotations

import asyncio
import operator
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypedDict

import pytest
import redis
from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from devstack import RedisServer
from state.checkpoint import TieredCheckpointSaver
from state.checkpoint.saver import REDIS_RETURN_SECONDS
from state.errors import BackendUnavailable, HotStateLost, ParentGone
from state.factory import open_backends
from state.ports import CheckpointStore
from tests.integration.delta_graph import append
from tests.integration.test_write_behind import settings_for

COLD_BACKENDS = ["cosmos", "postgres"]
KINDS = ["delta", "add"]


class Loss:
    """Set `url` to make the graph's second node empty that Redis, once; and `back_to`
    (`snapshot`) to have it then hold that again, as a replica promoted while it lagged.
    LangGraph saves the first step's checkpoint while the second node runs: the loss must
    be one step, so that the save lands wholly before it (the next put finds its parent
    gone) or after (this one does); a save between a flush and a restore once failed the
    restore (BUSYKEY)."""

    url: str | None = None
    back_to: list[tuple[bytes, int, bytes]] | None = None


@pytest.fixture(autouse=True)
def no_loss_left_armed() -> Iterator[None]:
    """A test that failed before its second node ran must not make the next one's lose its
    Redis (a fresh-clone run's one failure became nineteen that way)."""
    yield
    Loss.url, Loss.back_to = None, None


def snapshot(url: str) -> list[tuple[bytes, int, bytes]]:
    """Every key of the Redis at `url`: its name, TTL (0: none) and dump."""
    client = redis.Redis.from_url(url)
    return [(key, max(client.pttl(key), 0), client.dump(key)) for key in client.scan_iter()]


def two_steps(saver: BaseCheckpointSaver[Any], kind: str) -> Any:
    messages = (
        Annotated[list[str], DeltaChannel(append, snapshot_frequency=3)]
        if kind == "delta"
        else Annotated[list[str], operator.add]
    )
    state = TypedDict("state", {"messages": messages, "topic": str})  # type: ignore[valid-type]  # noqa: UP013

    def first(current: Any) -> Any:  # the only writer of `topic`
        return {"messages": ["first"], "topic": f"topic-{len(current['messages'])}"}

    def second(current: Any) -> Any:
        url, back_to = Loss.url, Loss.back_to
        Loss.url, Loss.back_to = None, None
        if url is not None:
            # One transaction: the promoted replica replaces the old state at once.
            with redis.Redis.from_url(url).pipeline(transaction=True) as switch:
                switch.flushall()
                for key, ttl, dumped in back_to or []:
                    switch.restore(key, ttl, dumped)
                switch.execute()
        return {"messages": ["second"]}

    graph: Any = StateGraph(state)
    graph.add_node("first", first)
    graph.add_node("second", second)
    graph.add_edge(START, "first")
    graph.add_edge("first", "second")
    graph.add_edge("second", END)
    return graph.compile(checkpointer=saver)


def config() -> RunnableConfig:
    return {"configurable": {"thread_id": f"loss-{uuid.uuid4().hex[:12]}"}}


@asynccontextmanager
async def saver_on(
    stack_env: dict[str, str], backend: str, redis_url: str
) -> AsyncIterator[TieredCheckpointSaver]:
    """A write-behind saver whose flusher runs only at boundaries (what a loss drops is
    then exactly what the run wrote since its last one)."""
    backends = await open_backends(settings_for(stack_env, backend, redis_url))
    try:
        assert backends.flusher is not None
        await backends.flusher.stop()
        yield TieredCheckpointSaver.from_backends(backends)
    finally:
        await backends.close()


async def values_and_history(saver: BaseCheckpointSaver[Any], kind: str, cfg: Any) -> Any:
    graph = two_steps(saver, kind)
    history = [snapshot async for snapshot in graph.aget_state_history(cfg)]
    stored = {snapshot.config["configurable"]["checkpoint_id"] for snapshot in history}
    parents = [s.parent_config["configurable"]["checkpoint_id"] for s in history if s.parent_config]
    assert all(parent in stored for parent in parents), "a checkpoint's parent is missing"
    return (await graph.aget_state(cfg)).values, [snapshot.values for snapshot in history]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_run_whose_unflushed_checkpoints_redis_lost_stops_and_the_boundary_stays_whole(
    backend: str, kind: str, stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    reference, ref_cfg, cfg = two_steps(InMemorySaver(), kind), config(), config()
    await reference.ainvoke({"messages": ["u1"]}, ref_cfg)
    at_boundary = await values_and_history(reference.checkpointer, kind, ref_cfg)
    async with saver_on(stack_env, backend, own_redis.url) as saver:
        graph = two_steps(saver, kind)
        await graph.ainvoke({"messages": ["u1"]}, cfg)
        await saver.aflush(cfg["configurable"]["thread_id"])  # the boundary: end of run 1
        Loss.url = own_redis.url
        with pytest.raises(HotStateLost):
            await graph.ainvoke({"messages": ["u2"]}, cfg)
        assert saver.losses_found == 1  # what the losses metric reads

    # Another worker: the cold tier is at the boundary, whole; the run is done again there.
    async with saver_on(stack_env, backend, own_redis.url) as fresh:
        assert await values_and_history(fresh, kind, cfg) == at_boundary
        done = await two_steps(fresh, kind).ainvoke({"messages": ["u2"]}, cfg)
    assert done == await reference.ainvoke({"messages": ["u2"]}, ref_cfg)


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_run_whose_redis_went_back_to_its_last_boundary_stops_as_lost(
    backend: str, stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """Redis goes back to what it held at the run's last boundary (a replica promoted while
    it lagged): it still caches that boundary's checkpoint, not the one the run's next put
    names as its parent, which neither the log nor the cold tier holds. That is Redis
    losing it (`HotStateLost`: the case app leaves the run for the timer, which resumes it
    from the cold tier), not a fork from a deleted checkpoint (`ParentGone`, a failed run)."""
    cfg = config()
    async with saver_on(stack_env, backend, own_redis.url) as saver:
        graph = two_steps(saver, "add")
        await graph.ainvoke({"messages": ["u1"]}, cfg)
        await saver.aflush(cfg["configurable"]["thread_id"])  # the boundary: end of run 1
        Loss.url, Loss.back_to = own_redis.url, snapshot(own_redis.url)
        with pytest.raises(HotStateLost):
            await graph.ainvoke({"messages": ["u2"]}, cfg)
        assert saver.losses_found == 1


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_flush_never_reports_stored_what_redis_lost_before_it(
    backend: str, stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    reference, ref_cfg, cfg = two_steps(InMemorySaver(), "add"), config(), config()
    await reference.ainvoke({"messages": ["u1"]}, ref_cfg)
    at_boundary = await values_and_history(reference.checkpointer, "add", ref_cfg)
    thread_id = cfg["configurable"]["thread_id"]
    async with saver_on(stack_env, backend, own_redis.url) as saver:
        graph = two_steps(saver, "add")
        await graph.ainvoke({"messages": ["u1"]}, cfg)
        await saver.aflush(thread_id)
        await graph.ainvoke({"messages": ["u2"]}, cfg)
        redis.Redis.from_url(own_redis.url).flushall()  # after the run, before its flush
        assert saver.losses_found == 0
        with pytest.raises(HotStateLost):
            await saver.aflush(thread_id)
        assert saver.losses_found == 1

    async with saver_on(stack_env, backend, own_redis.url) as fresh:
        assert await values_and_history(fresh, "add", cfg) == at_boundary


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_fork_whose_parent_only_the_cold_tier_has_goes_on(
    backend: str, stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    reference, ref_cfg, cfg = two_steps(InMemorySaver(), "add"), config(), config()
    thread_id = cfg["configurable"]["thread_id"]
    async with saver_on(stack_env, backend, own_redis.url) as saver:
        graph = two_steps(saver, "add")
        results = []
        for on, at in ((reference, ref_cfg), (graph, cfg)):
            await on.ainvoke({"messages": ["u1"]}, at)
            await on.ainvoke({"messages": ["u2"]}, at)
            older = [s async for s in on.aget_state_history(at)][3].config  # end of run 1
            fork = await on.aupdate_state(older, {"messages": ["forked"]}, as_node="second")
            if on is graph:
                # The fork is flushed: neither its cache entry (a fork drops it) nor its log
                # entry is left in Redis, only the cold tier has the next put's parent.
                await saver.aflush(thread_id)
            results.append(await on.ainvoke({"messages": ["u3"]}, fork))
        assert results[1] == results[0]
        await saver.aflush(thread_id)


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_fork_from_a_checkpoint_pruned_just_before_is_refused_not_lost(
    backend: str, stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """The prune dropped the thread's cache entry, so the log cannot tell a fork from a
    pruned checkpoint from a step past one Redis lost; the cold tier's latest, newer than
    that parent, does. Refused (`ParentGone`), the thread not lost: its next run goes on."""
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    async with saver_on(stack_env, backend, own_redis.url) as saver:
        graph = two_steps(saver, "add")
        await graph.ainvoke({"messages": ["u1"]}, cfg)
        await graph.ainvoke({"messages": ["u2"]}, cfg)
        older = [s async for s in graph.aget_state_history(cfg)][3].config  # end of run 1
        await saver.aflush(thread_id)
        await saver.aprune([thread_id])
        with pytest.raises(ParentGone):
            await saver.aput(older, empty_checkpoint(), {"source": "update", "step": 3}, {})
        assert saver.losses_found == 0
        done = await graph.ainvoke({"messages": ["u3"]}, cfg)
        assert done["messages"][-3:] == ["u3", "first", "second"]
        await saver.aflush(thread_id)
        assert saver.losses_found == 0


@pytest.mark.parametrize("delete", ["adelete_thread", "aprune"])
@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_put_from_a_checkpoint_of_a_deleted_thread_is_refused_not_lost(
    backend: str, delete: str, stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """The thread deleted whole, the cold tier holds nothing of it, as after Redis lost a
    thread never flushed; Redis's mark of the deletion tells them apart. A put from one of
    its old checkpoints (a run going on elsewhere) is refused (`ParentGone`), nothing
    counted lost, and the thread starts afresh."""
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    async with saver_on(stack_env, backend, own_redis.url) as saver:
        graph = two_steps(saver, "add")
        await graph.ainvoke({"messages": ["u1"]}, cfg)
        older = (await graph.aget_state(cfg)).config
        if delete == "aprune":
            await saver.aprune([thread_id], strategy="delete")
        else:
            await saver.adelete_thread(thread_id)
        with pytest.raises(ParentGone):
            await saver.aput(older, empty_checkpoint(), {"source": "update", "step": 3}, {})
        assert saver.losses_found == 0
        done = await graph.ainvoke({"messages": ["u2"]}, cfg)
        assert done["messages"] == ["u2", "first", "second"]
        await saver.aflush(thread_id)
        assert saver.losses_found == 0


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_redis_losing_a_thread_started_again_after_its_deletion_is_a_loss(
    backend: str, stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """Redis goes back to a state still holding the deletion's mark (a replica promoted
    while it lagged) and loses the steps of the thread started again since: their parent
    was made after the deletion, so its absence is a loss (`HotStateLost`), not a deletion."""
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    async with saver_on(stack_env, backend, own_redis.url) as saver:
        graph = two_steps(saver, "add")
        await graph.ainvoke({"messages": ["u0"]}, cfg)
        await saver.adelete_thread(thread_id)
        await graph.ainvoke({"messages": ["u1"]}, cfg)
        await saver.aflush(thread_id)  # the boundary: end of run 1
        Loss.url, Loss.back_to = own_redis.url, snapshot(own_redis.url)
        assert any(key.endswith(b":wb-deleted") for key, _, _ in Loss.back_to)
        with pytest.raises(HotStateLost):
            await graph.ainvoke({"messages": ["u2"]}, cfg)
        assert saver.losses_found == 1


def crash(server: RedisServer) -> None:
    """SIGKILL, as a crash: nothing of the log is saved (the servers run without persistence)."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    server.stop()


async def restart_after(server: RedisServer, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await asyncio.to_thread(server.start)


class CrashAfterApplying:
    """The flusher's cold store, crashing Redis right after its first batch is applied
    (before the flusher acknowledges it in the log) and restarting it empty 1 s later."""

    def __init__(self, store: CheckpointStore, server: RedisServer) -> None:
        self._store = store
        self._server = server
        self.restarted: asyncio.Task[None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def apply_batch(self, ops: Any, *, fence: int | None = None) -> None:
        await self._store.apply_batch(ops, fence=fence)
        if self.restarted is None:
            crash(self._server)
            self.restarted = asyncio.create_task(restart_after(self._server, 1.0))


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_boundary_whose_batch_landed_before_redis_crashed_is_reported_flushed(
    backend: str, stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    reference, ref_cfg, cfg = two_steps(InMemorySaver(), "add"), config(), config()
    await reference.ainvoke({"messages": ["u1"]}, ref_cfg)
    at_boundary = await values_and_history(reference.checkpointer, "add", ref_cfg)
    async with saver_on(stack_env, backend, own_redis.url) as saver:
        assert saver.flusher is not None
        crashing = CrashAfterApplying(saver.flusher.store, own_redis)
        saver.flusher.store = crashing
        await two_steps(saver, "add").ainvoke({"messages": ["u1"]}, cfg)
        # Redis crashes between the batch and its acknowledgement: the run's state is in
        # the cold tier, and the boundary says so once Redis is back (it raised before).
        await saver.aflush(cfg["configurable"]["thread_id"])
        assert crashing.restarted is not None
        await crashing.restarted

    async with saver_on(stack_env, backend, own_redis.url) as fresh:
        assert await values_and_history(fresh, "add", cfg) == at_boundary


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_boundary_whose_backlog_died_with_redis_stops_the_run_as_lost(
    backend: str, stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    cfg = config()
    async with saver_on(stack_env, backend, own_redis.url) as saver:
        await two_steps(saver, "add").ainvoke({"messages": ["u1"]}, cfg)
        crash(own_redis)
        restarted = asyncio.create_task(restart_after(own_redis, 1.0))
        # Back within REDIS_RETURN_SECONDS, empty: the run's checkpoints are gone, and it
        # is told so (it goes on from the cold tier) instead of only that Redis is out.
        with pytest.raises(HotStateLost):
            await saver.aflush(cfg["configurable"]["thread_id"])
        await restarted


async def test_a_boundary_waits_for_redis_no_longer_than_its_bound(
    stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    cfg = config()
    async with saver_on(stack_env, "postgres", own_redis.url) as saver:
        await two_steps(saver, "add").ainvoke({"messages": ["u1"]}, cfg)
        crash(own_redis)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as raised:
            await saver.aflush(cfg["configurable"]["thread_id"])
        waited = time.monotonic() - started
    assert not isinstance(raised.value, HotStateLost)
    assert REDIS_RETURN_SECONDS <= waited < REDIS_RETURN_SECONDS + 3


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_flush_reports_lost_what_redis_lost_though_another_worker_went_on_since(
    backend: str, stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """As above, but before this worker's flush another worker (its lock gone with Redis)
    runs the thread from what the cold tier holds, the last boundary: its newer checkpoint
    does not descend from the lost one, which no process ever stored. The flush must not
    take that newer checkpoint for the lost one flushed and gone past."""
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    async with (
        saver_on(stack_env, backend, own_redis.url) as saver,
        saver_on(stack_env, backend, own_redis.url) as other,
    ):
        graph = two_steps(saver, "add")
        await graph.ainvoke({"messages": ["u1"]}, cfg)
        await saver.aflush(thread_id)
        await graph.ainvoke({"messages": ["u2"]}, cfg)
        redis.Redis.from_url(own_redis.url).flushall()  # after the run, before its flush
        await two_steps(other, "add").ainvoke({"messages": ["u3"]}, cfg)
        await other.aflush(thread_id)
        with pytest.raises(HotStateLost):
            await saver.aflush(thread_id)
        assert saver.losses_found == 1


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_flush_reports_lost_what_redis_lost_though_another_worker_started_afresh(
    backend: str, stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """As above, but the lost steps were the thread's first: the cold tier held nothing, so
    the other worker starts the thread afresh. Its newer checkpoints go back to a root of
    their own, never through the lost steps: no more a flush of them gone past."""
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    async with (
        saver_on(stack_env, backend, own_redis.url) as saver,
        saver_on(stack_env, backend, own_redis.url) as other,
    ):
        await two_steps(saver, "add").ainvoke({"messages": ["u1"]}, cfg)
        redis.Redis.from_url(own_redis.url).flushall()  # after the run, before its flush
        await two_steps(other, "add").ainvoke({"messages": ["u3"]}, cfg)
        await other.aflush(thread_id)
        with pytest.raises(HotStateLost):
            await saver.aflush(thread_id)
        assert saver.losses_found == 1


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_flush_after_a_loss_ends_on_a_checkpoint_that_names_itself_its_parent(
    backend: str, stack_env: dict[str, str], own_redis: RedisServer
) -> None:
    """The lost steps' flush walks the parents of the newer cold checkpoint another worker
    wrote: one put with itself as its parent (LangGraph's `aput` takes any id) must not
    make that walk go round for ever."""
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    async with (
        saver_on(stack_env, backend, own_redis.url) as saver,
        saver_on(stack_env, backend, own_redis.url) as other,
    ):
        graph = two_steps(saver, "add")
        await graph.ainvoke({"messages": ["u1"]}, cfg)
        await saver.aflush(thread_id)
        boundary = (await saver.aget_tuple(cfg)).config  # type: ignore[union-attr]
        await graph.ainvoke({"messages": ["u2"]}, cfg)
        redis.Redis.from_url(own_redis.url).flushall()  # after the run, before its flush
        again = empty_checkpoint()
        named = await other.aput(boundary, again, {"source": "update", "step": 9}, {})
        await other.aput(named, again, {"source": "update", "step": 9}, {})
        await other.aflush(thread_id)
        stored = await other.store.get_checkpoint(thread_id, "", None, with_history=False)
        assert stored is not None and stored.parent_checkpoint_id == stored.checkpoint_id
        with pytest.raises(HotStateLost):
            await asyncio.wait_for(saver.aflush(thread_id), 30)
