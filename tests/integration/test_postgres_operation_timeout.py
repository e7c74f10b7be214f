"""The Postgres operation timeout becomes server settings in milliseconds
(`statement_timeout`, `idle_in_transaction_session_timeout`) and libpq's
`tcp_user_timeout`, which the server and libpq read as 32-bit integers: one past that
is refused at start, where every connection was refused by the server ("Value exceeds
integer range") and the pool retried it as an outage for good."""

from __future__ import annotations

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
