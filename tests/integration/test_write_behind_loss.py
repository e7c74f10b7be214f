"""Redis losing a write-behind thread's unflushed checkpoints (FLUSHALL, a restart without
persistence), on real servers for each cold backend: the run that wrote them stops
(`HotStateLost`, a `BackendUnavailable`: the case app leaves it for the timer, which
resumes it from the cold tier), a flush never reports them stored, and the cold tier keeps
the last boundary whole, never a checkpoint whose parent or values went missing (found by
a fault hunt). A put whose parent only the cold tier has (a fork) still goes through."""

from __future__ import annotations

import operator
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypedDict

import pytest
import redis
from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from devstack import RedisServer
from state.checkpoint import TieredCheckpointSaver
from state.errors import HotStateLost
from state.factory import open_backends
from tests.integration.delta_graph import append
from tests.integration.test_write_behind import settings_for

COLD_BACKENDS = ["cosmos", "postgres"]
KINDS = ["delta", "add"]


class Loss:
    """Set `url` to make the graph's second node empty that Redis, once."""

    url: str | None = None


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
        if Loss.url is not None:
            redis.Redis.from_url(Loss.url).flushall()
            Loss.url = None
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

    # Another worker: the cold tier is at the boundary, whole; the run is done again there.
    async with saver_on(stack_env, backend, own_redis.url) as fresh:
        assert await values_and_history(fresh, kind, cfg) == at_boundary
        done = await two_steps(fresh, kind).ainvoke({"messages": ["u2"]}, cfg)
    assert done == await reference.ainvoke({"messages": ["u2"]}, ref_cfg)


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
        with pytest.raises(HotStateLost):
            await saver.aflush(thread_id)

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
