"""The local stack mechanism itself: real servers up on loopback, stopped by pid."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from devstack import RedisServer, ServerStartError, Stack, free_port, running


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_session_stack_serves_every_tier(stack: Stack) -> None:
    assert stack.redis and stack.cosmos and stack.postgres
    for server in stack.servers:
        assert _listening(server.port), server.name
    env = stack.env()
    assert env["COSMOS_ENDPOINT"].startswith("https://127.0.0.1:")
    assert env["REDIS_URL"].startswith("redis://127.0.0.1:")
    assert env["POSTGRES_URL"].startswith("postgresql://postgres@127.0.0.1:")


def test_second_stack_gets_other_ports_and_stops_its_own(tmp_path: Path, stack: Stack) -> None:
    other = Stack.plan(tmp_path, with_cosmos=False)
    with running(other):
        assert other.redis is not None and stack.redis is not None
        assert other.redis.port != stack.redis.port
        assert _listening(other.redis.port)
    assert not _listening(other.redis.port)
    # the session's own server is untouched
    assert _listening(stack.redis.port)


def test_port_in_use_is_reported(tmp_path: Path, stack: Stack) -> None:
    assert stack.redis is not None
    clash = RedisServer(port=stack.redis.port, workdir=tmp_path)
    with pytest.raises(ServerStartError, match="already in use"):
        clash.start()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
