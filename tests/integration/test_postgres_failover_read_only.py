"""The cold tier after a failover left its pool connected to a read-only server.

A failover that demotes the old primary (or a DNS name still pointing at it for a
while) leaves the pool's sessions on a server in recovery: every write is refused with
`cannot execute INSERT in a read-only transaction` (SQLSTATE 25006). That is an outage,
not a refusal for good: callers must see `BackendUnavailable` (the API's 503, retried),
and once the writable primary is reachable again the pool must write without a process
restart (after at most one more refusal), not keep handing out sessions opened on the
read-only server.

A database whose `default_transaction_read_only` is on stands in for the server in
recovery: its sessions refuse writes with the same error, and keep doing so after the
setting is reset, as sessions on a demoted server would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import psycopg
import pytest

from state.cold.postgres_client import PostgresConnection
from state.cold.postgres_store import PostgresStateStore
from state.errors import BackendUnavailable
from state.settings import Settings

POOL_SIZE = 2
SETTLE_SECONDS = 0.5


@pytest.fixture
async def pg(fresh_postgres_url: str) -> AsyncIterator[PostgresConnection]:
    settings = Settings.model_validate(
        {
            "state_cold_backend": "postgres",
            "postgres_url": fresh_postgres_url,
            "postgres_operation_timeout_seconds": 5,
            "postgres_pool_min_size": POOL_SIZE,
            "postgres_pool_max_size": POOL_SIZE,
        }
    )
    pg = PostgresConnection(settings.postgres)
    await pg.setup()
    try:
        yield pg
    finally:
        await pg.close()


def _set_read_only(url: str, read_only: bool) -> None:
    """New sessions of the test's database read-only (or not); with `read_only`, the
    sessions open now are cut, as a failover cuts them."""
    # The admin session itself must write whatever the database's default says.
    with psycopg.connect(
        url, autocommit=True, options="-c default_transaction_read_only=off"
    ) as admin:
        setting = "on" if read_only else "off"
        admin.execute(
            f"ALTER DATABASE {admin.info.dbname} SET default_transaction_read_only = {setting}"
        )
        if read_only:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )


async def test_writes_to_a_read_only_server_are_unavailable_and_heal_once_it_is_writable(
    pg: PostgresConnection, fresh_postgres_url: str
) -> None:
    store = PostgresStateStore(pg)
    await store.create("t-1", {"a": 1}, agent_id="test")

    _set_read_only(fresh_postgres_url, True)
    await asyncio.sleep(0.2)  # the FATAL messages and the closes reach the client
    for attempt in range(POOL_SIZE):
        with pytest.raises(BackendUnavailable):
            await store.update_section(
                "t-1", "a", 10 + attempt, expected_version=1, agent_id="test"
            )
    # Reads still work on the read-only server.
    record = await store.get("t-1")
    assert record is not None and record.version == 1

    _set_read_only(fresh_postgres_url, False)
    # Sessions the pool was opening as the server turned writable have opened (a drain
    # passes over one still connecting).
    await asyncio.sleep(SETTLE_SECONDS)
    # The pooled sessions were opened on the read-only server: the first write may meet
    # one (an outage seen once), after which the pool holds only new sessions.
    version = 1
    try:
        await store.update_section("t-1", "a", 2, expected_version=version, agent_id="test")
        version += 1
    except BackendUnavailable:
        pass
    for _ in range(POOL_SIZE + 1):
        updated = await store.update_section(
            "t-1", "a", version + 1, expected_version=version, agent_id="test"
        )
        version += 1
        assert updated.version == version


def test_blocking_writes_to_a_read_only_server_are_unavailable_and_heal(
    fresh_postgres_url: str,
) -> None:
    """The same through the blocking pool (the saver's sync API)."""
    settings = Settings.model_validate(
        {
            "state_cold_backend": "postgres",
            "postgres_url": fresh_postgres_url,
            "postgres_operation_timeout_seconds": 5,
        }
    )
    pg = PostgresConnection(settings.postgres)
    write = "CREATE TABLE IF NOT EXISTS written (n integer)"
    try:
        with pg.blocking_connection("warm") as conn:
            conn.execute(write)
        _set_read_only(fresh_postgres_url, True)
        time.sleep(0.2)
        with pytest.raises(BackendUnavailable), pg.blocking_connection("write") as conn:
            conn.execute("INSERT INTO written VALUES (1)")
        _set_read_only(fresh_postgres_url, False)
        time.sleep(SETTLE_SECONDS)
        try:
            with pg.blocking_connection("write") as conn:
                conn.execute("INSERT INTO written VALUES (2)")
        except BackendUnavailable:
            pass  # a session opened while the server was read-only, seen once
        for n in range(3):
            with pg.blocking_connection("write") as conn:
                conn.execute("INSERT INTO written VALUES (%s)", (n,))
    finally:
        asyncio.run(pg.close())


def _sessions(url: str) -> set[int]:
    """The server processes of the test database's other sessions (the pool's)."""
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return {pid for (pid,) in rows}


async def test_a_refusal_on_a_session_an_earlier_drain_condemned_closes_none_opened_since(
    pg: PostgresConnection, fresh_postgres_url: str
) -> None:
    """Requests refused read-only at once each drained the pool: one whose session dated from
    before the last drain (closed as it returns anyway) closed those opened since, on the
    writable server by then, and a storm of refusals reopened the pool once per request."""
    store = PostgresStateStore(pg)
    await store.create("t-1", {"a": 1}, agent_id="test")
    _set_read_only(fresh_postgres_url, True)
    await asyncio.sleep(0.2)
    await store.get("t-1")  # passes over the cut sessions: the pool reopens on the read-only one
    await asyncio.sleep(SETTLE_SECONDS)
    with pytest.raises(BackendUnavailable):
        async with pg.connection("stale") as stale:
            _set_read_only(fresh_postgres_url, False)
            with pytest.raises(BackendUnavailable):  # the other read-only session: drains
                await store.update_section("t-1", "a", 2, expected_version=1, agent_id="test")
            await asyncio.sleep(SETTLE_SECONDS)
            opened_since = _sessions(fresh_postgres_url) - {stale.info.backend_pid}
            assert opened_since
            await stale.execute("CREATE TABLE written (n integer)")
    await asyncio.sleep(SETTLE_SECONDS)
    assert opened_since <= _sessions(fresh_postgres_url)
    updated = await store.update_section("t-1", "a", 2, expected_version=1, agent_id="test")
    assert updated.version == 2
