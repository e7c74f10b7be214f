"""Subgraph checkpoint namespaces (checkpoint_ns other than the root) through the saver,
on every cold store, in both write modes: an interrupt inside a subgraph, maintenance
that must forget a subgraph's cached entry even after Redis evicted the thread's
namespace index, and listings across namespaces."""

from __future__ import annotations

import asyncio
import operator
import uuid
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from state.checkpoint import TieredCheckpointSaver
from state.factory import Backends
from state.settings import WriteMode
from tests.contract.conftest import OpenBackends
from tests.support.records import unique_thread

MODES = [WriteMode.WRITE_THROUGH, WriteMode.WRITE_BEHIND]
NOTES = "x" * 600  # over the inline limit: stored as a value of its own


class Draft(TypedDict, total=False):
    topic: str
    trail: Annotated[list[str], operator.add]
    notes: str


def drafting(checkpointer: Any) -> Any:
    """start -> writer (a subgraph: draft, then a review that interrupts) -> finish."""

    def review(state: Draft) -> Draft:
        verdict = interrupt({"ask": "review", "notes": len(state["notes"])})
        return {"trail": [f"review:{verdict}"]}

    inner = StateGraph(Draft)
    inner.add_node("draft", lambda state: {"trail": ["draft"], "notes": NOTES + state["topic"]})
    inner.add_node("review", review)
    inner.add_edge(START, "draft")
    inner.add_edge("draft", "review")
    inner.add_edge("review", END)

    outer = StateGraph(Draft)
    outer.add_node("start", lambda _: {"trail": ["start"]})
    outer.add_node("writer", inner.compile())
    outer.add_node("finish", lambda _: {"trail": ["finish"]})
    outer.add_edge(START, "start")
    outer.add_edge("start", "writer")
    outer.add_edge("writer", "finish")
    outer.add_edge("finish", END)
    return outer.compile(checkpointer=checkpointer)


class Remembered(TypedDict, total=False):
    seen: Annotated[list[str], operator.add]
    word: str


def remembering(checkpointer: Any) -> Any:
    """A subgraph compiled with checkpointer=True: its namespace is its node's name, the
    same in every run, so its state carries over from run to run of the thread."""
    inner = StateGraph(Remembered)
    inner.add_node("remember", lambda state: {"seen": [state["word"]]})
    inner.add_edge(START, "remember")
    inner.add_edge("remember", END)
    outer = StateGraph(Remembered)
    outer.add_node("mem", inner.compile(checkpointer=True))
    outer.add_edge(START, "mem")
    outer.add_edge("mem", END)
    return outer.compile(checkpointer=checkpointer)


def config(thread_id: str, checkpoint_ns: str | None = None, **extra: Any) -> Any:
    configurable: dict[str, Any] = {"thread_id": thread_id, **extra}
    if checkpoint_ns is not None:
        configurable["checkpoint_ns"] = checkpoint_ns
    return {"configurable": configurable}


async def paused(saver: TieredCheckpointSaver, thread_id: str) -> tuple[Any, str]:
    """The drafting graph run to the subgraph's interrupt: (graph, the subgraph's namespace)."""
    graph = drafting(saver)
    await graph.ainvoke({"topic": "refund", "trail": []}, config(thread_id))
    state = await graph.aget_state(config(thread_id), subgraphs=True)
    assert state.next == ("writer",)
    inner = state.tasks[0].state
    assert inner is not None and inner.next == ("review",)
    assert inner.values["notes"] == NOTES + "refund"
    assert inner.values["trail"] == ["start", "draft"]
    return graph, inner.config["configurable"]["checkpoint_ns"]


async def finished_in_memory(thread_id: str) -> Any:
    graph = drafting(InMemorySaver())
    await graph.ainvoke({"topic": "refund", "trail": []}, config(thread_id))
    return await graph.ainvoke(Command(resume="ok"), config(thread_id))


async def evict_namespace_index(backends: Backends, thread_id: str) -> None:
    """What Redis does under `volatile-lru` to the index, which reads do not touch."""
    cache = backends.hot_checkpoints
    assert cache is not None
    assert await cache._client.delete(cache.namespaces_key(thread_id)) == 1


@pytest.mark.parametrize(
    ("mode", "hot"),
    [(WriteMode.WRITE_THROUGH, True), (WriteMode.WRITE_BEHIND, True), (None, False)],
    ids=["write-through", "write-behind", "cold-only"],
)
async def test_an_interrupt_inside_a_subgraph_resumes_to_the_same_result(
    cold_backend: str, mode: WriteMode | None, hot: bool, open_tiers: OpenBackends
) -> None:
    async with open_tiers(cold_backend, hot=hot, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        thread_id = unique_thread("subgraph")
        graph, _ = await paused(saver, thread_id)
        done = await graph.ainvoke(Command(resume="ok"), config(thread_id))
        assert done == await finished_in_memory(thread_id)
        assert (await graph.aget_state(config(thread_id), subgraphs=True)).next == ()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("evicted", [False, True], ids=["index-kept", "index-evicted"])
async def test_a_deleted_threads_subgraph_is_served_from_no_tier(
    cold_backend: str, mode: WriteMode, evicted: bool, open_tiers: OpenBackends
) -> None:
    async with open_tiers(cold_backend, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        thread_id = unique_thread("subgraph-delete")
        _, inner_ns = await paused(saver, thread_id)
        await saver.aflush(thread_id)
        assert await saver.aget_tuple(config(thread_id, inner_ns)) is not None  # cached
        if evicted:
            await evict_namespace_index(backends, thread_id)
        await saver.adelete_thread(thread_id)
        assert [found async for found in saver.alist(config(thread_id))] == []
        other_worker = TieredCheckpointSaver.from_backends(backends)
        for reader in (other_worker, saver):
            assert await reader.aget_tuple(config(thread_id, inner_ns)) is None
            # The sync API's read (a blocking hit where the saver has a blocking client).
            assert await asyncio.to_thread(reader.get_tuple, config(thread_id, inner_ns)) is None


@pytest.mark.parametrize("operation", ["prune", "delete_for_runs"])
async def test_maintenance_forgets_a_subgraphs_entry_the_index_no_longer_names(
    cold_backend: str, operation: str, open_tiers: OpenBackends
) -> None:
    async with open_tiers(cold_backend, mode=WriteMode.WRITE_THROUGH) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        thread_id = unique_thread("subgraph-maintenance")
        run_id = str(uuid.uuid4())
        graph = drafting(saver)
        await graph.ainvoke({"topic": "refund", "trail": []}, config(thread_id, run_id=run_id))
        state = await graph.aget_state(config(thread_id), subgraphs=True)
        inner_ns = state.tasks[0].state.config["configurable"]["checkpoint_ns"]
        assert await saver.aget_tuple(config(thread_id, inner_ns)) is not None
        await evict_namespace_index(backends, thread_id)
        if operation == "prune":
            await saver.aprune([thread_id], strategy="delete")
        else:
            await saver.adelete_for_runs([run_id])
        assert [found async for found in saver.alist(config(thread_id, inner_ns))] == []
        assert await saver.aget_tuple(config(thread_id, inner_ns)) is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("evicted", [False, True], ids=["index-kept", "index-evicted"])
async def test_a_deleted_threads_subgraph_state_does_not_flow_into_its_next_run(
    cold_backend: str, mode: WriteMode, evicted: bool, open_tiers: OpenBackends
) -> None:
    """The thread id used again after a delete: the persistent subgraph starts empty, and
    nothing of the deleted run reaches the cold tier again."""
    async with open_tiers(cold_backend, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        thread_id = unique_thread("subgraph-reuse")
        graph = remembering(saver)
        await graph.ainvoke({"word": "secret-1", "seen": []}, config(thread_id))
        await graph.ainvoke({"word": "secret-2", "seen": []}, config(thread_id))
        await saver.aflush(thread_id)
        if evicted:
            await evict_namespace_index(backends, thread_id)
        await saver.adelete_thread(thread_id)
        other_worker = TieredCheckpointSaver.from_backends(backends)
        await remembering(other_worker).ainvoke({"word": "new", "seen": []}, config(thread_id))
        await other_worker.aflush(thread_id)
        stored = [found async for found in other_worker.alist(config(thread_id, "mem"))]
        assert stored
        for found in stored:
            assert "secret-1" not in found.checkpoint["channel_values"].get("seen", [])
        latest = await other_worker.aget_tuple(config(thread_id, "mem"))
        assert latest is not None and latest.checkpoint["channel_values"]["seen"] == ["new"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_subgraph_checkpoint_named_without_its_namespace_is_listed(
    cold_backend: str, mode: WriteMode, open_tiers: OpenBackends
) -> None:
    """No namespace in the config means every namespace, as in LangGraph's savers, also
    when a checkpoint is named."""
    async with open_tiers(cold_backend, mode=mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        thread_id = unique_thread("subgraph-list")
        _, inner_ns = await paused(saver, thread_id)
        inner = [found async for found in saver.alist(config(thread_id, inner_ns))]
        assert inner and {t.config["configurable"]["checkpoint_ns"] for t in inner} == {inner_ns}
        inner_id = inner[0].config["configurable"]["checkpoint_id"]
        named = [found async for found in saver.alist(config(thread_id, checkpoint_id=inner_id))]
        assert [t.config["configurable"]["checkpoint_id"] for t in named] == [inner_id]
        assert named[0].config["configurable"]["checkpoint_ns"] == inner_ns
        everything = [found async for found in saver.alist(config(thread_id))]
        ids = [t.config["configurable"]["checkpoint_id"] for t in everything]
        assert ids == sorted(ids, reverse=True) and inner_id in ids
        assert {t.config["configurable"]["checkpoint_ns"] for t in everything} == {"", inner_ns}


async def test_a_subgraph_interrupt_survives_redis_losing_everything_after_its_flush(
    cold_backend: str, open_tiers: OpenBackends
) -> None:
    """The interrupt is a boundary: its flush puts the subgraph's state in the cold tier."""
    async with open_tiers(cold_backend, mode=WriteMode.WRITE_BEHIND) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        thread_id = unique_thread("subgraph-flushall")
        await paused(saver, thread_id)
        assert backends.hot_checkpoints is not None
        await backends.hot_checkpoints._client.flushall()
        other_worker = TieredCheckpointSaver.from_backends(backends)
        graph = drafting(other_worker)
        inner = (await graph.aget_state(config(thread_id), subgraphs=True)).tasks[0].state
        assert inner is not None and inner.next == ("review",)
        done = await graph.ainvoke(Command(resume="ok"), config(thread_id))
        assert done == await finished_in_memory(thread_id)


@pytest.mark.parametrize("mode", MODES)
async def test_early_writes_of_a_new_subgraph_namespace_survive_a_concurrent_read(
    cold_backend: str, mode: WriteMode, open_tiers: OpenBackends
) -> None:
    """A subgraph checkpoint's writes landing before its put (LangGraph overlaps the two),
    a reader of the namespace in between: the cached checkpoint keeps its writes."""
    async with open_tiers(cold_backend, mode=mode) as backends:
        writer = TieredCheckpointSaver.from_backends(backends)
        thread_id = unique_thread("subgraph-early")
        inner_ns = "writer:6f1c2a"
        checkpoint = empty_checkpoint()
        await writer.aput_writes(
            config(thread_id, inner_ns, checkpoint_id=checkpoint["id"]),
            [("trail", "draft")],
            task_id="t1",
        )
        poller = TieredCheckpointSaver.from_backends(backends)  # a UI, say, in another process
        assert await poller.aget_tuple(config(thread_id, inner_ns)) is None
        await writer.aput(
            config(thread_id, inner_ns), checkpoint, {"source": "loop", "step": 0}, {}
        )
        await writer.aflush(thread_id)
        reader = TieredCheckpointSaver.from_backends(backends)
        hit = await reader.aget_tuple(config(thread_id, inner_ns))
        assert hit is not None and hit.checkpoint["id"] == checkpoint["id"]
        assert [(w[1], w[2]) for w in hit.pending_writes or []] == [("trail", "draft")]
