"""Small channel values stored inline in the checkpoint record, on every backend and mode,
against LangGraph's InMemorySaver: LangGraph hands a put its live channel objects, and
some change in place after the handover without a new version (a join barrier's set of
finished nodes, an accumulating `Topic`). A checkpoint keeps the value its version had
(found by a fault hunt: every stack stored the changed value, or, once it had grown past
the inline limit, none at all)."""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.channels.topic import Topic
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from state.checkpoint.saver import INLINE_MAX_ITEMS
from tests.integration.delta_graph import STACK_IDS, STACKS, open_stack, settings_for, thread_config


class Posted(TypedDict, total=False):
    topic: Annotated[list[str], Topic(str, accumulate=True)]
    turn: int


def posting_graph(saver: BaseCheckpointSaver[Any]) -> Any:
    """START -> x -> (a, b): a and b post to an accumulating topic; b asks on turn 2."""

    def x(state: Posted) -> Posted:
        return {"turn": state.get("turn", 0) + 1}

    def a(state: Posted) -> Posted:
        return {"topic": ["a"]}

    def b(state: Posted) -> Posted:
        answer = interrupt("b?") if state["turn"] == 2 else None
        return {"topic": [f"b={answer}"]}

    graph = StateGraph(Posted)
    graph.add_node("x", x)
    graph.add_node("a", a)
    graph.add_node("b", b)
    graph.add_edge(START, "x")
    graph.add_edge("x", "a")
    graph.add_edge("x", "b")
    graph.add_edge("a", END)
    graph.add_edge("b", END)
    return graph.compile(checkpointer=saver)


class Logged(TypedDict, total=False):
    log: Annotated[list[str], operator.add]


def joining_graph(saver: BaseCheckpointSaver[Any]) -> Any:
    """START -> (a, b) -> c, c waiting for both (a join barrier); b asks every turn."""

    def a(state: Logged) -> Logged:
        return {"log": ["a"]}

    def b(state: Logged) -> Logged:
        return {"log": [f"b={interrupt('b?')}"]}

    def c(state: Logged) -> Logged:
        return {"log": ["c"]}

    graph = StateGraph(Logged)
    graph.add_node("a", a)
    graph.add_node("b", b)
    graph.add_node("c", c)
    graph.add_edge(START, "a")
    graph.add_edge(START, "b")
    graph.add_edge(["a", "b"], "c")
    graph.add_edge("c", END)
    return graph.compile(checkpointer=saver)


async def posted_then_resumed(saver: BaseCheckpointSaver[Any]) -> tuple[Any, Any]:
    """Turn 1 fills the topic to the inline limit; on turn 2 (durability "exit": the last
    put goes after LangGraph's in-place append) b asks, then the answer resumes it."""
    graph, config = posting_graph(saver), thread_config("posted")
    initial = [f"m{i}" for i in range(INLINE_MAX_ITEMS - 2)]
    await graph.ainvoke({"topic": initial}, config, durability="exit")
    await graph.ainvoke({"turn": 1}, config, durability="exit")
    asked = (await graph.aget_state(config)).values
    done = await graph.ainvoke(Command(resume="1"), config, durability="exit")
    return asked, done


async def forked_at_the_join(saver: BaseCheckpointSaver[Any]) -> tuple[Any, Any]:
    """Two turns stopped by b's question (the first answered); then a fork of the second
    stop as if b had finished, and what runs from it."""
    graph, config = joining_graph(saver), thread_config("joined")
    await graph.ainvoke({"log": []}, config, durability="exit")
    await graph.ainvoke(Command(resume="1"), config, durability="exit")
    await graph.ainvoke({"log": []}, config, durability="exit")
    stopped = await graph.aget_state(config)
    fork = await graph.aupdate_state(stopped.config, {"log": ["fork"]}, as_node="b")
    forked = await graph.aget_state(fork)
    return forked.next, await graph.ainvoke(None, fork, durability="exit")


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_a_value_changed_in_place_after_its_put_is_stored_as_its_version_had_it(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    want = await posted_then_resumed(InMemorySaver())
    assert len(want[1]["topic"]) == INLINE_MAX_ITEMS + 2  # past the inline limit at the end
    async with open_stack(settings_for(stack_env, backend, redis, mode)) as opened:
        assert await posted_then_resumed(opened.saver) == want


@pytest.mark.parametrize(("backend", "redis", "mode"), STACKS, ids=STACK_IDS)
async def test_a_fork_of_a_stop_at_a_join_keeps_the_barrier_its_checkpoint_had(
    backend: str, redis: bool, mode: str, stack_env: dict[str, str]
) -> None:
    want = await forked_at_the_join(InMemorySaver())
    assert want[0] == ()  # the barrier was empty there: c does not run from the fork
    async with open_stack(settings_for(stack_env, backend, redis, mode)) as opened:
        assert await forked_at_the_join(opened.saver) == want
