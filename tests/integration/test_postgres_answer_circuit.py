"""A live Postgres that is merely slow (a lock held by another process, a long call of
several statements) fails the call that ran out of time, and opens no `AnswerCircuit`:
the next call is sent, not refused."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from state.cold.postgres_client import PostgresConnection
from state.errors import BackendUnavailable
from state.settings import Settings


def _pg(stack_env: dict[str, str], timeout: float) -> PostgresConnection:
    settings = Settings.model_validate(
        {
            "state_cold_backend": "postgres",
            "postgres_url": stack_env["POSTGRES_URL"],
            "postgres_operation_timeout_seconds": timeout,
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
