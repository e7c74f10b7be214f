"""Write-behind, what a boundary covers, in the orders LangGraph really saves: with
durability "async" a step's checkpoint put and its tasks' writes are saved concurrently,
so a task's result can reach the saver before the put of the checkpoint it belongs to. A
boundary (the step's interrupt) must not return while that result is in the Redis log
alone. A state update, written outside any run, is a boundary of its own; real
servers."""

from __future__ import annotations

import operator
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
import redis as redis_client
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from devstack import RedisServer, free_port
from state.checkpoint import TieredCheckpointSaver
from state.checkpoint.saver import DURABILITY_KEY
from state.errors import BackendUnavailable, HotStateLost
from tests.integration.test_write_behind import settings_for

COLD_BACKENDS = ["cosmos", "postgres"]


def config(thread_id: str | None = None, **extra: Any) -> RunnableConfig:
    thread_id = thread_id or f"wbr-{uuid.uuid4().hex[:12]}"
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": "", **extra}}


@contextmanager
def boundaries_only_saver(
    stack_env: dict[str, str], backend: str, workdir: Path
) -> Iterator[tuple[TieredCheckpointSaver, str]]:
    """A saver over a Redis of its own (a test may FLUSHALL it), background pass off:
    only boundaries flush."""
    redis = RedisServer(port=free_port(), workdir=workdir)
    redis.start()
    try:
        settings = settings_for(stack_env, backend, redis.url)
        with TieredCheckpointSaver.open_sync(settings) as saver:
            assert saver.flusher is not None
            saver._sync(saver.flusher.stop())
            yield saver, redis.url
    finally:
        redis.stop()


@pytest.fixture(params=COLD_BACKENDS)
def own_redis_saver(
    request: pytest.FixtureRequest, stack_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[TieredCheckpointSaver, str]]:
    with boundaries_only_saver(stack_env, request.param, tmp_path / "redis") as opened:
        yield opened


def _step_zero_flushed(saver: TieredCheckpointSaver) -> tuple[RunnableConfig, Any]:
    """Step 0 put and flushed; step 1's checkpoint made (its put not sent yet)."""
    assert saver.flusher is not None
    base = config(**{DURABILITY_KEY: "async"})
    thread_id = base["configurable"]["thread_id"]
    first = empty_checkpoint()
    at_first = saver.put(base, first, {"source": "loop", "step": 0}, {})
    saver.flush(thread_id)
    second = empty_checkpoint()
    second["channel_values"] = {"messages": ["a" * 1000]}
    second["channel_versions"] = {"messages": saver.get_next_version(None, None)}
    parent = config(thread_id, checkpoint_id=at_first["configurable"]["checkpoint_id"])
    parent["configurable"][DURABILITY_KEY] = "async"
    return parent, second


def _cold_task_ids(saver: TieredCheckpointSaver, thread_id: str, checkpoint_id: str) -> list[str]:
    stored = saver._sync(saver.store.get_writes(thread_id, "", checkpoint_id))
    return sorted(write.task_id for write in stored)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_sibling_result_sent_before_its_checkpoint_is_not_left_in_the_log_when_redis_blips(
    own_redis_saver: tuple[TieredCheckpointSaver, str], api: str
) -> None:
    """Step 1, durability "async": `sibling`'s result on checkpoint C reaches the log
    before C's own put; Redis blips for the put (C goes to the cold tier whole) and for
    `ask`'s interrupt on C (cold too). C's cold copy says nothing of the writes on it:
    the interrupt must not return while `sibling`'s result is in the log alone."""
    saver, _ = own_redis_saver
    assert saver.flusher is not None
    parent, checkpoint = _step_zero_flushed(saver)
    thread_id = parent["configurable"]["thread_id"]
    at_checkpoint = config(thread_id, checkpoint_id=checkpoint["id"], **{DURABILITY_KEY: "async"})
    saver.put_writes(at_checkpoint, [("messages", ["b"])], "sibling")

    blocking, log = saver._blocking, saver.flusher.log
    assert blocking is not None
    originals = {
        (target, name): getattr(target, name)
        for target, name in [
            (blocking, "append_put_blocking"),
            (blocking, "append_writes_blocking"),
            (log, "append_put"),
            (log, "append_writes"),
        ]
    }

    def out(*_args: Any, **_kwargs: Any) -> Any:
        raise BackendUnavailable("redis", "connection reset")

    async def aout(*_args: Any, **_kwargs: Any) -> Any:
        raise BackendUnavailable("redis", "connection reset")

    for target, name in originals:
        setattr(target, name, out if name.endswith("_blocking") else aout)
    versions = checkpoint["channel_versions"]
    try:
        if api == "sync":
            saver.put(parent, checkpoint, {"source": "loop", "step": 1}, versions)
        else:
            saver._sync(saver.aput(parent, checkpoint, {"source": "loop", "step": 1}, versions))
        outcome = "returned"
        interrupt = [("__interrupt__", "approve?")]
        try:
            if api == "sync":
                saver.put_writes(at_checkpoint, interrupt, "ask")
            else:
                saver._sync(saver.aput_writes(at_checkpoint, interrupt, "ask"))
        except BackendUnavailable:
            outcome = "refused"
    finally:
        for (target, name), original in originals.items():
            setattr(target, name, original)
    tasks = _cold_task_ids(saver, thread_id, checkpoint["id"])
    assert outcome == "refused" or tasks == ["ask", "sibling"], (outcome, tasks)


def test_a_sibling_result_redis_lost_before_its_checkpoint_was_put_fails_the_interrupt(
    own_redis_saver: tuple[TieredCheckpointSaver, str],
) -> None:
    """Step 1, durability "async": `sibling`'s result on checkpoint C reaches the log
    before C's own put; Redis loses it (a restart without persistence); C's put and
    `ask`'s interrupt on C then reach the (empty) log and the interrupt's flush stores
    them. The interrupt must not be acknowledged: `sibling`'s result exists nowhere."""
    saver, redis_url = own_redis_saver
    parent, checkpoint = _step_zero_flushed(saver)
    thread_id = parent["configurable"]["thread_id"]
    at_checkpoint = config(thread_id, checkpoint_id=checkpoint["id"], **{DURABILITY_KEY: "async"})
    saver.put_writes(at_checkpoint, [("messages", ["b"])], "sibling")
    redis_client.Redis.from_url(redis_url).flushall()
    saver.put(parent, checkpoint, {"source": "loop", "step": 1}, checkpoint["channel_versions"])
    outcome = "returned"
    try:
        saver.put_writes(at_checkpoint, [("__interrupt__", "approve?")], "ask")
    except HotStateLost:
        outcome = "HotStateLost"
    tasks = _cold_task_ids(saver, thread_id, checkpoint["id"])
    assert outcome == "HotStateLost" or tasks == ["ask", "sibling"], (outcome, tasks)


class Note(TypedDict):
    text: str
    steps: int


def _note_graph(saver: TieredCheckpointSaver) -> Any:
    builder = StateGraph(Note)
    builder.add_node("first", lambda state: {"steps": state["steps"] + 1})
    builder.add_node("second", lambda state: {"steps": state["steps"] + 1})
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", END)
    return builder.compile(checkpointer=saver)


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize("as_node", [None, "__copy__"], ids=["edit", "fork"])
def test_a_state_update_returns_once_its_checkpoint_is_in_the_cold_tier(
    own_redis_saver: tuple[TieredCheckpointSaver, str], api: str, as_node: str | None
) -> None:
    """`update_state` (an edit, or a fork of the latest checkpoint) is written outside any
    run: no run's end flushes it. Once it returns, Redis may be lost (a restart without
    persistence) and the new checkpoint stays."""
    saver, redis_url = own_redis_saver
    assert saver.flusher is not None
    graph = _note_graph(saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    graph.invoke({"text": "draft", "steps": 0}, cfg)
    saver.flush(thread_id)
    values = {"text": "edited by a reviewer"} if as_node is None else None
    if api == "sync":
        updated = graph.update_state(cfg, values, as_node=as_node)
    else:
        updated = saver._sync(graph.aupdate_state(cfg, values, as_node=as_node))
    assert not saver._sync(saver.flusher.log.pending(thread_id))
    stored = saver._sync(
        saver.store.get_checkpoint(thread_id, "", updated["configurable"]["checkpoint_id"])
    )
    assert stored is not None
    redis_client.Redis.from_url(redis_url).flushall()
    state = graph.get_state(cfg)
    assert state.config["configurable"]["checkpoint_id"] == updated["configurable"]["checkpoint_id"]
    assert state.values == {"text": values["text"] if values else "draft", "steps": 2}


def test_a_run_from_a_state_updates_checkpoint_flushes_only_at_its_own_boundaries(
    own_redis_saver: tuple[TieredCheckpointSaver, str],
) -> None:
    """The update's checkpoint is a boundary until a run starts from it: that run's writes
    on it are the run's, not the update's, and do not each wait for the cold tier."""
    saver, _ = own_redis_saver
    graph = _note_graph(saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    graph.invoke({"text": "draft", "steps": 0}, cfg)
    saver.flush(thread_id)
    updated = graph.update_state(cfg, {"text": "again"}, as_node="__start__")
    flushes: list[str] = []
    flush_thread = saver._flush_thread

    async def counted(thread: str) -> None:
        flushes.append(thread)
        await flush_thread(thread)

    saver._flush_thread = counted  # type: ignore[method-assign]
    try:
        done = graph.invoke(None, updated, durability="async")
    finally:
        del saver._flush_thread
    assert done == {"text": "again", "steps": 4}
    assert flushes == []


class Fan(TypedDict):
    items: Annotated[list[str], operator.add]
    done: Annotated[list[str], operator.add]


def test_a_state_updates_sends_are_in_the_cold_tier_when_it_returns(
    own_redis_saver: tuple[TieredCheckpointSaver, str],
) -> None:
    """`update_state(as_node="fan")` runs `fan`'s edges: their `Send` is saved as a write
    beside the update's checkpoint. Both are durable once the update returns: with Redis
    lost then, the next run still does the sent work."""
    saver, redis_url = own_redis_saver
    builder = StateGraph(Fan)
    builder.add_node("fan", lambda _state: {})
    builder.add_node("work", lambda item: {"done": [f"worked on {item}"]})
    builder.add_edge(START, "fan")
    builder.add_conditional_edges("fan", lambda state: [Send("work", i) for i in state["items"]])
    builder.add_edge("work", END)
    graph = builder.compile(checkpointer=saver, interrupt_before=["fan"])
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    graph.invoke({"items": [], "done": []}, cfg)
    saver.flush(thread_id)
    graph.update_state(cfg, {"items": ["refund"]}, as_node="fan")
    redis_client.Redis.from_url(redis_url).flushall()
    assert graph.invoke(None, cfg)["done"] == ["worked on refund"]
