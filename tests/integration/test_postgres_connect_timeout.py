"""Connection attempts of the async pool against a blackholed server (packets swallowed,
never a reset): each attempt ends within the connect bound the blocking pool uses too,
instead of psycopg's default 130 s, so the pool tries again (or the next host of the
URL) and a caller learns of the outage within its bounds. A bound the URL sets wins."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from state.cold.postgres_client import OPEN_RETRY_SECONDS, PostgresConnection
from state.errors import BackendClosed, BackendUnavailable
from state.settings import Settings
from tests.faults.proxy import LOOPBACK, LoopbackProxy

# psycopg waits at least 2 s for a connection, whatever connect_timeout asks.
CONNECT_BOUND_SECONDS = 2.0


def _pg(url: str, *, operation_timeout: float, pool_timeout: float) -> PostgresConnection:
    settings = Settings.model_validate(
        {
            "state_cold_backend": "postgres",
            "postgres_url": url,
            "postgres_operation_timeout_seconds": operation_timeout,
            "postgres_pool_timeout_seconds": pool_timeout,
            "postgres_pool_min_size": 1,
            "postgres_pool_max_size": 1,
        }
    )
    return PostgresConnection(settings.postgres)


async def _blackholed_pool(
    pg: PostgresConnection, proxy: LoopbackProxy
) -> AsyncConnectionPool[Any]:
    """`pg`'s pool, opened while the server answers, then making its next connection
    attempts at a blackholed one."""
    proxy.restore()
    await asyncio.sleep(OPEN_RETRY_SECONDS)  # a failed first connection is not tried sooner
    pool = await pg.pool()
    proxy.cut("blackhole")
    await pool.drain()  # its connections are replaced: new attempts
    return pool


async def test_an_attempt_against_a_blackholed_server_ends_within_the_bound(
    fresh_postgres_url: str,
) -> None:
    with LoopbackProxy(int(str(conninfo_to_dict(fresh_postgres_url)["port"]))) as proxy:
        proxy.cut("blackhole")
        url = make_conninfo(fresh_postgres_url, host=LOOPBACK, port=proxy.port)
        pg = _pg(url, operation_timeout=1.0, pool_timeout=CONNECT_BOUND_SECONDS)
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                async with pg.connection("probe") as conn:
                    await conn.execute("SELECT 1")
            assert time.monotonic() - started < 3 * CONNECT_BOUND_SECONDS
            # The pool's own attempts give up too (and try again), not only the caller's
            # first connection (the pool opens only once one was made).
            pool = await _blackholed_pool(pg, proxy)
            deadline = time.monotonic() + 3 * CONNECT_BOUND_SECONDS
            while not pool.get_stats().get("connections_errors"):
                assert time.monotonic() < deadline, "the connection attempt never ended"
                await asyncio.sleep(0.1)
        finally:
            await pg.close()


async def test_a_blackholed_first_host_gives_way_to_the_next(fresh_postgres_url: str) -> None:
    """A URL naming two servers (a primary and its standby, say), the first of which
    vanished without a reset: the pool reaches the second once its attempt at the first
    ends."""
    params = conninfo_to_dict(fresh_postgres_url)
    with LoopbackProxy(int(str(params["port"]))) as proxy:
        proxy.cut("blackhole")
        url = make_conninfo(
            fresh_postgres_url,
            host=f"{LOOPBACK},{LOOPBACK}",
            port=f"{proxy.port},{params['port']}",
        )
        pg = _pg(url, operation_timeout=CONNECT_BOUND_SECONDS, pool_timeout=5.0)
        try:
            # Waited for outside any call: the pool's own attempts (a call waiting for them
            # is the next test's).
            pool = await pg.pool()
            deadline = time.monotonic() + 3 * CONNECT_BOUND_SECONDS
            while not pool.get_stats().get("pool_available"):
                assert time.monotonic() < deadline, "the second host was never reached"
                await asyncio.sleep(0.1)
            async with pg.connection("probe") as conn:
                cursor = await conn.execute("SELECT 1 AS one")
                assert await cursor.fetchone() == {"one": 1}
            assert proxy.stats.accepted >= 1  # the first host was tried, and left
        finally:
            await pg.close()


async def test_a_call_that_waited_out_a_blackholed_first_host_succeeds(
    fresh_postgres_url: str,
) -> None:
    """The first call waits for the pool's attempt at the first host to end, about the
    whole operation timeout: it still gets its time with the second host's connection,
    instead of failing with NoAnswer and dropping that connection."""
    params = conninfo_to_dict(fresh_postgres_url)
    with LoopbackProxy(int(str(params["port"]))) as proxy:
        proxy.cut("blackhole")
        url = make_conninfo(
            fresh_postgres_url,
            host=f"{LOOPBACK},{LOOPBACK}",
            port=f"{proxy.port},{params['port']}",
        )
        pg = _pg(url, operation_timeout=CONNECT_BOUND_SECONDS, pool_timeout=5.0)
        try:
            async with pg.connection("first") as conn:
                cursor = await conn.execute("SELECT pg_backend_pid() AS pid")
                first = await cursor.fetchone()
            assert proxy.stats.accepted >= 1  # the first host was tried, and left
            async with pg.connection("second") as conn:
                cursor = await conn.execute("SELECT pg_backend_pid() AS pid")
                assert await cursor.fetchone() == first  # the connection was kept
        finally:
            await pg.close()


async def test_the_urls_connect_timeout_wins_over_the_pools(fresh_postgres_url: str) -> None:
    """An operator's `connect_timeout` in POSTGRES_URL reaches both pools' connections;
    the pools' own bound (from the operation timeout) applies only to a URL without one."""
    url = make_conninfo(fresh_postgres_url, connect_timeout="7")
    pg = _pg(url, operation_timeout=1.0, pool_timeout=5.0)
    try:
        async with pg.connection("probe") as conn:
            assert conninfo_to_dict(conn.info.dsn)["connect_timeout"] == "7"
        with pg.blocking_connection("probe") as blocking:
            assert conninfo_to_dict(blocking.info.dsn)["connect_timeout"] == "7"
    finally:
        await pg.close()
    pg = _pg(fresh_postgres_url, operation_timeout=3.0, pool_timeout=5.0)
    try:
        async with pg.connection("probe") as conn:
            assert conninfo_to_dict(conn.info.dsn)["connect_timeout"] == "3"
    finally:
        await pg.close()


@pytest.mark.parametrize("unbounded", ["0", "-1"])
async def test_a_url_connect_timeout_asking_for_no_bound_gets_the_pools(
    fresh_postgres_url: str, unbounded: str
) -> None:
    """0 or less is libpq's "wait indefinitely" (psycopg's 130 s): taken as the URL's
    choice, a blackholed host would again hold the pool's only attempt that long."""
    url = make_conninfo(fresh_postgres_url, connect_timeout=unbounded)
    pg = _pg(url, operation_timeout=3.0, pool_timeout=5.0)
    try:
        async with pg.connection("probe") as conn:
            assert conninfo_to_dict(conn.info.dsn)["connect_timeout"] == "3"
        with pg.blocking_connection("probe") as blocking:
            assert conninfo_to_dict(blocking.info.dsn)["connect_timeout"] == "3"
    finally:
        await pg.close()


async def test_an_attempt_ends_within_the_pools_wait(fresh_postgres_url: str) -> None:
    """The connect bound is the pool's wait when that is shorter than the operation
    timeout: an attempt no caller still waits for would only delay the pool's next one
    (or the URL's next host)."""
    with LoopbackProxy(int(str(conninfo_to_dict(fresh_postgres_url)["port"]))) as proxy:
        url = make_conninfo(fresh_postgres_url, host=LOOPBACK, port=proxy.port)
        pg = _pg(url, operation_timeout=6.0, pool_timeout=CONNECT_BOUND_SECONDS)
        try:
            pool = await _blackholed_pool(pg, proxy)
            started = time.monotonic()
            while not pool.get_stats().get("connections_errors"):
                assert time.monotonic() - started < 2 * CONNECT_BOUND_SECONDS, (
                    "the attempt outlasted the pool's wait"
                )
                await asyncio.sleep(0.1)
        finally:
            await pg.close()


async def test_pgconnect_timeout_in_the_environment_wins_over_the_pools(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq's PGCONNECT_TIMEOUT, set by an operator for a URL without `connect_timeout`,
    is honoured like the URL's own."""
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "7")
    pg = _pg(fresh_postgres_url, operation_timeout=3.0, pool_timeout=5.0)
    try:
        async with pg.connection("probe") as conn:
            assert conninfo_to_dict(conn.info.dsn)["connect_timeout"] == "7"
        with pg.blocking_connection("probe") as blocking:
            assert conninfo_to_dict(blocking.info.dsn)["connect_timeout"] == "7"
    finally:
        await pg.close()


@pytest.mark.parametrize("value", ["soon", "inf"])
async def test_a_pgconnect_timeout_that_is_no_number_gets_the_pools_bound(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A PGCONNECT_TIMEOUT psycopg could not use is overridden by the pool's bound (the
    keyword argument wins over the environment), not a failure of every connection. The
    settings refuse it at start; this is one set after them (or a PostgresConfig made
    without them)."""
    pg = _pg(fresh_postgres_url, operation_timeout=3.0, pool_timeout=5.0)
    monkeypatch.setenv("PGCONNECT_TIMEOUT", value)
    try:
        async with pg.connection("probe") as conn:
            assert conninfo_to_dict(conn.info.dsn)["connect_timeout"] == "3"
        with pg.blocking_connection("probe") as blocking:
            assert conninfo_to_dict(blocking.info.dsn)["connect_timeout"] == "3"
    finally:
        await pg.close()


async def test_close_does_not_wait_for_a_first_connection_to_a_blackholed_server(
    fresh_postgres_url: str,
) -> None:
    """The app shutting down (or a failed start closing what it opened) while the first
    call's connection before the pool opens waits on a blackholed server: the close ends
    at once, the waiting call with `BackendClosed`, and no pool is opened after it."""
    with LoopbackProxy(int(str(conninfo_to_dict(fresh_postgres_url)["port"]))) as proxy:
        proxy.cut("blackhole")
        url = make_conninfo(fresh_postgres_url, host=LOOPBACK, port=proxy.port)
        pg = _pg(url, operation_timeout=5.0, pool_timeout=5.0)
        call = asyncio.create_task(pg.pool())
        await asyncio.sleep(0.5)  # connecting
        started = time.monotonic()
        await pg.close()
        assert time.monotonic() - started < 1.0
        with pytest.raises(BackendClosed):
            await call


async def test_close_during_a_blocking_first_connection_ends_its_call_as_closed(
    fresh_postgres_url: str,
) -> None:
    """As above for the saver's sync API: its call's first connection (on the caller's
    thread, which `close` cannot interrupt) waits on a blackholed server as the owner
    closes. Its attempt then times out: the call fails as closed (`SaverClosed` at the
    saver), as the async one does, not as the server's outage, and opens no pool."""
    with LoopbackProxy(int(str(conninfo_to_dict(fresh_postgres_url)["port"]))) as proxy:
        proxy.cut("blackhole")
        url = make_conninfo(fresh_postgres_url, host=LOOPBACK, port=proxy.port)
        pg = _pg(url, operation_timeout=1.0, pool_timeout=CONNECT_BOUND_SECONDS)

        def blocking_call() -> None:
            with pg.blocking_connection("probe") as conn:
                conn.execute("SELECT 1")

        call = asyncio.ensure_future(asyncio.to_thread(blocking_call))
        await asyncio.sleep(0.5)  # connecting
        started = time.monotonic()
        await pg.close()
        assert time.monotonic() - started < 1.0
        with pytest.raises(BackendClosed):
            await call
        assert pg._blocking_pool is None
