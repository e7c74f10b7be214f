"""DeltaChannel histories larger than a Cosmos item (2 MB, enforced by `LimitedTransport`),
in writes across many checkpoints or in one snapshot: the state rebuilt at every
checkpoint equals InMemorySaver's, warm and read from the cold tier alone."""

from __future__ import annotations

import random
import string
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from state.cold import cosmos_client
from tests.integration.delta_graph import append, open_stack, settings_for, thread_config
from tests.integration.test_delta_graph_shapes import histories, states
from tests.support.cosmos_limits import LimitedTransport


def text(seed: int, size: int) -> str:
    """Incompressible, and the same in both graphs for the same seed."""
    rng = random.Random(seed)
    return "".join(rng.choices(string.ascii_letters, k=size))


def big_graph(saver: BaseCheckpointSaver[Any], frequency: int, size: int) -> Any:
    Conversation = TypedDict(  # type: ignore[misc]  # noqa: UP013
        "Conversation",
        {"messages": Annotated[list[str], DeltaChannel(append, snapshot_frequency=frequency)]},
    )

    def reply(state: dict[str, Any]) -> dict[str, Any]:
        n = len(state["messages"])
        return {"messages": [text(n, size), text(-n, size)]}

    graph = StateGraph(Conversation)
    graph.add_node("reply", reply)
    graph.add_edge(START, "reply")
    graph.add_edge("reply", END)
    return graph.compile(checkpointer=saver)


@pytest.mark.parametrize(
    ("redis", "mode", "frequency"),
    [(False, "write-through", 4), (True, "write-through", 1000), (True, "write-behind", 4)],
    ids=[
        "cold-write-through-snapshots",
        "redis-write-through-writes-only",
        "redis-write-behind-snapshots",
    ],
)
async def test_cosmos_history_over_the_item_limit(
    redis: bool,
    mode: str,
    frequency: int,
    stack_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transport = LimitedTransport()
    monkeypatch.setattr(cosmos_client, "EnvironmentProxyTransport", lambda: transport)
    settings = settings_for(stack_env, "cosmos", redis, mode)
    reference_saver = InMemorySaver()
    reference = big_graph(reference_saver, frequency, 200_000)
    ref_cfg = thread_config("ref")
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = big_graph(saver, frequency, 200_000)
        cfg = thread_config()
        thread_id = cfg["configurable"]["thread_id"]
        for n in range(8):
            got = await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
            assert got == await reference.ainvoke({"messages": [f"user {n}"]}, ref_cfg)
        assert await states(graph, cfg) == await states(reference, ref_cfg)
        await saver.aflush(thread_id)
        if saver.cache is not None:
            await saver.cache.invalidate(thread_id)
        assert await histories(saver, cfg) == await histories(reference_saver, ref_cfg)
        got = await graph.ainvoke({"messages": ["after"]}, cfg)
        assert got == await reference.ainvoke({"messages": ["after"]}, ref_cfg)
        assert transport.violations == []
