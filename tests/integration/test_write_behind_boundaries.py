"""Write-behind, Redis lost at a boundary (killed, or flushed as by a restart without
persistence): an interrupt is acknowledged only when what it stands on is in the cold
tier, whatever namespaces and sibling tasks took part; real servers."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
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


def prep_then_ask(prep: Callable[[], None], lose_redis: Callable[[], None]) -> Any:
    """Root -> subgraph `outer` (the parent's checkpointer: namespace 'outer:<task>'):
    `prep` (a side effect: the caller's hook), then `ask`, which calls `lose_redis`, then a
    small subgraph from inside the node (its puts go cold: the thread is 'written
    through'), then asks for approval."""
    counting_builder = StateGraph(Counted)
    counting_builder.add_node("inc", lambda state: {"x": state["x"] + 1})
    counting_builder.add_edge(START, "inc")
    counting_builder.add_edge("inc", END)
    counting = counting_builder.compile()

    def prepare(state: dict[str, Any]) -> dict[str, Any]:
        prep()
        return {"prepared": state["prepared"] + 1}

    def ask(state: dict[str, Any]) -> dict[str, Any]:
        lose_redis()
        counting.invoke({"x": 0})
        return {"answer": interrupt("approve?")}

    inner = StateGraph(Inner)
    inner.add_node("prep", prepare)
    inner.add_node("ask", ask)
    inner.add_edge(START, "prep")
    inner.add_edge("prep", "ask")
    inner.add_edge("ask", END)
    outer = StateGraph(Outer)
    outer.add_node("outer", inner.compile())
    outer.add_edge(START, "outer")
    outer.add_edge("outer", END)
    return outer


def assert_resumes_at_ask(
    settings: Settings, outer: Any, cfg: RunnableConfig, prepared: list[int]
) -> None:
    """An acknowledged interrupt, as a fresh process finds it with Redis gone for good:
    the subgraph paused at `ask`, and `prep` not run again on resume."""
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


@pytest.mark.parametrize("redis_fault", ["killed", "flushed"])
@pytest.mark.parametrize("backend", COLD_BACKENDS)
# Redis killed never returns: the boundary gives up on it soon, as it would after 5 s.
@pytest.mark.usefixtures("impatient_for_redis")
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

    def prep() -> None:
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

    def lose_redis() -> None:
        if not killed.is_set():
            killed.set()
            if redis_fault == "killed":
                redis.stop()  # for good
            else:  # a restart without persistence: Redis answers again, empty
                redis_client.Redis.from_url(redis.url).flushall()

    outer = prep_then_ask(prep, lose_redis)
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
        if acknowledged:
            # A fresh process (Redis gone for good) must find it as answered.
            assert_resumes_at_ask(settings, outer, cfg, prepared)
    finally:
        redis.stop()


class Pair(TypedDict):
    a: int
    answer: str


@pytest.mark.parametrize("redis_fault", ["killed", "flushed"])
@pytest.mark.parametrize("backend", COLD_BACKENDS)
# Redis killed never returns: the boundary gives up on it soon, as it would after 5 s.
@pytest.mark.usefixtures("impatient_for_redis")
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
            background_pass_then_stop(saver, thread_id)
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


def _wait_for_put(
    saver: TieredCheckpointSaver,
    thread_id: str,
    *,
    subgraph: bool,
    step: int,
    or_stored: bool = False,
) -> None:
    """Until the log holds the step's put (LangGraph makes puts in the background), or
    (`or_stored`, a root step) the cold tier has it: a flusher took it there first."""
    assert saver.flusher is not None
    log = saver.flusher.log

    def logged() -> bool:
        if any(
            type(entry.op).__name__ == "CheckpointPut"
            and (entry.op.checkpoint.checkpoint_ns != "") == subgraph
            and entry.op.checkpoint.metadata.get("step") == step
            for entry in saver._sync(log.read(thread_id, count=1000))
        ):
            return True
        if not or_stored:
            return False
        stored = saver._sync(saver.store.get_checkpoint(thread_id, "", None))
        return stored is not None and stored.metadata.get("step") == step

    wait_for(logged, f"the put of step {step} in the log")


def background_pass_then_stop(saver: TieredCheckpointSaver, thread_id: str) -> None:
    """What the background pass does, once: the thread's log so far (the root's step 0
    among it, once LangGraph's background put of it is there) applied to the cold tier.
    From here only boundaries flush."""
    assert saver.flusher is not None
    saver._sync(saver.flusher.stop())
    _wait_for_put(saver, thread_id, subgraph=False, step=0, or_stored=True)
    saver._sync(saver.flusher.flush_thread(thread_id))


@pytest.mark.parametrize("backend", COLD_BACKENDS)
def test_a_status_read_during_the_run_does_not_clear_the_lost_mark(
    backend: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """As test_an_interrupt_inside_a_task_subgraph_is_not_acknowledged... ('flushed'): the
    subgraph's boundary finds its step lost (HotStateLost, dropped by LangGraph) and the
    thread is marked lost. Meanwhile the case's status endpoint reads the root's latest
    (`aget_state`, same process, same saver) - which is not 'a run starting over'. The
    root's interrupt must still not be acknowledged."""
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    opened: list[TieredCheckpointSaver] = []
    graphs: list[Any] = []
    prepared: list[int] = []
    lost_seen: list[str] = []
    killed = threading.Event()

    def prep() -> None:
        prepared.append(1)
        if opened:
            saver = opened[0]
            assert saver.flusher is not None
            saver._sync(saver.flusher.stop())
            saver._sync(saver.flusher.flush_thread(thread_id))

    def lose_redis() -> None:
        if not killed.is_set():
            killed.set()
            if opened:  # the subgraph's step that runs `ask` is in the log (an async put)
                _wait_for_put(opened[0], thread_id, subgraph=True, step=1)
            redis_client.Redis.from_url(redis.url).flushall()  # restart without persistence

    outer = prep_then_ask(prep, lose_redis)
    try:
        settings = settings_for(stack_env, backend, redis.url)
        acknowledged = False
        with TieredCheckpointSaver.open_sync(settings) as saver:
            opened.append(saver)
            graph = outer.compile(checkpointer=saver)
            graphs.append(graph)
            confirm = saver._confirm_flushed

            async def confirm_then_status_read(*args: Any) -> None:
                try:
                    await confirm(*args)
                except HotStateLost as exc:
                    lost_seen.append(str(exc))
                    if len(lost_seen) == 1:
                        # GET /cases/{id} served meanwhile by this worker.
                        await graphs[0].aget_state(cfg)
                    raise

            saver._confirm_flushed = confirm_then_status_read  # type: ignore[method-assign]
            try:
                paused = graph.invoke({"prepared": 0, "answer": ""}, cfg)
                assert "__interrupt__" in paused
                saver.flush(thread_id)  # the app's end-of-run flush
                acknowledged = True
            except BackendUnavailable:
                pass
            opened.clear()
        redis.stop()
        assert lost_seen, "the subgraph's boundary should have found its step lost"
        if acknowledged:
            assert_resumes_at_ask(settings, outer, cfg, prepared)
    finally:
        redis.stop()


@pytest.mark.parametrize("root_unread", [False, True], ids=["root-read", "root-unread"])
@pytest.mark.parametrize("backend", COLD_BACKENDS)
def test_the_lost_mark_does_not_outlive_the_run_another_process_redid(
    backend: str, root_unread: bool, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """Process 1's run loses its step with Redis (FLUSHALL): its interrupt fails with
    HotStateLost and the thread is marked lost in process 1 (`root_unread`: the cold tier
    blipped as the mark was taken, so the mark could not hold the cold root). The timer's
    worker (process 2) redoes the run from the cold tier and finishes it. Later process 1
    is asked to flush the thread (the app's `_flush`, e.g. before a rollback or after a
    failed run): nothing of it is missing any more, so the flush must return."""
    from typing import TypedDict

    class State(TypedDict):
        a: int
        answer: str

    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    opened: list[TieredCheckpointSaver] = []
    flushed = threading.Event()

    def work(state: dict[str, Any]) -> dict[str, Any]:
        if opened:
            background_pass_then_stop(opened[0], thread_id)
        return {"a": state["a"] + 1}

    def ask(state: dict[str, Any]) -> dict[str, Any]:
        if opened and not flushed.is_set():
            flushed.set()
            _wait_for_put(opened[0], thread_id, subgraph=False, step=1)

            redis_client.Redis.from_url(redis.url).flushall()
        return {"answer": interrupt("approve?")}

    builder = StateGraph(State)
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
            blips = [BackendUnavailable(backend, "throttled (injected)")] if root_unread else []

            async def blip_once(thread: str) -> str | None:
                if blips:
                    raise blips.pop()
                return await cold_root(thread)

            one._cold_root = blip_once  # type: ignore[method-assign]
            with pytest.raises(HotStateLost):
                builder.compile(checkpointer=one).invoke({"a": 0, "answer": ""}, cfg)
            opened.clear()
            assert not blips, "the mark was taken without reading the cold root"
            # Process 2 (the timer's worker) redoes the run and finishes it.
            with TieredCheckpointSaver.open_sync(settings) as two:
                graph = builder.compile(checkpointer=two)
                graph.invoke(None, cfg)
                done = graph.invoke(Command(resume="yes"), cfg)
                two.flush(thread_id)
            assert done == {"a": 1, "answer": "yes"}, done
            outcome = "returned"
            try:
                one.flush(thread_id)
            except HotStateLost as exc:
                outcome = f"HotStateLost: {exc}"
            assert outcome == "returned", (outcome, sorted(one._lost))
    finally:
        redis.stop()


@pytest.mark.parametrize("backend", COLD_BACKENDS)
def test_a_sibling_write_appended_during_a_cold_check_stays_tracked(
    backend: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """Sync API, two tasks of one step on caller threads. `work`'s writes (A) are in the
    log, and another process's flusher already applied them. Redis blips for `ask`'s
    interrupt write, which goes to the cold tier; its boundary checks the root's writes
    with a cold read (`_writes_stand_alone`). While that read is in flight, sibling task
    `more` appends its writes (B) to the log from its thread. The boundary must not then
    count B as confirmed: after FLUSHALL, B exists nowhere, yet flush() returns. (B, at
    the checkpoint the interrupt named, is a boundary of its own now: cold once written.)"""
    from langgraph.checkpoint.base import empty_checkpoint

    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    try:
        settings = settings_for(stack_env, backend, redis.url)
        with (
            TieredCheckpointSaver.open_sync(settings) as saver,
            TieredCheckpointSaver.open_sync(settings) as other,
        ):
            assert saver.flusher is not None and other.flusher is not None
            saver._sync(saver.flusher.stop())
            other._sync(other.flusher.stop())
            checkpoint = empty_checkpoint()
            at = saver.put(cfg, checkpoint, {"source": "loop", "step": 0}, {})
            at = {"configurable": {**at["configurable"], "durability": "async"}}
            saver.put_writes(at, [("a", 1)], "work")
            other._sync(other.flusher.flush_thread(thread_id))  # another process's flusher

            in_read, go_on = threading.Event(), threading.Event()
            get_writes = saver.store.get_writes

            async def gated(*args: Any) -> Any:
                found = await get_writes(*args)
                if not in_read.is_set():  # the boundary's cold check alone
                    in_read.set()
                    while not go_on.is_set():
                        import asyncio

                        await asyncio.sleep(0.01)
                return found

            saver.store.get_writes = gated  # type: ignore[method-assign]
            blocking = saver._blocking
            assert blocking is not None
            append = blocking.append_writes_blocking
            blips = [BackendUnavailable("redis", "connection reset")]

            def blip_once(*args: Any, **kwargs: Any) -> Any:
                if blips:
                    raise blips.pop()
                return append(*args, **kwargs)

            blocking.append_writes_blocking = blip_once  # type: ignore[method-assign]
            asked = threading.Thread(
                target=saver.put_writes, args=(at, [("__interrupt__", "approve?")], "ask")
            )
            asked.start()
            assert in_read.wait(20)
            saver.put_writes(at, [("b", 2)], "more")  # the sibling, from its own thread
            go_on.set()
            asked.join(20)
            saver.store.get_writes = get_writes  # type: ignore[method-assign]

            redis_client.Redis.from_url(redis.url).flushall()  # B was in the log alone
            outcome = "flush returned"
            try:
                saver.flush(thread_id)
            except HotStateLost:
                outcome = "HotStateLost"
            stored = saver._sync(
                saver.store.get_writes(thread_id, "", at["configurable"]["checkpoint_id"])
            )
            tasks = sorted(write.task_id for write in stored)
            assert outcome == "HotStateLost" or "more" in tasks, (outcome, tasks)
    finally:
        redis.stop()


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
            background_pass_then_stop(opened[0], thread_id)
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

            async def noting(put: Any, *, fork: bool) -> None:
                try:
                    await parent_stored(put, fork=fork)
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
