"""Review of e26cdb1 (write-behind, Redis out at a boundary): real servers."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from devstack import RedisServer, free_port
from state.checkpoint import TieredCheckpointSaver
from state.errors import BackendUnavailable
from state.settings import Settings
from tests.integration.test_write_behind import settings_for

COLD_BACKENDS = ["cosmos", "postgres"]


def config() -> RunnableConfig:
    return {"configurable": {"thread_id": f"rev-{uuid.uuid4().hex[:12]}", "checkpoint_ns": ""}}


class Counted(TypedDict):
    x: int


class Inner(TypedDict):
    prepared: int
    answer: str


class Outer(TypedDict):
    prepared: int
    answer: str


def cold_only(settings: Settings) -> Settings:
    return Settings.model_validate(
        {**settings.model_dump(), "redis_url": None, "state_write_mode": "write-through"}
    )


def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("redis_fault", ["killed", "flushed"])
@pytest.mark.parametrize("backend", COLD_BACKENDS)
def test_an_interrupt_inside_a_task_subgraph_is_not_acknowledged_while_its_step_is_in_the_log(
    backend: str, redis_fault: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """Root -> subgraph `outer` (the parent's checkpointer: namespace 'outer:<task>'):
    `prep` (a side effect), then `ask`. The background flusher stored the root's step and
    the subgraph's first steps; the subgraph's step that runs `ask` is in the log alone.
    `ask` kills Redis, calls a small subgraph (its puts go cold: the thread is 'written
    through'), then asks. The interrupt must not be acknowledged (the subgraph's step is
    lost with Redis): the run fails, or a fresh process finds the subgraph paused at `ask`
    and `prep` is not run again on resume."""
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    opened: list[TieredCheckpointSaver] = []
    prepared: list[int] = []
    killed = threading.Event()

    counting_builder = StateGraph(Counted)
    counting_builder.add_node("inc", lambda state: {"x": state["x"] + 1})
    counting_builder.add_edge(START, "inc")
    counting_builder.add_edge("inc", END)
    counting = counting_builder.compile()  # a subgraph called from inside a node

    def prep(state: dict[str, Any]) -> dict[str, Any]:
        prepared.append(1)
        if opened:
            saver = opened[0]
            assert saver.flusher is not None
            # What the background pass does: the thread's log so far (the root's step 0,
            # the subgraph's first steps) applied to the cold tier. From here only
            # boundaries flush.
            saver._sync(saver.flusher.stop())
            saver._sync(saver.flusher.flush_thread(thread_id))
            stored = saver._sync(saver.store.get_checkpoint(thread_id, "", None))
            assert stored is not None and stored.metadata.get("step") == 0
        return {"prepared": state["prepared"] + 1}

    def ask(state: dict[str, Any]) -> dict[str, Any]:
        if not killed.is_set():
            killed.set()
            if redis_fault == "killed":
                redis.stop()  # for good
            else:  # a restart without persistence: Redis answers again, empty
                import redis as redis_client

                redis_client.Redis.from_url(redis.url).flushall()
        counting.invoke({"x": 0})
        return {"answer": interrupt("approve?")}

    inner = StateGraph(Inner)
    inner.add_node("prep", prep)
    inner.add_node("ask", ask)
    inner.add_edge(START, "prep")
    inner.add_edge("prep", "ask")
    inner.add_edge("ask", END)
    outer = StateGraph(Outer)
    outer.add_node("outer", inner.compile())
    outer.add_edge(START, "outer")
    outer.add_edge("outer", END)
    try:
        settings = settings_for(stack_env, backend, redis.url)
        acknowledged = False
        with TieredCheckpointSaver.open_sync(settings) as saver:
            opened.append(saver)
            graph = outer.compile(checkpointer=saver)
            try:
                paused = graph.invoke({"prepared": 0, "answer": ""}, cfg)
                assert "__interrupt__" in paused
                saver.flush(thread_id)  # the app's end-of-run flush
                acknowledged = True
            except BackendUnavailable:
                pass  # not acknowledged (HotStateLost is one): what the design asks for
            opened.clear()
        redis.stop()
        if not acknowledged:
            return
        # Acknowledged: a fresh process (Redis gone for good) must find it as answered.
        with TieredCheckpointSaver.open_sync(cold_only(settings)) as fresh:
            graph = outer.compile(checkpointer=fresh)
            state = graph.get_state(cfg, subgraphs=True)
            sub = state.tasks[0].state
            sub_next = sub.next if sub is not None else None
            done = graph.invoke(Command(resume="yes"), cfg)
        observed = {"subgraph next": sub_next, "prep ran": len(prepared), "result": done}
        assert observed == {
            "subgraph next": ("ask",),
            "prep ran": 1,
            "result": {"prepared": 1, "answer": "yes"},
        }, observed
    finally:
        redis.stop()


class Pair(TypedDict):
    a: int
    answer: str


@pytest.mark.parametrize("redis_fault", ["killed", "flushed"])
@pytest.mark.parametrize("backend", COLD_BACKENDS)
def test_an_interrupt_is_not_acknowledged_while_a_sibling_tasks_writes_are_in_the_log(
    backend: str, redis_fault: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """Root step with two tasks: `work` (a side effect) finishes, its writes go to the log
    (the background flusher had stored the checkpoint they belong to); Redis dies; `ask`
    asks. The interrupt must not be acknowledged while `work`'s writes are in the log
    alone: the run fails, or a fresh process finds `work` done and does not run it again."""
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    opened: list[TieredCheckpointSaver] = []
    worked: list[int] = []
    killed, flushed = threading.Event(), threading.Event()

    def work(state: dict[str, Any]) -> dict[str, Any]:
        worked.append(1)
        if opened:
            saver = opened[0]
            assert saver.flusher is not None
            # What the background pass does: the thread's log so far (the root's step 0
            # among it) applied to the cold tier. From here only boundaries flush.
            saver._sync(saver.flusher.stop())
            saver._sync(saver.flusher.flush_thread(thread_id))
            stored = saver._sync(saver.store.get_checkpoint(thread_id, "", None))
            assert stored is not None and stored.metadata.get("step") == 0
            flushed.set()
        return {"a": state["a"] + 1}

    def ask(state: dict[str, Any]) -> dict[str, Any]:
        if opened and not killed.is_set():
            saver = opened[0]
            assert saver.flusher is not None
            log = saver.flusher.log
            wait_for(flushed.is_set, "the root's step 0 flushed")
            wait_for(
                lambda: any(
                    type(entry.op).__name__ == "WritesPut"
                    for entry in saver._sync(log.read(thread_id, count=100))
                ),
                "work's writes in the log",
            )
            killed.set()
            if redis_fault == "killed":
                redis.stop()  # for good: the interrupt's writes go to the cold tier
            else:  # a restart without persistence: the interrupt's writes go to the log
                import redis as redis_client

                redis_client.Redis.from_url(redis.url).flushall()
        return {"answer": interrupt("approve?")}

    builder = StateGraph(Pair)
    builder.add_node("work", work)
    builder.add_node("ask", ask)
    builder.add_edge(START, "work")
    builder.add_edge(START, "ask")
    builder.add_edge("work", END)
    builder.add_edge("ask", END)
    try:
        settings = settings_for(stack_env, backend, redis.url)
        acknowledged = False
        with TieredCheckpointSaver.open_sync(settings) as saver:
            opened.append(saver)
            graph = builder.compile(checkpointer=saver)
            try:
                paused = graph.invoke({"a": 0, "answer": ""}, cfg)
                assert "__interrupt__" in paused
                saver.flush(thread_id)  # the app's end-of-run flush
                acknowledged = True
            except BackendUnavailable:
                pass  # not acknowledged (HotStateLost is one)
            opened.clear()
        redis.stop()
        if not acknowledged:
            return
        with TieredCheckpointSaver.open_sync(cold_only(settings)) as fresh:
            graph = builder.compile(checkpointer=fresh)
            state = graph.get_state(cfg)
            pending = sorted(state.next)
            done = graph.invoke(Command(resume="yes"), cfg)
        observed = {"next": pending, "work ran": len(worked), "result": done}
        assert observed == {"next": ["ask"], "work ran": 1, "result": {"a": 1, "answer": "yes"}}, (
            observed
        )
    finally:
        redis.stop()
