"""A DeltaChannel conversation graph and the stacks it runs on, for the DeltaChannel tests.

One node appends two ~1 KB messages per invoke to a `DeltaChannel` list (the issue's
workload); each invoke also adds the user's message as graph input. Stacks are opened
with `open_backends`, as the app opens them, in every mode a deployment can choose.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from state.checkpoint import TieredCheckpointSaver
from state.factory import Backends, open_backends
from state.settings import Settings

MESSAGE = "m" * 1024

# (cold backend, with Redis, write mode)
STACKS = [
    ("postgres", False, "write-through"),
    ("postgres", True, "write-through"),
    ("postgres", True, "write-behind"),
    ("cosmos", False, "write-through"),
    ("cosmos", True, "write-through"),
    ("cosmos", True, "write-behind"),
]
STACK_IDS = [f"{b}-{'redis' if r else 'cold'}-{m}" for b, r, m in STACKS]


def append(state: list[str], batches: Sequence[list[str]]) -> list[str]:
    return [*state, *(message for batch in batches for message in batch)]


def delta_graph(
    saver: BaseCheckpointSaver[Any], *, snapshot_frequency: int = 5, message: str = MESSAGE
) -> CompiledStateGraph[Any, Any, Any, Any]:
    # Built at run time: the channel's snapshot frequency is a parameter.
    conversation = TypedDict(  # type: ignore[misc]  # noqa: UP013
        "conversation",
        {
            "messages": Annotated[
                list[str], DeltaChannel(append, snapshot_frequency=snapshot_frequency)
            ]
        },
    )

    def reply(state: dict[str, list[str]]) -> dict[str, list[str]]:
        n = len(state["messages"])
        return {"messages": [f"a{n}:{message}", f"b{n}:{message}"]}

    graph = StateGraph(conversation)
    graph.add_node("reply", reply)
    graph.add_edge(START, "reply")
    graph.add_edge("reply", END)
    return graph.compile(checkpointer=saver)


def thread_config(prefix: str = "delta") -> RunnableConfig:
    return {"configurable": {"thread_id": f"{prefix}-{uuid.uuid4().hex[:12]}"}}


def settings_for(
    stack_env: dict[str, str], backend: str, redis: bool, mode: str, **extra: Any
) -> Settings:
    values: dict[str, Any] = {
        "state_cold_backend": backend,
        "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
        "cosmos_key": stack_env["COSMOS_KEY"],
        "cosmos_create_if_missing": True,
        "postgres_url": stack_env["POSTGRES_URL"],
        "state_write_mode": mode,
        **extra,
    }
    if redis:
        values["redis_url"] = stack_env["REDIS_URL"]
    return Settings.model_validate(values)


@dataclass
class Opened:
    saver: TieredCheckpointSaver
    backends: Backends


@asynccontextmanager
async def open_stack(settings: Settings) -> AsyncIterator[Opened]:
    backends = await open_backends(settings)
    try:
        yield Opened(TieredCheckpointSaver.from_backends(backends), backends)
    finally:
        await backends.close()
