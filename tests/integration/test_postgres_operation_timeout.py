"""The Postgres operation timeout becomes server settings in milliseconds
(`statement_timeout`, `idle_in_transaction_session_timeout`) and libpq's
`tcp_user_timeout`, which the server and libpq read as 32-bit integers: one past that
is refused at start, where every connection was refused by the server ("Value exceeds
integer range") and the pool retried it as an outage for good."""

from __future__ import annotations

import asyncio

import pytest

from state.cold.postgres_client import PostgresConnection
from state.errors import SettingsError
from state.settings import Settings


def _settings(url: str, seconds: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("STATE_COLD_BACKEND", "postgres")
    monkeypatch.setenv("POSTGRES_URL", url)
    monkeypatch.setenv("POSTGRES_OPERATION_TIMEOUT_SECONDS", seconds)
    monkeypatch.setenv("POSTGRES_POOL_TIMEOUT_SECONDS", "3")
    return Settings()


async def test_the_longest_operation_timeout_taken_connects(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = PostgresConnection(_settings(fresh_postgres_url, "2073600", monkeypatch).postgres)
    try:
        async with pg.connection("probe") as conn:
            await conn.execute("SELECT 1")
        with pg.blocking_connection("probe") as blocking:
            blocking.execute("SELECT 1")
    finally:
        await pg.close()


async def test_an_operation_timeout_the_server_would_refuse_is_refused_at_start(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SettingsError) as refused:
        _settings(fresh_postgres_url, "3000000", monkeypatch)
    assert str(refused.value).startswith("POSTGRES_OPERATION_TIMEOUT_SECONDS: "), refused.value


def _pool_settings(url: str, seconds: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("STATE_COLD_BACKEND", "postgres")
    monkeypatch.setenv("POSTGRES_URL", url)
    monkeypatch.setenv("POSTGRES_POOL_TIMEOUT_SECONDS", seconds)
    return Settings()


async def test_the_longest_pool_timeout_taken_lends_connections_to_both_pools(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = PostgresConnection(_pool_settings(fresh_postgres_url, "2073600", monkeypatch).postgres)
    try:
        async with pg.connection("probe") as conn:
            await conn.execute("SELECT 1")

        def blocking() -> None:
            with pg.blocking_connection("probe") as connection:
                connection.execute("SELECT 1")

        await asyncio.to_thread(blocking)
    finally:
        await pg.close()


@pytest.mark.parametrize("seconds", ["2073601", "1e10", "1e300"])
async def test_a_pool_timeout_too_long_to_wait_is_refused_at_start(
    fresh_postgres_url: str, seconds: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Taken, the blocking pool's wait raised OverflowError ("timestamp out of range for
    # platform time_t") from every sync call past threading.TIMEOUT_MAX.
    with pytest.raises(SettingsError) as refused:
        _pool_settings(fresh_postgres_url, seconds, monkeypatch)
    assert str(refused.value).startswith("POSTGRES_POOL_TIMEOUT_SECONDS: "), refused.value
