"""Health answers promptly while a tier is partitioned (bytes vanish, no reset).

A partitioned server neither answers nor refuses: without a bound, a probe waits out
the client's socket timeout and its retry, and the app's report waited for each probe in
turn (about 8 s with Redis partitioned in write-behind mode), longer than the probes
of a load balancer wait. Each tier sits behind a `LoopbackProxy` the test blackholes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from devstack import CosmosEmulator, free_port
from state import HEALTH_PROBE_SECONDS, BackendUnavailable
from state.cold.cosmos_client import CosmosConnection
from state.factory import open_backends
from state.settings import Settings
from support_cases.settings import AppSettings
from tests.faults.apps import open_runtime
from tests.faults.proxy import LoopbackProxy

# What a report may take beyond one probe's bound (scheduling on a loaded machine): less
# than a second probe's bound, so probes made one after the other fail the test.
SLACK_SECONDS = 0.9


@pytest.fixture
def proxy_to(stack_env: dict[str, str]) -> Iterator[Callable[[str], tuple[LoopbackProxy, str]]]:
    """A proxy in front of the stack's server at `stack_env[name]`, and that URL through it."""
    started: list[LoopbackProxy] = []

    def start(name: str) -> tuple[LoopbackProxy, str]:
        target = urlparse(stack_env[name])
        assert target.hostname == "127.0.0.1" and target.port is not None
        proxy = LoopbackProxy(target.port).start()
        started.append(proxy)
        netloc = f"{target.netloc.rsplit(':', 1)[0]}:{proxy.port}"
        return proxy, target._replace(netloc=netloc).geturl()

    yield start
    for proxy in started:
        proxy.stop()


@pytest.mark.parametrize("tier", ["redis", "postgres"])
async def test_a_partitioned_tier_is_reported_down_within_the_probe_bound(
    tier: str,
    env_for: Callable[..., dict[str, str]],
    proxy_to: Callable[[str], tuple[LoopbackProxy, str]],
) -> None:
    proxy, url = proxy_to("REDIS_URL" if tier == "redis" else "POSTGRES_URL")
    values = {name.lower(): value for name, value in env_for("postgres").items()}
    values["redis_url" if tier == "redis" else "postgres_url"] = url
    backends = await open_backends(Settings.model_validate(values))
    try:
        store = backends.hot if tier == "redis" else backends.cold
        assert store is not None
        assert (await store.health()).up
        proxy.cut("blackhole")
        started = time.monotonic()
        health = await store.health()
        took = time.monotonic() - started
        assert (health.name, health.up) == (tier, False)
        assert health.detail == f"no answer within {HEALTH_PROBE_SECONDS} s"
        assert HEALTH_PROBE_SECONDS <= took < HEALTH_PROBE_SECONDS + SLACK_SECONDS
        proxy.restore()
        # Up again once the connections the partition broke are replaced (the proxy
        # resets those that lived through it; a pool finds out on first use).
        assert [(await store.health()).up for _ in range(3)][-1]
    finally:
        proxy.restore()
        await backends.close()


async def test_the_app_reports_a_partitioned_redis_within_one_probe_bound(
    env_for: Callable[..., dict[str, str]],
    proxy_to: Callable[[str], tuple[LoopbackProxy, str]],
) -> None:
    proxy, url = proxy_to("REDIS_URL")
    settings = AppSettings.model_validate(
        {
            **{name.lower(): value for name, value in env_for("postgres").items()},
            "redis_url": url,
            "state_write_mode": "write-behind",
        }
    )
    async with open_runtime(settings) as app:
        assert (await app.runtime.service.health()).status == "ok"
        proxy.cut("blackhole")
        started = time.monotonic()
        report = await app.runtime.service.health()
        took = time.monotonic() - started
        proxy.restore()
    # The tiers and the write-behind backlog are probed at once, each within the bound.
    assert took < HEALTH_PROBE_SECONDS + SLACK_SECONDS
    assert report.status == "degraded" and report.backlog is None
    assert [(tier.name, tier.up) for tier in report.tiers] == [("postgres", True), ("redis", False)]


async def test_a_stopped_cosmos_is_reported_as_refusing_connections_not_as_silent(
    env_for: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    """The SDK retries a refused connection past the probe's bound: a stopped emulator was
    reported as "no answer within 1.5 s", as if the network dropped packets, sending the
    operator after the wrong cause."""
    # An emulator of its own, so stopping it leaves the session's stack alone.
    cosmos = CosmosEmulator(port=free_port(), workdir=tmp_path / "cosmos")
    cosmos.start()
    try:
        values = {name.lower(): value for name, value in env_for("cosmos").items()}
        values["cosmos_endpoint"] = cosmos.endpoint
        backends = await open_backends(Settings.model_validate(values))
        try:
            assert (await backends.cold.health()).up
            cosmos.stop()
            started = time.monotonic()
            health = await backends.cold.health()
            took = time.monotonic() - started
            assert (health.name, health.up) == ("cosmos", False)
            assert health.detail is not None and "connection refused" in health.detail, health
            assert took < HEALTH_PROBE_SECONDS + SLACK_SECONDS
        finally:
            await backends.close()
    finally:
        cosmos.stop()


@pytest.mark.parametrize("listening", [(), ("127.0.0.2",)])
async def test_a_cosmos_host_of_several_addresses_is_refusing_only_when_each_refuses(
    env_for: Callable[..., dict[str, str]], monkeypatch: pytest.MonkeyPatch, listening: tuple[str]
) -> None:
    """A name of several addresses (`localhost`: ::1 and 127.0.0.1) that all refuse made
    asyncio's connect raise a plain "Multiple exceptions" OSError, read as telling nothing:
    the stopped server was reported silent again. Here the name resolves to 127.0.0.1 and
    127.0.0.2 on a port nothing else listens on; with one of them listening, it accepts."""
    port = free_port()
    name = "cosmos-several.test"
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != name:
            return real_getaddrinfo(host, *args, **kwargs)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))
            for address in ("127.0.0.1", "127.0.0.2")
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for variable in list(os.environ):
        if variable.lower().endswith("_proxy"):  # the check is made on direct connections
            monkeypatch.delenv(variable)
    values = {key.lower(): value for key, value in env_for("cosmos").items()}
    values["cosmos_endpoint"] = f"https://{name}:{port}/"
    connection = CosmosConnection(Settings.model_validate(values).cosmos)
    servers = [
        await asyncio.start_server(lambda _, writer: writer.close(), address, port)
        for address in listening
    ]
    try:
        if listening:
            await connection.accepting()
        else:
            with pytest.raises(BackendUnavailable, match=f"connection refused by {name}:{port}"):
                await connection.accepting()
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
        await connection.close()
