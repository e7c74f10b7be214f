"""A run's fence seed (`aseed_fence`) is checked against the record's durable fence when
Redis holds none for the thread.

Run A (token 7) marked its case running, then stalled before its seed; run B took the case
over (token 8: the record's fence is 8), seeded Redis with 8 and wrote. Redis then lost
the fence key (it has a TTL, so volatile-lru may evict it; or a restart without
persistence). A wakes and seeds 7: admitted as already checked, it set the fence to 7 and
A's checkpoint writes were accepted into the cold tier, over B's.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from state.checkpoint import TieredCheckpointSaver
from state.errors import StaleFencingToken
from state.factory import Backends, backends_for
from state.hot.redis_client import create_redis_client, hot_key, hot_namespace
from state.settings import Settings


class Chat(TypedDict, total=False):
    messages: Annotated[list[str], operator.add]


def chat_graph(saver: TieredCheckpointSaver) -> CompiledStateGraph[Any, Any, Any, Any]:
    def reply(state: Chat) -> Chat:
        return {"messages": ["reply"]}

    graph = StateGraph(Chat)
    graph.add_node("reply", reply)
    graph.add_edge(START, "reply")
    graph.add_edge("reply", END)
    return graph.compile(checkpointer=saver)


def config(thread_id: str, fence: int) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "fencing_token": fence}}


Open = Callable[..., AbstractAsyncContextManager[Backends]]


@pytest.fixture(params=["cosmos", "postgres"])
def open_tiers(request: pytest.FixtureRequest, stack_env: dict[str, str]) -> Open:
    def build(mode: str) -> AbstractAsyncContextManager[Backends]:
        return backends_for(
            Settings.model_validate(
                {
                    "state_cold_backend": request.param,
                    "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
                    "cosmos_key": stack_env["COSMOS_KEY"],
                    "cosmos_create_if_missing": True,
                    "postgres_url": stack_env["POSTGRES_URL"],
                    "redis_url": stack_env["REDIS_URL"],
                    "state_write_mode": mode,
                }
            )
        )

    return build


async def cold_messages(backends: Backends, thread_id: str) -> list[str]:
    latest = await TieredCheckpointSaver(backends.checkpoints).aget_tuple(
        {"configurable": {"thread_id": thread_id}}
    )
    assert latest is not None
    return list(latest.checkpoint["channel_values"]["messages"])


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
async def test_a_stale_runs_seed_after_redis_lost_the_fence_is_checked_against_the_record(
    open_tiers: Open, mode: str
) -> None:
    thread_id = f"review-seed-{uuid.uuid4().hex[:12]}"
    async with open_tiers(mode) as backends:
        a = TieredCheckpointSaver.from_backends(backends)
        b = TieredCheckpointSaver.from_backends(backends)
        redis = create_redis_client(backends.settings)
        key = hot_key(thread_id, "wb-fence", namespace=hot_namespace(backends.settings))
        try:
            await backends.cold.create(thread_id, {"run": {}}, agent_id="review")
            # A (token 7) marks the case running, then stalls before `aseed_fence`.
            await backends.cold.update_section(
                thread_id, "run", {"by": 7}, expected_version=1, agent_id="a", fencing_token=7
            )
            # B takes the case over: its mark, its seed, its run.
            await backends.cold.update_section(
                thread_id, "run", {"by": 8}, expected_version=2, agent_id="b", fencing_token=8
            )
            await b.aseed_fence(thread_id, 8)
            await chat_graph(b).ainvoke({"messages": ["newer"]}, config(thread_id, 8))
            await b.aflush(thread_id)
            await redis.delete(key)  # the fence key evicted (it has a TTL)
            # A wakes: the service seeds, then runs the graph.
            outcome: Any
            try:
                await a.aseed_fence(thread_id, 7)
                await chat_graph(a).ainvoke({"messages": ["stale"]}, config(thread_id, 7))
                outcome = "accepted"
            except StaleFencingToken as exc:
                outcome = (exc.presented, exc.highest)
            await a.aflush(thread_id)
            stored = await cold_messages(backends, thread_id)
            assert (outcome, "stale" in stored) == ((7, 8), False), (outcome, stored)
        finally:
            await redis.aclose()
            await backends.cold.delete(thread_id)
