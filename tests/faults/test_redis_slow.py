"""A Redis that answers, slowly (a busy server, a distant one): every command takes about a
second, within the client's socket timeout. An event read that waits for new events
(`XREAD BLOCK`, what every open `GET .../events` stream does) waits at the server as long
as its caller chose on top of that: it ends when its wait is over, and does not count as
the server gone silent, which would fail every other caller's commands for a while
(`ServerCircuit`) and cut every open stream short."""

from __future__ import annotations

import asyncio
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


async def test_an_event_read_answered_past_its_wait_hands_its_late_reply_to_no_other_read(
    settings_for: Callable[..., Settings],
    redis_server: Callable[..., RedisServer],
) -> None:
    """A reply later than the socket timeout plus the read's wait: redis-py answers None
    for a read past a timeout its caller gave, and left the connection, its reply still to
    come, in the pool. The read said nothing came (an open stream waited on, events missed),
    and the next command on that connection got that reply: another case's events read as
    this one's."""
    server = redis_server()
    with LoopbackProxy(server.port) as proxy:
        client = create_redis_client(
            settings_for("postgres", redis_url=f"redis://{LOOPBACK}:{proxy.port}/0")
        )
        events = RedisEventLog(client, namespace="late", max_events=100, ttl_seconds=60)
        try:
            await events.append("case-late-a", {"event": "a"})
            await events.append("case-late-b", {"event": "b"})
            # The read's reply held 1.5 s each way: 3 s, past the socket timeout plus its
            # 0.5 s wait. The server is quick again by the time the read is retried.
            proxy.latency_seconds = 1.5
            reading = asyncio.ensure_future(events.read("case-late-a", after=None, wait_ms=500))
            await asyncio.sleep(2.0)  # its request went through, its reply is held
            proxy.latency_seconds = 0.0
            assert [event.data for event in await reading] == [{"event": "a"}]
            assert circuit_for(LOOPBACK, proxy.port).open_until == 0.0
            later = await events.read("case-late-b", after=None, wait_ms=0)
            assert [event.data for event in later] == [{"event": "b"}]
            assert await client.ping()
        finally:
            proxy.latency_seconds = 0.0
            await client.aclose()
