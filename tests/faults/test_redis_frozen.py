"""A Redis that stops reading (its process frozen, as a paused VM is): a command the
client cannot finish sending fails typed within the socket timeout, and the connection
it leaves half-written is closed, never handed to the next caller. Runs go on at the
cold tier's speed meanwhile: after one timeout, the process stops waiting on that
server (`ServerCircuit`) until it answers a probe again."""

from __future__ import annotations

import asyncio
import operator
import time
import uuid
from collections.abc import Callable
from typing import Annotated, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph
from redis.exceptions import TimeoutError as RedisTimeoutError

from devstack import RedisServer
from state.checkpoint import TieredCheckpointSaver
from state.factory import backends_for
from state.hot.redis_client import FAIL_FAST_SECONDS, create_redis_client, round_trip
from state.settings import Settings

from .conftest import Recorder

SOCKET_TIMEOUT_SECONDS = 2.0  # `redis_client._client_kwargs`
# Far more than the loopback socket buffers hold, so the send blocks on the frozen server.
LARGE_VALUE = b"x" * 32_000_000


async def test_a_send_to_a_frozen_redis_fails_typed_in_time_and_leaves_no_half_command(
    settings_for: Callable[..., Settings],
    redis_server: Callable[..., RedisServer],
) -> None:
    server = redis_server()
    client = create_redis_client(settings_for("postgres", redis_url=server.url))
    key = f"frozen-{uuid.uuid4().hex[:10]}"
    try:
        await round_trip(client, [("SET", key, b"before")])  # connected, handshake done
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await round_trip(client, [("SET", key, LARGE_VALUE)], resend=False)
            waited = time.monotonic() - started
        finally:
            server.resume()
        assert SOCKET_TIMEOUT_SECONDS - 0.1 <= waited < SOCKET_TIMEOUT_SECONDS + 1.5
        # Time for the server to read whatever reached it: the SET its caller saw fail
        # never runs (a connection closed, not aborted, would still deliver the rest).
        await asyncio.sleep(1.0)
        assert await round_trip(client, [("GET", key)]) == [b"before"]
    finally:
        await client.aclose()


class Chat(TypedDict):
    messages: Annotated[list[str], operator.add]


def chat_graph(saver: TieredCheckpointSaver) -> object:
    graph = StateGraph(Chat)
    for node in ("billing", "account", "response"):
        graph.add_node(node, lambda _state, node=node: {"messages": [f"{node} " * 100]})
    graph.add_edge(START, "billing")
    graph.add_edge("billing", "account")
    graph.add_edge("account", "response")
    graph.add_edge("response", END)
    return graph.compile(checkpointer=saver)


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
async def test_runs_go_on_at_the_cold_tiers_speed_while_redis_is_frozen(
    settings_for: Callable[..., Settings],
    redis_server: Callable[..., RedisServer],
    reliability: Recorder,
    mode: str,
) -> None:
    """Each Redis call would wait out the socket timeout (twice, with the client's retry):
    an invoke took 24-28 s here while the server was frozen (4-node: 28-65 s). Now the
    first call to time out costs its caller that, the process stops sending to that
    server, and the runs go on against the cold tier; once the server answers a probe,
    Redis is used again."""
    server = redis_server()
    settings = settings_for("postgres", redis_url=server.url, state_write_mode=mode)
    async with backends_for(settings) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        graph = chat_graph(saver)

        async def invoke(thread_id: str) -> float:
            config = {"configurable": {"thread_id": thread_id}}
            started = time.monotonic()
            result = await graph.ainvoke({"messages": ["I was charged twice"]}, config)  # type: ignore[attr-defined]
            assert len(result["messages"]) % 4 == 0  # each invoke adds four
            return time.monotonic() - started

        await invoke(f"warm-{uuid.uuid4().hex[:8]}")
        frozen = [f"frozen-{uuid.uuid4().hex[:8]}-{n}" for n in range(5)]
        server.pause()
        try:
            took = [await invoke(thread_id) for thread_id in frozen]
            # Acknowledged is durable: each run's last checkpoint is in the cold tier.
            lost = [
                thread_id
                for thread_id in frozen
                if await backends.checkpoints.get_checkpoint(thread_id, "", None) is None
            ]
        finally:
            server.resume()
        assert lost == []
        # The first meets the timeout (and its retry); the rest do not wait on Redis at all.
        assert took[0] < 2 * SOCKET_TIMEOUT_SECONDS + 2.0
        assert sum(took[1:]) < 2.0, took
        await asyncio.sleep(FAIL_FAST_SECONDS + 0.1)
        thread_id = f"after-{uuid.uuid4().hex[:8]}"
        await invoke(thread_id)  # the first Redis call probes the server, and it answers
        await invoke(thread_id)
        assert saver.cache is not None
        cached = await saver.cache.lookup(thread_id, "", lease=False, with_history=False)
        assert cached is not None and cached.checkpoint is not None
    reliability.record(
        f"Redis frozen mid-run ({mode})",
        injected="Redis SIGSTOPped (hangs: connections accepted, nothing answered) for 5 "
        "invokes of a 3-node graph on Postgres",
        runs=len(took),
        lost_writes=len(lost),
        silent_overwrites=0,
        observed=f"first invoke {took[0]:.1f} s (the socket timeout and its retry), the "
        f"next {len(took) - 1} {sum(took[1:]):.2f} s in all on the cold tier; Redis used "
        "again once it answered a probe",
    )
