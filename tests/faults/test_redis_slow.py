"""A Redis that answers, slowly (a busy server, a distant one): every command takes about a
second, within the client's socket timeout. An event read that waits for new events
(`XREAD BLOCK`, what every open `GET .../events` stream does) waits at the server as long
as its caller chose on top of that: it ends when its wait is over, and does not count as
the server gone silent, which would fail every other caller's commands for a while
(`ServerCircuit`) and cut every open stream short."""

from __future__ import annotations

import time
from collections.abc import Callable

from devstack import RedisServer
from state.hot.redis_client import circuit_for, create_redis_client
from state.hot.redis_events import MAX_WAIT_MS, RedisEventLog
from state.settings import Settings

from .proxy import LOOPBACK, LoopbackProxy

SOCKET_TIMEOUT_SECONDS = 2.0  # `redis_client._client_kwargs`
# Held each way: a round trip of a second, half the socket timeout; a read waiting its
# longest then answers half a second past the socket timeout.
LATENCY_SECONDS = 0.5


async def test_an_event_read_waiting_on_a_slow_redis_ends_with_its_wait_and_opens_no_circuit(
    settings_for: Callable[..., Settings],
    redis_server: Callable[..., RedisServer],
) -> None:
    server = redis_server()
    with LoopbackProxy(server.port) as proxy:
        client = create_redis_client(
            settings_for("postgres", redis_url=f"redis://{LOOPBACK}:{proxy.port}/0")
        )
        events = RedisEventLog(client, namespace="slow", max_events=100, ttl_seconds=60)
        try:
            first = await events.append("case-slow", {"event": "run_queued"})
            proxy.latency_seconds = LATENCY_SECONDS
            started = time.monotonic()
            assert await events.read("case-slow", after=first, wait_ms=MAX_WAIT_MS) == []
            waited = time.monotonic() - started
            assert waited > SOCKET_TIMEOUT_SECONDS  # it did outlast the socket timeout
            assert circuit_for(LOOPBACK, proxy.port).open_until == 0.0
            # Other callers' commands still go to the server, at its own pace.
            assert await client.ping()
            later = await events.read("case-slow", after=None, wait_ms=0)
            assert [event.data for event in later] == [{"event": "run_queued"}]
        finally:
            proxy.latency_seconds = 0.0
            await client.aclose()
