"""A chat-style graph for checkpoint tests: four nodes in a row, each appending a ~1 KB
message to `messages` (the benchmark's workload), optionally ending in a review interrupt."""

from __future__ import annotations

import itertools
import operator
from typing import Annotated, Any, TypedDict

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import interrupt

MESSAGE = "x" * 1024
NODES = ("intake", "billing", "account", "reply")
# Checkpoints one invoke leaves: input, start, one per node.
CHECKPOINTS_PER_INVOKE = 2 + len(NODES)


class Chat(TypedDict, total=False):
    messages: Annotated[list[str], operator.add]
    approved: bool


def chat_graph(
    saver: BaseCheckpointSaver[Any], *, ask: bool = False
) -> CompiledStateGraph[Any, Any, Any, Any]:
    def node(name: str) -> Any:
        def run(state: Chat) -> Chat:
            return {"messages": [f"{name}:{MESSAGE}"]}

        return run

    def review(state: Chat) -> Chat:
        return {"approved": bool(interrupt({"question": "approve?"}))}

    graph = StateGraph(Chat)
    for name in NODES:
        graph.add_node(name, node(name))
    graph.add_edge(START, NODES[0])
    for first, second in itertools.pairwise(NODES):
        graph.add_edge(first, second)
    if ask:
        graph.add_node("review", review)
        graph.add_edge(NODES[-1], "review")
        graph.add_edge("review", END)
    else:
        graph.add_edge(NODES[-1], END)
    return graph.compile(checkpointer=saver)
