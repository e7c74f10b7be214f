"""Postgres schema migrations against a real server: ordered, recorded, idempotent, race-free."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import AsyncConnection

from state.cold import migrations
from state.cold.migrations import (
    MIGRATION_LOCK_KEY,
    MIGRATIONS,
    Migration,
    migrate,
    recorded_migrations,
)
from state.cold.postgres_client import PostgresConnection
from state.settings import Settings

CODE_MIGRATIONS = [(migration.id, migration.name) for migration in MIGRATIONS]

MIGRATE_IN_A_PROCESS = """
import asyncio, json, sys
from psycopg import AsyncConnection
from state.cold.migrations import migrate

async def main() -> None:
    async with await AsyncConnection.connect(sys.argv[1], autocommit=True) as conn:
        applied = await migrate(conn)
    print(json.dumps([migration.id for migration in applied]))

asyncio.run(main())
"""


def test_migration_ids_are_unique_and_ascending() -> None:
    ids = [migration.id for migration in MIGRATIONS]
    assert ids == sorted(set(ids))
    assert ids[0] == 1


async def test_running_migrations_twice_is_harmless(fresh_postgres_url: str) -> None:
    async with await AsyncConnection.connect(fresh_postgres_url, autocommit=True) as conn:
        first = await migrate(conn)
        second = await migrate(conn)
        recorded = await recorded_migrations(conn)
    assert [migration.id for migration in first] == [m.id for m in MIGRATIONS]
    assert second == []
    assert recorded == CODE_MIGRATIONS


async def test_app_setup_migrates_a_fresh_database(fresh_postgres_url: str) -> None:
    settings = Settings(state_cold_backend="postgres", postgres_url=fresh_postgres_url)
    pg = PostgresConnection(settings.postgres)
    try:
        await pg.setup()
        await pg.setup()
        async with pg.connection("check") as conn:
            recorded = await recorded_migrations(conn)
            cursor = await conn.execute(
                "SELECT count(*) AS n FROM pg_tables WHERE tablename = ANY(%s)",
                (
                    [
                        "workflow_records",
                        "state_audit_log",
                        "cp_checkpoints",
                        "cp_blobs",
                        "cp_writes",
                    ],
                ),
            )
            row = await cursor.fetchone()
    finally:
        await pg.close()
    assert recorded == CODE_MIGRATIONS
    assert row is not None and row["n"] == 5


def _waiting_for_migration_lock(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ).fetchone()
    return int(row[0]) if row else 0


def test_two_processes_migrating_at_once_both_succeed(
    fresh_postgres_url: str, repo_root: Path
) -> None:
    # Hold the migration lock so both processes are provably inside `migrate` at the
    # same moment; releasing it lets them go at once. Without the lock in `migrate`
    # they would not wait here and would race on the empty database.
    holder = psycopg.connect(fresh_postgres_url)
    holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE_IN_A_PROCESS, fresh_postgres_url],
            cwd=repo_root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 30
        while _waiting_for_migration_lock(fresh_postgres_url) < 2:
            assert time.monotonic() < deadline, "the processes never reached the migration lock"
            assert all(p.poll() is None for p in processes), "a process exited early"
            time.sleep(0.05)
    finally:
        holder.rollback()
        holder.close()
    outputs = [p.communicate(timeout=60) for p in processes]

    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr.decode()
    applied = [json.loads(stdout) for stdout, _ in outputs]
    # One process applied everything, the other found it done.
    assert sorted(applied, key=len) == [[], [m.id for m in MIGRATIONS]]
    with psycopg.connect(fresh_postgres_url) as conn:
        recorded = conn.execute("SELECT id, name FROM schema_migrations ORDER BY id").fetchall()
    assert recorded == CODE_MIGRATIONS


def _app(url: str, operation_timeout: float) -> PostgresConnection:
    settings = Settings(
        state_cold_backend="postgres",
        postgres_url=url,
        postgres_operation_timeout_seconds=operation_timeout,
    )
    return PostgresConnection(settings.postgres)


async def test_app_start_waits_past_the_operation_timeout_for_another_process_migrating(
    fresh_postgres_url: str,
) -> None:
    """Another instance (or the deploy hook) holds the migration lock for longer than one
    operation may last: the app starting meanwhile waits for it, then applies what is
    left, instead of failing its start."""
    holder = await AsyncConnection.connect(fresh_postgres_url)
    await holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
    pg = _app(fresh_postgres_url, 1.0)
    try:
        setup = asyncio.create_task(pg.setup())
        deadline = time.monotonic() + 10
        while _waiting_for_migration_lock(fresh_postgres_url) < 1:
            assert time.monotonic() < deadline, "the app never reached the migration lock"
            assert not setup.done(), "the app's start ended before reaching the lock"
            await asyncio.sleep(0.05)
        # Past the operation timeout, the cancel and the grace the client allows a call.
        await asyncio.sleep(3.5)
        await holder.rollback()
        await setup
        async with pg.connection("check") as conn:
            assert await recorded_migrations(conn) == CODE_MIGRATIONS
    finally:
        await holder.close()
        await pg.close()


async def test_app_start_on_a_migrated_database_takes_no_migration_lock(
    fresh_postgres_url: str,
) -> None:
    """A database with every migration this release knows is only read at start, even
    while another process (a newer release, the deploy hook) migrates it further."""
    async with await AsyncConnection.connect(fresh_postgres_url, autocommit=True) as conn:
        await migrate(conn)
    holder = await AsyncConnection.connect(fresh_postgres_url)
    await holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
    pg = _app(fresh_postgres_url, 1.0)
    try:
        started = time.monotonic()
        await pg.setup()
        assert time.monotonic() - started < 1.0
    finally:
        await holder.close()
        await pg.close()


async def test_a_migration_longer_than_the_operation_timeout_completes_at_app_start(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = Migration(10_000, "slow", "SELECT pg_sleep(2)")
    monkeypatch.setattr(migrations, "MIGRATIONS", (*MIGRATIONS, slow))
    pg = _app(fresh_postgres_url, 1.0)
    try:
        await pg.setup()
        async with pg.connection("check") as conn:
            assert await recorded_migrations(conn) == [*CODE_MIGRATIONS, (slow.id, slow.name)]
    finally:
        await pg.close()


def _waiting_for_a_table_lock(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND NOT granted"
        ).fetchone()
    return int(row[0]) if row else 0


async def test_an_upgrade_waiting_for_a_table_lock_never_stalls_the_apps_queries(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database an older release created (migrations 1-8) upgraded while that release
    still runs (a rolling deploy): migration 9 alters `cp_checkpoints`, and a long
    transaction of the old release reading it holds the alter off. Queued for its lock,
    the alter would stall every later query of the table (each waits behind it) until
    that transaction ends; it gives way after a short wait instead and tries again, so
    the app's reads go on, and the upgrade completes once the table is free."""
    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS[:8])
    async with await AsyncConnection.connect(fresh_postgres_url, autocommit=True) as conn:
        assert [m.id for m in await migrate(conn)] == list(range(1, 9))
    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS)
    old_release = await AsyncConnection.connect(fresh_postgres_url)
    reader = await AsyncConnection.connect(fresh_postgres_url, autocommit=True)
    upgrader = await AsyncConnection.connect(fresh_postgres_url, autocommit=True)
    try:
        await old_release.execute("SELECT count(*) FROM cp_checkpoints")  # its lock kept
        upgrade = asyncio.create_task(migrate(upgrader, statement_timeout_seconds=60))
        deadline = time.monotonic() + 10
        while _waiting_for_a_table_lock(fresh_postgres_url) < 1:
            assert time.monotonic() < deadline, "the upgrade never waited for the table"
            assert not upgrade.done(), "the upgrade ended without waiting for the table"
            await asyncio.sleep(0.05)
        started = time.monotonic()
        read = asyncio.create_task(reader.execute("SELECT count(*) FROM cp_checkpoints"))
        done, _ = await asyncio.wait({read}, timeout=6)
        assert done, "a read of cp_checkpoints stalled behind the waiting migration"
        assert time.monotonic() - started < 5
        assert not upgrade.done()
        await old_release.rollback()
        applied = await asyncio.wait_for(upgrade, timeout=30)
        assert [m.id for m in applied] == [m.id for m in MIGRATIONS[8:]]
        assert await recorded_migrations(upgrader) == CODE_MIGRATIONS
    finally:
        await old_release.close()
        await reader.close()
        await upgrader.close()


async def test_an_upgrade_in_a_deadlock_with_the_apps_transaction_gives_way_and_completes(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade past migration 6 while the old release runs: migration 7 indexes
    `workflow_records` (its writes wait for the migration from then on), migration 9 waits
    for `cp_checkpoints`, which a transaction of the old release read, and that transaction
    then writes a record: a deadlock, which the server ends by failing the migration (it
    waited first). Rolled back, the migration holds nothing, as after a lock timeout: it
    tries again, and completes once the table is free (it failed the app's start, or the
    deploy hook, with DeadlockDetected)."""
    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS[:6])
    async with await AsyncConnection.connect(fresh_postgres_url, autocommit=True) as conn:
        assert [m.id for m in await migrate(conn)] == list(range(1, 7))
    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS)
    old_release = await AsyncConnection.connect(fresh_postgres_url)
    upgrader = await AsyncConnection.connect(fresh_postgres_url, autocommit=True)
    try:
        # The migration alone finds the deadlock (a loaded machine sending the update late).
        await old_release.execute("SET deadlock_timeout = '1min'")
        await old_release.execute("SELECT count(*) FROM cp_checkpoints")  # its lock kept
        upgrade = asyncio.create_task(migrate(upgrader, statement_timeout_seconds=60))
        deadline = time.monotonic() + 10
        while _waiting_for_a_table_lock(fresh_postgres_url) < 1:
            assert time.monotonic() < deadline, "the upgrade never waited for the table"
            assert not upgrade.done(), "the upgrade ended without waiting for the table"
            await asyncio.sleep(0.05)
        # Within the migration's deadlock_timeout (1 s) of its wait.
        await asyncio.wait_for(
            old_release.execute(
                "UPDATE workflow_records SET version = version + 1 WHERE thread_id = %s",
                ("absent",),
            ),
            timeout=10,
        )
        assert not upgrade.done(), "the upgrade failed on the deadlock"
        await old_release.rollback()
        applied = await asyncio.wait_for(upgrade, timeout=30)
        assert [m.id for m in applied] == [m.id for m in MIGRATIONS[6:]]
        assert await recorded_migrations(upgrader) == CODE_MIGRATIONS
    finally:
        await old_release.close()
        await upgrader.close()
