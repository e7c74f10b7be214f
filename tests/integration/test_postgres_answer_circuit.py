"""A live Postgres that is merely slow (a lock held by another process, a long call of
several statements) fails the call that ran out of time, and opens no `AnswerCircuit`:
the next call is sent, not refused. A silent one opens it, however the call was sent."""

from __future__ import annotations

import asyncio
import select
import time
from urllib.parse import urlsplit

import psycopg
import pytest

from state.cold import circuit
from state.cold.postgres_client import PostgresConnection
from state.errors import BackendUnavailable, NoAnswer
from state.settings import Settings
from tests.faults.proxy import LoopbackProxy


def _open_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """The circuit's open window starts as the silent call fails; on a loaded machine the
    teardown of its broken connection outlasted the 1 s window once, and the next call was
    let through as a probe instead of refused (what these tests check)."""
    monkeypatch.setattr(circuit, "OPEN_SECONDS", 30.0)


def _pg(stack_env: dict[str, str], timeout: float, *, pool_size: int = 1) -> PostgresConnection:
    settings = Settings.model_validate(
        {
            "state_cold_backend": "postgres",
            "postgres_url": stack_env["POSTGRES_URL"],
            "postgres_operation_timeout_seconds": timeout,
            "postgres_pool_min_size": pool_size,
        }
    )
    return PostgresConnection(settings.postgres)


async def test_a_statement_waiting_on_a_lock_past_its_time_opens_no_circuit(
    stack_env: dict[str, str],
) -> None:
    """Another session holds an advisory lock past the operation timeout: the call waiting
    for it fails, but the server answered its cancel request, so it is alive."""
    pg = _pg(stack_env, 1.0)
    other = await psycopg.AsyncConnection.connect(stack_env["POSTGRES_URL"], autocommit=True)
    try:
        async with pg.connection("warm") as conn:
            await conn.execute("SELECT 1")
        await other.execute("SELECT pg_advisory_lock(4242)")
        with pytest.raises(BackendUnavailable):
            async with pg.connection("waits") as conn:
                await conn.execute("SELECT pg_advisory_lock(4242)")
        # The server is alive and idle: this must be sent, not refused.
        async with pg.connection("next") as conn:
            await conn.execute("SELECT 1")
    finally:
        await other.close()
        await pg.close()


def test_a_sync_call_past_its_time_whose_statements_answered_opens_no_circuit(
    stack_env: dict[str, str],
) -> None:
    """Each statement answers within the statement timeout, the call as a whole runs past
    its deadline (the operation timeout plus a second) and is cut, yet the server
    answered all along."""
    pg = _pg(stack_env, 1.0)
    try:
        with pytest.raises(BackendUnavailable), pg.blocking_connection("slow") as conn:
            for _ in range(3):
                conn.execute("SELECT pg_sleep(0.8)")
        with pg.blocking_connection("next") as conn:
            conn.execute("SELECT 1")
    finally:
        asyncio.run(pg.close())


@pytest.mark.parametrize("pipelined", [False, True], ids=["one statement", "pipelined"])
async def test_a_silent_server_opens_the_circuit_for_an_async_call(
    stack_env: dict[str, str], pipelined: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a blackholed link the kernel still takes what a client sends, as for a
    paused server: a pipeline (how several statements are written) flushing its queue
    heard nothing, so the call that got no answer opens the circuit like any other."""
    _open_long(monkeypatch)
    with LoopbackProxy(_port(stack_env)) as proxy:
        pg = _pg({"POSTGRES_URL": _through(stack_env, proxy)}, 1.0)
        try:
            async with pg.connection("warm") as conn:
                await conn.execute("SELECT 1")
            proxy.cut("blackhole")
            with pytest.raises(NoAnswer):
                async with pg.connection("write") as conn:
                    if pipelined:
                        async with conn.pipeline(), conn.transaction():
                            await conn.execute("SELECT 1")
                            await conn.execute("SELECT 2")
                    else:
                        await conn.execute("SELECT 1")
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="answered nothing lately"):
                async with pg.connection("next") as conn:
                    await conn.execute("SELECT 1")
            assert time.monotonic() - started < 0.2
        finally:
            if pipelined:
                _heal_before_close(proxy)
            # The one-statement case closes in the blackhole: it must still finish, its
            # pool's reconnecting worker given up after the pool's close timeout.
            await asyncio.wait_for(pg.close(), 10)


@pytest.mark.parametrize("pipelined", [False, True], ids=["one statement", "pipelined"])
def test_a_silent_server_opens_the_circuit_for_a_sync_call(
    stack_env: dict[str, str], pipelined: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _open_long(monkeypatch)
    with LoopbackProxy(_port(stack_env)) as proxy:
        pg = _pg({"POSTGRES_URL": _through(stack_env, proxy)}, 1.0)
        try:
            with pg.blocking_connection("warm") as conn:
                conn.execute("SELECT 1")
            proxy.cut("blackhole")
            with pytest.raises(NoAnswer), pg.blocking_connection("write") as conn:
                if pipelined:
                    with conn.pipeline(), conn.transaction():
                        conn.execute("SELECT 1")
                        conn.execute("SELECT 2")
                else:
                    conn.execute("SELECT 1")
            with (
                pytest.raises(BackendUnavailable, match="answered nothing lately"),
                pg.blocking_connection("next") as conn,
            ):
                conn.execute("SELECT 1")
        finally:
            _heal_before_close(proxy)
            asyncio.run(asyncio.wait_for(pg.close(), 10))


async def test_an_answer_sent_before_a_silent_call_but_read_during_it_opens_the_circuit(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another pooled connection's statement (the pool's own set-up of a connection, in the
    full suite) was answered just before the link went silent, and the busy event loop
    reads that answer only while the next call waits: news from before that call, so it
    still opens the circuit (once, each later call waited out the timeout in turn)."""
    _open_long(monkeypatch)
    with LoopbackProxy(_port(stack_env)) as proxy:
        pg = _pg({"POSTGRES_URL": _through(stack_env, proxy)}, 1.0, pool_size=2)
        try:
            pool = await pg.pool()
            await pool.wait()
            other = await pool.getconn()
            answered_late = asyncio.create_task(other.execute("SELECT 1"))
            await asyncio.sleep(0)  # sent; its answer is read once the loop runs again
            # Blocking the loop (as a busy one would) until the answer has arrived.
            assert select.select([other.pgconn.socket], [], [], 10)[0]
            proxy.cut("blackhole")
            with pytest.raises(NoAnswer):
                async with pg.connection("read") as conn:
                    await conn.execute("SELECT 1")
            assert answered_late.done()
            with pytest.raises(BackendUnavailable, match="answered nothing lately"):
                async with pg.connection("next") as conn:
                    await conn.execute("SELECT 1")
            await answered_late
            await pool.putconn(other)
        finally:
            _heal_before_close(proxy)
            await asyncio.wait_for(pg.close(), 10)


def _heal_before_close(proxy: LoopbackProxy) -> None:
    """Closing a pool in a blackhole waits out the pool's close timeout (5 s: its worker
    reconnecting hears nothing). That it still finishes is checked once (the async
    one-statement case); elsewhere the link is restored first, and the close is quick."""
    proxy.restore()


def _port(stack_env: dict[str, str]) -> int:
    port = urlsplit(stack_env["POSTGRES_URL"]).port
    assert port is not None
    return port


def _through(stack_env: dict[str, str], proxy: LoopbackProxy) -> str:
    return stack_env["POSTGRES_URL"].replace(f":{_port(stack_env)}/", f":{proxy.port}/")
