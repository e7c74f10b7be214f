"""Write-behind state Redis lost (flushed, as by a restart without persistence), on real
servers: a subgraph step lost before its interrupt is never acknowledged; a thread marked
lost while its cold root could not be read is unmarked once another process went on; a
retention mark the previous release set (a TTL, no deadline) still refuses appends."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any, TypedDict

import pytest
import redis as redis_client
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from devstack import RedisServer, free_port
from state.checkpoint import TieredCheckpointSaver
from state.errors import BackendUnavailable, HotStateLost
from tests.integration.test_write_behind import settings_for
from tests.integration.test_write_behind_boundaries import (
    COLD_BACKENDS,
    _wait_for_put,
    cold_only,
    wait_for,
)


def config() -> RunnableConfig:
    return {"configurable": {"thread_id": f"rvb-{uuid.uuid4().hex[:12]}", "checkpoint_ns": ""}}


class Steps(TypedDict):
    done: int
    answer: str


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize("backend", COLD_BACKENDS)
def test_a_subgraph_put_whose_parent_redis_lost_does_not_let_the_interrupt_be_acknowledged(
    backend: str, api: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """Root -> task-scoped subgraph `outer` (namespace 'outer:<task>'): prep -> mid -> ask.
    The root's step 0 is in the cold tier; the subgraph's step 1 (the one running `mid`, a
    side effect) is in the log alone when Redis restarts empty. The subgraph's next put
    (the step running `ask`) finds its parent nowhere: `_parent_stored` raises HotStateLost
    in LangGraph's background put, which LangGraph drops as the subgraph exits with the
    interrupt. The interrupt must not be acknowledged: the run fails, or a fresh process
    finds the subgraph paused at `ask` and `mid` is not run again on resume."""
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    opened: list[TieredCheckpointSaver] = []
    mids: list[int] = []
    flushed_all = threading.Event()

    def prep(state: dict[str, Any]) -> dict[str, Any]:
        if opened:
            saver = opened[0]
            assert saver.flusher is not None
            # The background pass: the root's step 0 applied. From here only boundaries flush.
            saver._sync(saver.flusher.stop())
            _wait_for_put(saver, thread_id, subgraph=False, step=0, or_stored=True)
            saver._sync(saver.flusher.flush_thread(thread_id))
        return {"done": state["done"] + 1}

    def mid(state: dict[str, Any]) -> dict[str, Any]:
        mids.append(1)
        if opened and not flushed_all.is_set():
            flushed_all.set()
            # The subgraph's step running `mid` is in the log (an async put), not cold.
            _wait_for_put(opened[0], thread_id, subgraph=True, step=1)
            redis_client.Redis.from_url(redis.url).flushall()  # restart without persistence
        return {"done": state["done"] + 1}

    parent_checked = threading.Event()

    def ask(state: dict[str, Any]) -> dict[str, Any]:
        if opened:  # LangGraph's background put of this step has found its parent lost
            wait_for(parent_checked.is_set, "the put of the step running `ask`")
        return {"answer": interrupt("approve?")}

    inner = StateGraph(Steps)
    inner.add_node("prep", prep)
    inner.add_node("mid", mid)
    inner.add_node("ask", ask)
    inner.add_edge(START, "prep")
    inner.add_edge("prep", "mid")
    inner.add_edge("mid", "ask")
    inner.add_edge("ask", END)
    outer = StateGraph(Steps)
    outer.add_node("outer", inner.compile())
    outer.add_edge(START, "outer")
    outer.add_edge("outer", END)
    try:
        settings = settings_for(stack_env, backend, redis.url)
        acknowledged = False
        with TieredCheckpointSaver.open_sync(settings) as saver:
            parent_stored = saver._parent_stored

            async def noting(put: Any) -> None:
                try:
                    await parent_stored(put)
                finally:
                    parent_checked.set()

            saver._parent_stored = noting  # type: ignore[method-assign]
            opened.append(saver)
            graph = outer.compile(checkpointer=saver)
            try:
                if api == "async":  # the app's way: astream/ainvoke on the saver's loop
                    paused = saver._sync(graph.ainvoke({"done": 0, "answer": ""}, cfg))
                    saver._sync(saver.aflush(thread_id))
                else:
                    paused = graph.invoke({"done": 0, "answer": ""}, cfg)
                    saver.flush(thread_id)  # the app's end-of-run flush
                assert "__interrupt__" in paused
                acknowledged = True
            except BackendUnavailable:
                pass  # not acknowledged (HotStateLost is one)
            opened.clear()
        redis.stop()
        if not acknowledged:
            return
        with TieredCheckpointSaver.open_sync(cold_only(settings)) as fresh:
            graph = outer.compile(checkpointer=fresh)
            state = graph.get_state(cfg, subgraphs=True)
            sub = state.tasks[0].state if state.tasks else None
            sub_next = sub.next if sub is not None else None
            done = graph.invoke(Command(resume="yes"), cfg)
        observed = {"subgraph next": sub_next, "mid ran": len(mids), "result": done}
        assert observed == {
            "subgraph next": ("ask",),
            "mid ran": 1,
            "result": {"done": 2, "answer": "yes"},
        }, observed
    finally:
        redis.stop()


class Pair(TypedDict):
    a: int
    answer: str


@pytest.mark.parametrize("backend", COLD_BACKENDS)
def test_a_lost_mark_taken_while_the_cold_root_could_not_be_read_does_not_stay_forever(
    backend: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """As test_the_lost_mark_does_not_outlive_the_run_another_process_redid, but the cold
    tier blips just as process 1 marks the thread lost (its root read fails: ROOT_UNKNOWN).
    Process 2 redoes and finishes the run from the cold tier. Process 1's later flush of
    the thread (the app's `_flush` before a rollback, after a failed run) must return once
    nothing is missing; with ROOT_UNKNOWN it raises HotStateLost for ever (until a run of
    the thread starts in process 1)."""
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    opened: list[TieredCheckpointSaver] = []
    flushed = threading.Event()

    def work(state: dict[str, Any]) -> dict[str, Any]:
        if opened:
            saver = opened[0]
            assert saver.flusher is not None
            saver._sync(saver.flusher.stop())
            _wait_for_put(saver, thread_id, subgraph=False, step=0, or_stored=True)
            saver._sync(saver.flusher.flush_thread(thread_id))
        return {"a": state["a"] + 1}

    def ask(state: dict[str, Any]) -> dict[str, Any]:
        if opened and not flushed.is_set():
            flushed.set()
            _wait_for_put(opened[0], thread_id, subgraph=False, step=1)
            redis_client.Redis.from_url(redis.url).flushall()
        return {"answer": interrupt("approve?")}

    builder = StateGraph(Pair)
    builder.add_node("work", work)
    builder.add_node("ask", ask)
    builder.add_edge(START, "work")
    builder.add_edge("work", "ask")
    builder.add_edge("ask", END)
    try:
        settings = settings_for(stack_env, backend, redis.url)
        with TieredCheckpointSaver.open_sync(settings) as one:
            opened.append(one)
            cold_root = one._cold_root
            blips = [BackendUnavailable(backend, "throttled (injected, once)")]

            async def blip_once(thread: str) -> str | None:
                if blips:
                    raise blips.pop()
                return await cold_root(thread)

            one._cold_root = blip_once  # type: ignore[method-assign]
            with pytest.raises(HotStateLost):
                builder.compile(checkpointer=one).invoke({"a": 0, "answer": ""}, cfg)
            opened.clear()
            assert not blips, "the mark should have been taken with the cold read failing"
            # Process 2 (the timer's worker) redoes the run and finishes it.
            with TieredCheckpointSaver.open_sync(settings) as two:
                graph = builder.compile(checkpointer=two)
                graph.invoke(None, cfg)
                done = graph.invoke(Command(resume="yes"), cfg)
                two.flush(thread_id)
            assert done == {"a": 1, "answer": "yes"}, done
            outcomes = []
            for _ in range(3):  # the cold tier answers again: not one flush returns
                try:
                    one.flush(thread_id)
                    outcomes.append("returned")
                except HotStateLost:
                    outcomes.append("HotStateLost")
            assert outcomes[-1] == "returned", (outcomes, dict(one._lost))
    finally:
        redis.stop()


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_refusal_mark_the_previous_release_set_still_refuses_appends(
    backend: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """A rolling deployment: a worker still on the release before e1ca1f9 runs the retention
    sweep and marks the thread `wb-expiring` as that release did ('1' with a TTL) while it
    deletes it; a worker on this release goes on with a run of the thread. Its append reads
    the mark as a deadline (1 ms after the epoch), finds it past, deletes it and accepts
    the step, which a flusher then applies onto the deleted thread."""
    from langgraph.checkpoint.base import empty_checkpoint

    from state.errors import ThreadExpiring
    from state.hot.redis_write_behind import EXPIRING_KIND

    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    try:
        settings = settings_for(stack_env, backend, redis.url)
        with TieredCheckpointSaver.open_sync(settings) as saver:
            assert saver.flusher is not None
            at = saver.put(cfg, empty_checkpoint(), {"source": "loop", "step": 0}, {})
            mark = saver.flusher.log._key(thread_id, EXPIRING_KIND)  # type: ignore[attr-defined]
            # What the previous release's discard script did: SET mark '1' PX <1 h>.
            redis_client.Redis.from_url(redis.url).set(mark, "1", px=3_600_000)
            outcome = "accepted"
            try:
                saver.put(at, empty_checkpoint(), {"source": "loop", "step": 1}, {})
            except ThreadExpiring:
                outcome = "refused"
            left = redis_client.Redis.from_url(redis.url).exists(mark)
            assert (outcome, left) == ("refused", 1), (outcome, left)
    finally:
        redis.stop()
