"""A call that waited long for a pooled connection (the pool busy, or its connect slow)
still gives the server its whole answer timeout once it has the connection: the wait was
no silence of the server's, and condemning the fresh connection for it would drop a
healthy one and report `NoAnswer`."""

from __future__ import annotations

import asyncio
import threading
import time

from state.cold.postgres_client import (
    CANCEL_SECONDS,
    NO_ANSWER_GRACE_SECONDS,
    PostgresConnection,
)
from state.settings import Settings

OPERATION_SECONDS = 1.0


def _pg(url: str) -> PostgresConnection:
    settings = Settings.model_validate(
        {
            "state_cold_backend": "postgres",
            "postgres_url": url,
            "postgres_operation_timeout_seconds": OPERATION_SECONDS,
            "postgres_pool_timeout_seconds": 10.0,
            "postgres_pool_min_size": 1,
            "postgres_pool_max_size": 1,
        }
    )
    return PostgresConnection(settings.postgres)


async def test_a_call_that_waited_for_the_pool_keeps_its_answer_time(
    stack_env: dict[str, str],
) -> None:
    pg = _pg(stack_env["POSTGRES_URL"])
    held = asyncio.Event()
    try:

        async def hold() -> int:
            async with pg.connection("holder") as conn:
                cursor = await conn.execute("SELECT pg_backend_pid() AS pid")
                row = await cursor.fetchone()
                held.set()
                # Most of the other call's operation timeout, without a word to the server.
                await asyncio.sleep(0.8 * OPERATION_SECONDS)
            assert row is not None
            return int(row["pid"])

        holder = asyncio.create_task(hold())
        await held.wait()
        async with pg.connection("waiter") as conn:
            # Ends past the operation timeout counted from the call's start, well within
            # it counted from when the connection was lent.
            cursor = await conn.execute(
                "SELECT pg_backend_pid() AS pid, pg_sleep(%s)", [0.5 * OPERATION_SECONDS]
            )
            row = await cursor.fetchone()
        assert row is not None
        assert row["pid"] == await holder  # the same connection, kept
    finally:
        await pg.close()


async def test_a_blocking_call_that_waited_for_the_pool_keeps_its_answer_time(
    stack_env: dict[str, str],
) -> None:
    pg = _pg(stack_env["POSTGRES_URL"])
    # The blocking bound is the operation timeout and its grace: hold the connection for
    # most of it.
    hold_seconds = 0.8 * (OPERATION_SECONDS + NO_ANSWER_GRACE_SECONDS)
    held = threading.Event()
    pids: list[int] = []

    def hold() -> None:
        with pg.blocking_connection("holder") as conn:
            row = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()
            assert row is not None
            pids.append(int(row["pid"]))
            held.set()
            time.sleep(hold_seconds)

    def wait_then_sleep() -> int:
        held.wait()
        with pg.blocking_connection("waiter") as conn:
            row = conn.execute(
                "SELECT pg_backend_pid() AS pid, pg_sleep(%s)", [0.5 * OPERATION_SECONDS]
            ).fetchone()
        assert row is not None
        return int(row["pid"])

    try:
        holder = asyncio.create_task(asyncio.to_thread(hold))
        pid = await asyncio.to_thread(wait_then_sleep)
        await holder
        assert [pid] == pids  # the same connection, kept
    finally:
        await pg.close()


async def test_a_pool_wait_past_the_calls_own_bound_is_no_silence_of_the_servers(
    stack_env: dict[str, str],
) -> None:
    """A wait for a busy pool longer than the call's bound (the operation timeout, its
    cancel and its grace), still within the pool's timeout: nothing was sent, so it is not
    `NoAnswer` (an outcome unknown, which opens the circuit); the call gets the connection
    and its whole answer time."""
    pg = _pg(stack_env["POSTGRES_URL"])
    held = asyncio.Event()
    bound = OPERATION_SECONDS + CANCEL_SECONDS + NO_ANSWER_GRACE_SECONDS
    try:

        async def hold() -> None:
            # A call of its own longer bound (as the migration's) keeps the connection past
            # the waiter's, within the pool's timeout (10 s).
            async with pg.connection("holder", seconds=bound + 3.0) as conn:
                await conn.execute("SELECT 1")
                held.set()
                await asyncio.sleep(bound + 1.0)

        holder = asyncio.create_task(hold())
        await held.wait()
        async with pg.connection("waiter") as conn:
            cursor = await conn.execute("SELECT 1 AS one")
            assert await cursor.fetchone() == {"one": 1}
        await holder
    finally:
        await pg.close()
