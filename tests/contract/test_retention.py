"""Retention (`ColdRetention`: hold, release, sweep) on every cold backend, on the real servers.

Cosmos expires items itself and the local emulator never does, so what each
item carries (`ttl`) is inspected. The Postgres sweep runs against a clock the
test controls: rows are backdated. Every Postgres case gets a database of its
own, since a sweep deletes across the whole database.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest

from state.cold import cosmos_retention, postgres_retention
from state.cold.cosmos_client import CosmosConnection
from state.factory import Backends, backends_for
from state.ports import ColdRetention, StoredBlob, StoredCheckpoint, StoredWrite
from state.settings import Settings
from tests.contract.conftest import unique_thread

TTL = 3600
# Far enough back to be past the TTL whatever the test's own duration.
LONG_AGO = 10 * TTL
Open = Callable[..., Any]
PG_TABLES = ("workflow_records", "state_audit_log", "cp_checkpoints", "cp_blobs", "cp_writes")


@pytest.fixture
def open_cold(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> Callable[..., Any]:
    """Backends for one cold backend without a hot tier; Postgres in a fresh database."""

    @asynccontextmanager
    async def open_(backend: str, **overrides: object) -> AsyncIterator[Backends]:
        if backend == "postgres":
            overrides.setdefault("postgres_url", request.getfixturevalue("fresh_postgres_url"))
        # A small item limit, so a large value is stored as chunk items too.
        settings = make_settings(backend, hot=False, state_max_item_bytes=4096, **overrides)
        async with backends_for(settings) as backends:
            yield backends

    return open_


def checkpoint_id(n: int) -> str:
    return f"1f0{n:05x}-0000-6000-8000-000000000000"


async def seed(backends: Backends, thread_id: str, *, record: bool = True) -> None:
    """Everything a thread can have: record + audit, checkpoint, blobs (one chunked), writes."""
    if record:
        await backends.cold.create(thread_id, {"n": 0}, agent_id="seed")
        await backends.cold.update_section(thread_id, "n", 1, expected_version=1, agent_id="seed")
    stored = StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns="",
        checkpoint_id=checkpoint_id(1),
        parent_checkpoint_id=None,
        checkpoint=("msgpack", b"checkpoint"),
        metadata={"step": 1},
        channel_versions={"small": "1", "large": "1"},
    )
    await backends.checkpoints.put_checkpoint(
        stored,
        [
            StoredBlob("small", "1", ("json", b"[1]")),
            StoredBlob("large", "1", ("bytes", os.urandom(20_000))),  # incompressible
        ],
    )
    await backends.checkpoints.put_writes(
        thread_id,
        "",
        checkpoint_id(1),
        [StoredWrite("task-1", "", 0, "small", ("json", b"[2]"))],
        upsert=False,
    )


async def intact(backends: Backends, thread_id: str) -> bool:
    """The record, its whole trail, and the checkpoint with its blobs and writes read back."""
    record = await backends.cold.get(thread_id)
    trail = await backends.cold.audit_trail(thread_id)
    stored = await backends.checkpoints.get_checkpoint(thread_id, "", None)
    if stored is None:
        return False
    blobs = stored.blobs or await backends.checkpoints.get_blobs(
        thread_id, "", stored.channel_versions
    )
    writes = stored.writes or await backends.checkpoints.get_writes(thread_id, "", checkpoint_id(1))
    return (
        record is not None
        and record.sections == {"n": 1}
        and [entry.version for entry in trail] == [2, 1]
        and set(blobs) == {"small", "large"}
        and len(writes) == 1
    )


# --------------------------------------------------------------------------- inspection


async def cosmos_items(backends: Backends, thread_id: str) -> list[dict[str, Any]]:
    connection = CosmosConnection(backends.settings)
    try:
        container = await connection.container()
        return [
            item
            async for item in container.query_items(
                "SELECT * FROM c WHERE c.thread_id = @t",
                parameters=[{"name": "@t", "value": thread_id}],
                partition_key=thread_id,
            )
        ]
    finally:
        await connection.close()


async def pg_execute(
    backends: Backends, sql: str, params: tuple[Any, ...]
) -> list[tuple[Any, ...]]:
    url = backends.settings.postgres_url
    assert url is not None
    async with await psycopg.AsyncConnection.connect(
        url.get_secret_value(), autocommit=True
    ) as conn:
        cursor = await conn.execute(sql.encode(), params)
        return await cursor.fetchall() if cursor.description else []


async def pg_rows(backends: Backends, thread_id: str) -> dict[str, int]:
    counts = {}
    for table in PG_TABLES:
        [(count,)] = await pg_execute(
            backends, f"SELECT count(*) FROM {table} WHERE thread_id = %s", (thread_id,)
        )
        counts[table] = int(count)
    return counts


async def backdate(backends: Backends, *thread_ids: str, tables: tuple[str, ...] = ()) -> None:
    """Move a thread's activity LONG_AGO seconds into the past (the sweep reads the server clock)."""
    columns = {
        "workflow_records": "updated_at",
        "cp_checkpoints": "created_at",
        "retention_holds": "changed_at",
    }
    for table, column in columns.items():
        if tables and table not in tables:
            continue
        await pg_execute(
            backends,
            f"UPDATE {table} SET {column} = {column} - make_interval(secs => %s)"
            " WHERE thread_id = ANY(%s)",
            (LONG_AGO, list(thread_ids)),
        )


async def exempt(backends: Backends, thread_id: str) -> bool:
    """Whether the backend keeps the thread whatever its age."""
    if backends.settings.state_cold_backend.value == "cosmos":
        items = await cosmos_items(backends, thread_id)
        assert items
        held = [item.get("ttl") == -1 for item in items]
        assert all(held) or not any(held), "a thread is held whole or not at all"
        return all(held)
    rows = await pg_execute(
        backends, "SELECT held FROM retention_holds WHERE thread_id = %s", (thread_id,)
    )
    return bool(rows and rows[0][0])


# --------------------------------------------------------------------------- every backend


async def test_the_factory_builds_the_port(cold_backend: str, open_cold: Open) -> None:
    async with open_cold(cold_backend) as backends:
        assert isinstance(backends.retention, ColdRetention)
        assert backends.retention.name == cold_backend


async def test_hold_and_release_are_idempotent(cold_backend: str, open_cold: Open) -> None:
    async with open_cold(cold_backend, state_cold_ttl_seconds=TTL) as backends:
        retention = backends.retention
        thread_id = unique_thread("hold")
        await seed(backends, thread_id)
        assert not await exempt(backends, thread_id)
        await retention.hold(thread_id)
        await retention.hold(thread_id)
        assert await exempt(backends, thread_id)
        await retention.release(thread_id)
        await retention.release(thread_id)
        assert not await exempt(backends, thread_id)
        assert await intact(backends, thread_id)
        # A thread with nothing stored: both are no-ops, not errors.
        nothing = unique_thread("empty")
        await retention.hold(nothing)
        await retention.release(nothing)
        await retention.release(nothing)


async def test_a_held_thread_is_never_swept(cold_backend: str, open_cold: Open) -> None:
    async with open_cold(cold_backend, state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("held")
        await seed(backends, thread_id)
        await backends.retention.hold(thread_id)
        if cold_backend == "postgres":
            await backdate(backends, thread_id)
        # Cosmos sweeps nothing: the service expires items, and held ones never.
        assert await backends.retention.sweep(limit=100) == 0
        assert await exempt(backends, thread_id)
        assert await intact(backends, thread_id)


async def test_keep_forever_sweeps_nothing(cold_backend: str, open_cold: Open) -> None:
    async with open_cold(cold_backend, state_cold_ttl_seconds=-1) as backends:
        thread_id = unique_thread("forever")
        await seed(backends, thread_id)
        if cold_backend == "postgres":
            await backdate(backends, thread_id)
        assert await backends.retention.sweep(limit=100) == 0
        assert await intact(backends, thread_id)


# --------------------------------------------------------------------------- Cosmos


async def test_cosmos_hold_marks_every_item_of_the_partition_page_by_page(
    open_cold: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cosmos_retention, "PAGE_SIZE", 3)
    async with open_cold("cosmos") as backends:
        thread_id, neighbour = unique_thread("held"), unique_thread("neighbour")
        await seed(backends, thread_id)
        await seed(backends, neighbour)
        await backends.retention.hold(thread_id)
        items = await cosmos_items(backends, thread_id)
        assert len(items) > 3 * cosmos_retention.PAGE_SIZE
        assert {item["type"] for item in items} >= {
            "workflow",
            "audit",
            "checkpoint",
            "checkpoint_chunk",
            "checkpoint_write",
        }
        assert [item["id"] for item in items if item.get("ttl") != -1] == []
        assert all("ttl" not in item for item in await cosmos_items(backends, neighbour))
        await backends.retention.release(thread_id)
        assert [
            item["id"] for item in await cosmos_items(backends, thread_id) if "ttl" in item
        ] == []


async def test_cosmos_record_updates_while_held_stay_held(open_cold: Open) -> None:
    async with open_cold("cosmos") as backends:
        thread_id, other = unique_thread("held"), unique_thread("other")
        await seed(backends, thread_id)
        await seed(backends, other)
        await backends.retention.hold(thread_id)
        await backends.retention.hold(other)
        await backends.cold.update_section(thread_id, "n", 2, expected_version=2, agent_id="t")
        items = await cosmos_items(backends, thread_id)
        assert len([item for item in items if item["type"] == "audit"]) == 3
        assert [item["id"] for item in items if item.get("ttl") != -1] == []

        await backends.retention.release(thread_id)
        await backends.cold.update_section(thread_id, "n", 3, expected_version=3, agent_id="t")
        assert [i["id"] for i in await cosmos_items(backends, thread_id) if "ttl" in i] == []
        assert [entry.version for entry in await backends.cold.audit_trail(thread_id)] == [
            4,
            3,
            2,
            1,
        ]
        assert await exempt(backends, other)  # released one thread, not its neighbours


# --------------------------------------------------------------------------- Postgres


async def test_postgres_sweep_deletes_expired_threads_whole(open_cold: Open) -> None:
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        expired, recent = unique_thread("expired"), unique_thread("recent")
        checkpointed = unique_thread("old-record-new-checkpoint")
        only_checkpoints, held = unique_thread("no-record"), unique_thread("held")
        for thread_id in (expired, recent, checkpointed, held):
            await seed(backends, thread_id)
        await seed(backends, only_checkpoints, record=False)
        await backends.retention.hold(held)
        await backdate(backends, expired, only_checkpoints, held)
        await backdate(backends, checkpointed, tables=("workflow_records",))

        assert await backends.retention.sweep(limit=100) == 2

        for gone in (expired, only_checkpoints):
            assert await pg_rows(backends, gone) == dict.fromkeys(PG_TABLES, 0), gone
        for kept in (recent, checkpointed, held):
            assert await intact(backends, kept), kept
        assert await backends.retention.sweep(limit=100) == 0


async def test_postgres_a_released_thread_expires_a_ttl_after_the_release(
    open_cold: Open,
) -> None:
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        thread_id = unique_thread("released")
        await seed(backends, thread_id)
        await backends.retention.hold(thread_id)
        await backdate(backends, thread_id)
        await backends.retention.release(thread_id)
        assert await backends.retention.sweep(limit=100) == 0  # released just now
        assert await intact(backends, thread_id)

        await backdate(backends, thread_id, tables=("retention_holds",))
        assert await backends.retention.sweep(limit=100) == 1
        assert await pg_rows(backends, thread_id) == dict.fromkeys(PG_TABLES, 0)
        holds = "SELECT count(*) FROM retention_holds WHERE thread_id = %s"
        assert await pg_execute(backends, holds, (thread_id,)) == [(0,)]


async def test_postgres_sweep_is_bounded_and_batched(
    open_cold: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_retention, "SWEEP_BATCH", 2)
    async with open_cold("postgres", state_cold_ttl_seconds=TTL) as backends:
        threads = [unique_thread("expired") for _ in range(5)]
        for thread_id in threads:
            await seed(backends, thread_id)
        await backdate(backends, *threads)

        assert await backends.retention.sweep(limit=3) == 3
        assert await backends.retention.sweep(limit=3) == 2
        assert await backends.retention.sweep(limit=3) == 0
        for thread_id in threads:
            assert await backends.cold.get(thread_id) is None
