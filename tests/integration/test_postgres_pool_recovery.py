"""The cold tier's pools after Postgres dropped their connections, and the server-side
bounds the async pool's sessions carry.

A server restart or `pg_terminate_backend` leaves every idle pooled connection dead. The
next call must not be the one that finds out: a connection the server already closed is
replaced before anything is sent on it, so no caller sees `BackendUnavailable` (the API's
503) for a server that is up again.

A call cut off from the server mid-write (a partition: neither its cancel request nor
its close reaches the server) must not leave its session holding locks, or applying the
write, past the operation timeout: the server ends it by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from state.cold.postgres_client import PostgresConnection
from state.cold.postgres_store import PostgresStateStore
from state.errors import BackendUnavailable
from state.settings import Settings
from tests.faults.proxy import LoopbackProxy

POOL_SIZE = 3


def _pg(url: str, timeout: float = 5.0) -> PostgresConnection:
    settings = Settings.model_validate(
        {
            "state_cold_backend": "postgres",
            "postgres_url": url,
            "postgres_operation_timeout_seconds": timeout,
            "postgres_pool_min_size": POOL_SIZE,
            "postgres_pool_max_size": POOL_SIZE,
        }
    )
    return PostgresConnection(settings.postgres)


@pytest.fixture
async def pg(fresh_postgres_url: str) -> AsyncIterator[PostgresConnection]:
    pg = _pg(fresh_postgres_url)
    await pg.setup()
    try:
        yield pg
    finally:
        await pg.close()


async def _hold_all(pg: PostgresConnection) -> None:
    """Every connection of the async pool open at once, so all of them are pooled."""
    entered = asyncio.Event()
    release = asyncio.Event()
    count = 0

    async def hold() -> None:
        nonlocal count
        async with pg.connection("warm") as conn:
            await conn.execute("SELECT 1")
            count += 1
            if count == POOL_SIZE:
                entered.set()
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(POOL_SIZE)]
    await entered.wait()
    release.set()
    await asyncio.gather(*tasks)


def _terminate_backends(url: str) -> int:
    """Terminate every other session of the test's database, as a restart would."""
    with psycopg.connect(url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_async_calls_after_the_server_dropped_every_pooled_connection_succeed(
    pg: PostgresConnection, fresh_postgres_url: str
) -> None:
    store = PostgresStateStore(pg)
    await store.create("t-1", {"a": 1}, agent_id="test")
    await _hold_all(pg)
    assert _terminate_backends(fresh_postgres_url) >= POOL_SIZE
    await asyncio.sleep(0.2)  # the FATAL message and the close reach the client
    # Each call finds a dead connection first (the pool hands them out in turn).
    for _ in range(POOL_SIZE + 1):
        record = await store.get("t-1")
        assert record is not None and record.sections == {"a": 1}
    # A write too: nothing was sent on the dead connection, so it is not a repeat.
    await _hold_all(pg)
    _terminate_backends(fresh_postgres_url)
    await asyncio.sleep(0.2)
    updated = await store.update_section("t-1", "a", 2, expected_version=1, agent_id="test")
    assert updated.version == 2


def test_blocking_calls_after_the_server_dropped_the_pooled_connection_succeed(
    fresh_postgres_url: str,
) -> None:
    pg = _pg(fresh_postgres_url)
    try:
        with pg.blocking_connection("warm") as conn:
            conn.execute("SELECT 1")
        assert _terminate_backends(fresh_postgres_url) >= 1
        time.sleep(0.2)
        with pg.blocking_connection("read") as conn:
            row = conn.execute("SELECT 1 AS one").fetchone()
        assert row == {"one": 1}
    finally:
        asyncio.run(pg.close())


def _through(url: str, proxy: LoopbackProxy) -> str:
    return make_conninfo(url, port=str(proxy.port))


def _target_port(url: str) -> int:
    return int(conninfo_to_dict(url)["port"])


# The row-lock waits below give up after this long: far past the operation timeout (1 s).
LOCK_WAIT = "4s"


async def test_a_transaction_cut_off_mid_way_releases_its_row_locks(
    fresh_postgres_url: str,
) -> None:
    """The app's transaction updated a row, then the link went silent: its session, idle
    in the transaction, must not hold the row lock until TCP gives up (hours)."""
    setup = _pg(fresh_postgres_url)
    await setup.setup()
    await PostgresStateStore(setup).create("t-locked", {"a": 1}, agent_id="test")
    await setup.close()
    with LoopbackProxy(_target_port(fresh_postgres_url)) as proxy:
        pg = _pg(_through(fresh_postgres_url, proxy), timeout=1.0)
        try:
            with pytest.raises(BackendUnavailable):
                async with pg.transaction("stuck") as conn:
                    await conn.execute(
                        "UPDATE workflow_records SET version = version WHERE thread_id = %s",
                        ("t-locked",),
                    )
                    proxy.cut("blackhole")
                    await conn.execute("SELECT 1")
            other = await psycopg.AsyncConnection.connect(fresh_postgres_url, autocommit=True)
            try:
                await other.execute(f"SET lock_timeout = '{LOCK_WAIT}'")
                await other.execute(
                    "UPDATE workflow_records SET version = version + 1 WHERE thread_id = %s",
                    ("t-locked",),
                )
            finally:
                await other.close()
        finally:
            proxy.restore()  # the pool's reconnect attempts fail at once, not after 5 s
            await pg.close()


async def test_a_write_waiting_on_a_lock_when_cut_off_is_ended_by_the_server(
    fresh_postgres_url: str,
) -> None:
    """The app's write waits on a row another session holds, then the link goes silent:
    the client gives up after the operation timeout, and its cancel request cannot reach
    the server either. The server must end the statement itself, not keep the session
    waiting and apply the write whenever the lock frees."""
    setup = _pg(fresh_postgres_url)
    await setup.setup()
    await PostgresStateStore(setup).create("t-waits", {"a": 1}, agent_id="test")
    await setup.close()
    blocker = await psycopg.AsyncConnection.connect(fresh_postgres_url, autocommit=True)
    with LoopbackProxy(_target_port(fresh_postgres_url)) as proxy:
        pg = _pg(_through(fresh_postgres_url, proxy), timeout=1.0)
        store = PostgresStateStore(pg)
        try:
            await store.get("t-waits")  # the pool's connection, open before the cut
            await blocker.execute("BEGIN")
            await blocker.execute(
                "SELECT 1 FROM workflow_records WHERE thread_id = %s FOR UPDATE", ("t-waits",)
            )
            write = asyncio.create_task(
                store.update_section("t-waits", "a", 2, expected_version=1, agent_id="test")
            )
            await asyncio.sleep(0.3)  # the UPDATE reached the server and waits on the lock
            proxy.cut("blackhole")
            with pytest.raises(BackendUnavailable):
                await write
            await asyncio.sleep(1.0)
            await blocker.execute("COMMIT")
            await asyncio.sleep(0.5)
            cursor = await blocker.execute(
                "SELECT version FROM workflow_records WHERE thread_id = %s", ("t-waits",)
            )
            assert await cursor.fetchone() == (1,), "the abandoned write was applied later"
        finally:
            await blocker.close()
            proxy.restore()
            await pg.close()


async def test_calls_cancelled_while_dead_connections_are_replaced_leave_every_slot_usable(
    pg: PostgresConnection, fresh_postgres_url: str
) -> None:
    """A call cancelled at any await while it passes over the dead connections (a client
    gone, a run's timeout) returns its pool slot: the pool can still lend all of them."""
    store = PostgresStateStore(pg)
    await store.create("t-1", {"a": 1}, agent_id="test")
    # Loop turns first (the awaits that do not wait on the server), then delays.
    cancel_points = [(turns, 0.0) for turns in range(8)]
    cancel_points += [(0, 0.0005 * 1.5**power) for power in range(20)]
    finished = False
    for turns, delay in cancel_points:
        await _hold_all(pg)
        _terminate_backends(fresh_postgres_url)
        await asyncio.sleep(0.2)
        call = asyncio.create_task(store.get("t-1"))
        for _ in range(turns):
            await asyncio.sleep(0)
        await asyncio.sleep(delay)
        finished = call.done()
        call.cancel()
        await asyncio.wait([call])
        await asyncio.wait_for(_hold_all(pg), 5)  # a slot lost would time the pool out
        if finished:
            break
    assert finished
    pool = await pg.pool()
    assert pool.get_stats()["pool_size"] <= POOL_SIZE
