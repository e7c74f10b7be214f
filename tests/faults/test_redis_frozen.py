"""A Redis that stops reading (its process frozen, as a paused VM is): a command the
client cannot finish sending fails typed within the socket timeout, and the connection
it leaves half-written is closed, never handed to the next caller."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from devstack import RedisServer
from state.hot.redis_client import create_redis_client, round_trip
from state.settings import Settings

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
