"""The saver's DeltaChannel history over the in-memory fakes: the same state as LangGraph's
InMemorySaver after every invoke and at older checkpoints, in every mode, so the fake
store's chain walk matches the real stores' (tests/integration/test_delta_history.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from state import BackendUnavailable
from state.checkpoint import TieredCheckpointSaver
from tests.support.fakes import MemoryCheckpointStore, memory_backends


def append(state: list[str], batches: Sequence[list[str]]) -> list[str]:
    return [*state, *(message for batch in batches for message in batch)]


class Conversation(TypedDict):
    messages: Annotated[list[str], DeltaChannel(append, snapshot_frequency=3)]


def reply(state: Conversation) -> dict[str, list[str]]:
    n = len(state["messages"])
    return {"messages": [f"a{n}", f"b{n}"]}


def graph(saver: BaseCheckpointSaver[Any]) -> Any:
    builder = StateGraph(Conversation)
    builder.add_node("reply", reply)
    builder.add_edge(START, "reply")
    builder.add_edge("reply", END)
    return builder.compile(checkpointer=saver)


@pytest.mark.parametrize(
    ("hot", "write_behind"),
    [(False, False), (True, False), (True, True)],
    ids=["cold", "hot-write-through", "write-behind"],
)
async def test_the_rebuilt_conversation_matches_in_memory_savers(
    hot: bool, write_behind: bool
) -> None:
    config: RunnableConfig = {"configurable": {"thread_id": "case_8842"}}
    reference = graph(InMemorySaver())
    async with memory_backends(hot=hot, write_behind=write_behind) as backends:
        tiered = graph(TieredCheckpointSaver.from_backends(backends))
        for turn in range(10):
            expected = await reference.ainvoke({"messages": [f"user-{turn}"]}, config)
            assert await tiered.ainvoke({"messages": [f"user-{turn}"]}, config) == expected
        assert len(expected["messages"]) == 30
        history = [s async for s in tiered.aget_state_history(config)]
        assert len(history) == len([s async for s in reference.aget_state_history(config)])
        for older in history[::4]:
            state = await tiered.aget_state(older.config)
            assert state.values == older.values


@pytest.mark.parametrize("write_behind", [False, True], ids=["write-through", "write-behind"])
async def test_a_thread_this_process_wrote_from_its_root_needs_no_history_read(
    write_behind: bool,
) -> None:
    """The saver keeps the delta history of a thread it started: a load of its latest
    state asks no tier for it; maintenance of the thread, or another process (a saver
    of its own), goes back to the tiers and gets the same state."""
    config: RunnableConfig = {"configurable": {"thread_id": "case-chain"}}
    reference = graph(InMemorySaver())
    async with memory_backends(write_behind=write_behind) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        tiered = graph(saver)
        checkpoints = backends.checkpoints
        assert isinstance(checkpoints, MemoryCheckpointStore)
        for turn in range(8):  # past two snapshots (every 3 updates)
            expected = await reference.ainvoke({"messages": [f"user-{turn}"]}, config)
            assert await tiered.ainvoke({"messages": [f"user-{turn}"]}, config) == expected
            before = checkpoints.requests["delta_history"]
            assert (await tiered.aget_state(config)).values == expected
            assert checkpoints.requests["delta_history"] == before

        elsewhere = graph(TieredCheckpointSaver.from_backends(backends))
        assert (await elsewhere.aget_state(config)).values == expected
        assert checkpoints.requests["delta_history"] == before + 1

        # A copy leaves the source as it was; a prune of it does not (what a prune keeps
        # of a delta chain is the real stores' to show: test_delta_maintenance).
        await saver.acopy_thread("case-chain", "case-chain-copy")
        assert (await tiered.aget_state(config)).values == expected
        assert checkpoints.requests["delta_history"] == before + 1
        await saver.aprune(["case-chain"], strategy="keep_latest")
        await tiered.aget_state(config)
        assert checkpoints.requests["delta_history"] == before + 2


@pytest.mark.parametrize("write_behind", [False, True], ids=["write-through", "write-behind"])
async def test_a_thread_declared_new_is_started_without_a_read(write_behind: bool) -> None:
    """`expect_new_thread` (what the case app says of a case it has just created): the
    first run and the state read after it ask the cold tier for nothing; the declaration
    counts once, so a later reader of an unknown thread still asks."""
    config: RunnableConfig = {"configurable": {"thread_id": "case-declared"}}
    async with memory_backends(write_behind=write_behind) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        tiered = graph(saver)
        checkpoints = backends.checkpoints
        assert isinstance(checkpoints, MemoryCheckpointStore)
        reads = ("get_checkpoint", "get_blobs", "get_writes", "delta_history")
        saver.expect_new_thread("case-declared")
        before = {kind: checkpoints.requests[kind] for kind in reads}
        result = await tiered.ainvoke({"messages": ["user-0"]}, config)
        assert result == {"messages": ["user-0", "a1", "b1"]}
        assert (await tiered.aget_state(config)).values == result
        assert {kind: checkpoints.requests[kind] for kind in reads} == before

        saver.expect_new_thread("case-declared-late")
        await tiered.aget_state({"configurable": {"thread_id": "case-declared-late"}})
        unknown = checkpoints.requests["get_checkpoint"]
        await tiered.aget_state({"configurable": {"thread_id": "case-declared-late"}})
        assert checkpoints.requests["get_checkpoint"] == unknown + 1


@pytest.mark.parametrize("failing_flush", range(1, 6))
async def test_a_write_whose_boundary_failed_is_not_missing_from_the_history(
    failing_flush: int,
) -> None:
    """A synchronous boundary that fails after the append landed: the run fails, the step's
    write is stored, and a resume in the same process rebuilds what another process
    reads (the saver's own chain of the thread must not leave the write out)."""
    config: RunnableConfig = {"configurable": {"thread_id": f"case-boundary-{failing_flush}"}}
    async with memory_backends(write_behind=True) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        tiered = graph(saver)
        flusher = saver.flusher
        assert flusher is not None
        flush_thread = flusher.flush_thread
        calls = 0

        async def failing(thread_id: str) -> int:
            nonlocal calls
            calls += 1
            if calls == failing_flush:
                raise BackendUnavailable("memory", "the flush's cold write timed out")
            return await flush_thread(thread_id)

        flusher.flush_thread = failing  # type: ignore[method-assign]
        with pytest.raises(BackendUnavailable):
            await tiered.ainvoke({"messages": ["user-0"]}, config, durability="sync")
        flusher.flush_thread = flush_thread  # type: ignore[method-assign]
        await tiered.ainvoke(None, config, durability="sync")

        mine = (await tiered.aget_state(config)).values
        elsewhere = graph(TieredCheckpointSaver.from_backends(backends))
        assert mine == (await elsewhere.aget_state(config)).values
