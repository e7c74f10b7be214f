"""Postgres-specific behaviour of the cold adapters, against the session's real Postgres server.

The backend-independent cases live in the shared contract suites; these cover
what only Postgres has (transactions, SQL-level atomicity, round-trip counts,
keyset paging, bytea sizes) and its error mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from azure.core.credentials import AccessToken
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from devstack import PostgresServer, free_port
from state import schema
from state.cold import postgres_checkpoints, postgres_retention
from state.cold.postgres_checkpoints import (
    DELETE_ALL_BUT_LATEST_SQL,
    DELETE_DEPENDENTS_SQL,
    DELETE_RUN_CHECKPOINTS_SQL,
    DELTA_HISTORY_SQL,
    GET_BLOBS_SQL,
    LATE_RUN_THREADS_SQL,
    LIST_PAGE_SIZE,
    MARK_EMPTIED_SQL,
    RUN_THREADS_SQL,
    SELECT_CHECKPOINT_WITH_HISTORY_SQL,
    SELECT_CHECKPOINTS_SQL,
    PostgresCheckpointStore,
)
from state.cold.postgres_client import ENTRA_SCOPE, OPEN_RETRY_SECONDS, PostgresConnection
from state.cold.postgres_store import PostgresStateStore
from state.errors import (
    BackendUnavailable,
    CorruptState,
    InvalidValue,
    ParentGone,
    RequestRejected,
    SettingsError,
    StaleFencingToken,
    StateError,
    UnsupportedSchemaVersion,
)
from state.ports import (
    CheckpointPut,
    CheckpointStore,
    ColdStateStore,
    FlushOp,
    PruneStrategy,
    StoredBlob,
    StoredCheckpoint,
    StoredWrite,
    WritesPut,
)
from state.settings import Settings
from tests.support.postgres import own_database
from tests.support.records import unique_thread


@pytest.fixture
async def pg(make_settings: Callable[..., Settings]) -> AsyncIterator[PostgresConnection]:
    connection = PostgresConnection(make_settings("postgres", hot=False).postgres)
    await connection.setup()
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def store(pg: PostgresConnection, make_settings: Callable[..., Settings]) -> PostgresStateStore:
    return PostgresStateStore(pg)


@pytest.fixture
def checkpoints(
    pg: PostgresConnection, make_settings: Callable[..., Settings]
) -> PostgresCheckpointStore:
    return PostgresCheckpointStore(pg)


def test_adapters_implement_the_ports(
    store: PostgresStateStore, checkpoints: PostgresCheckpointStore
) -> None:
    assert isinstance(store, ColdStateStore)
    assert isinstance(checkpoints, CheckpointStore)


# --------------------------------------------------------------------------- workflow records


async def test_audit_log_rejects_updates(pg: PostgresConnection, store: PostgresStateStore) -> None:
    thread = unique_thread()
    await store.create(thread, {"s": 1}, agent_id="a")
    async with pg.connection("tamper") as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            await conn.execute(
                "UPDATE state_audit_log SET agent_id = 'someone else' WHERE thread_id = %s",
                (thread,),
            )


@pytest.mark.parametrize(
    "spelled",
    [
        # psycopg reads connect_timeout itself, as a number of seconds: libpq never does.
        {"connect_timeout": "2.5"},
        # libpq reads a port as strtol does: spaces around it and a sign are fine.
        {"port": " {port} "},
        {"port": "+{port}"},
        {"keepalives_idle": " 30", "keepalives_count": "+3"},
    ],
)
async def test_a_postgres_url_psycopg_connects_with_passes_the_start_check(
    fresh_postgres_url: str, spelled: dict[str, str]
) -> None:
    params = conninfo_to_dict(fresh_postgres_url)
    url = make_conninfo(
        fresh_postgres_url,
        **{name: value.format(port=params["port"]) for name, value in spelled.items()},
    )
    settings = Settings(state_cold_backend="postgres", postgres_url=url)
    pg = PostgresConnection(settings.postgres)
    try:
        store = PostgresStateStore(pg)
        await store.setup()
        await store.create("t", {"s": 1}, agent_id="a")
        record = await store.get("t")
        assert record is not None and record.sections == {"s": 1}
    finally:
        await pg.close()


@pytest.mark.parametrize(
    "spelled",
    [
        {"keepalives_idle": "-1"},
        {"keepalives_interval": "0"},
        {"keepalives_count": "128"},
        {"port": "{port},{port}"},
        {"host": "127.0.0.1,127.0.0.1", "hostaddr": "127.0.0.1"},
    ],
)
async def test_a_postgres_url_the_start_check_refuses_is_one_libpq_cannot_connect_with(
    fresh_postgres_url: str, spelled: dict[str, str]
) -> None:
    """The start check's rules are libpq's (and Linux's), not stricter: each value it
    refuses fails a connection to a server that is up."""
    params = conninfo_to_dict(fresh_postgres_url)
    url = make_conninfo(
        fresh_postgres_url,
        **{name: value.format(port=params["port"]) for name, value in spelled.items()},
    )
    with pytest.raises(SettingsError):
        Settings(state_cold_backend="postgres", postgres_url=url)
    with pytest.raises(psycopg.OperationalError):
        await psycopg.AsyncConnection.connect(url)


async def test_a_failed_audit_insert_rolls_the_update_back(
    fresh_postgres_url: str,
) -> None:
    settings = Settings(state_cold_backend="postgres", postgres_url=fresh_postgres_url)
    pg = PostgresConnection(settings.postgres)
    try:
        store = PostgresStateStore(pg)
        await store.setup()
        await store.create("t", {"s": 1}, agent_id="a")
        async with pg.connection("sabotage") as conn:
            await conn.execute(
                "ALTER TABLE state_audit_log ADD CONSTRAINT no_mallory CHECK (agent_id <> 'mallory')"
            )
        with pytest.raises(RequestRejected) as refused:
            await store.update_section("t", "s", 2, expected_version=1, agent_id="mallory")
        assert isinstance(refused.value.__cause__, psycopg.errors.CheckViolation)
        record = await store.get("t")
        assert record is not None and (record.version, record.sections) == (1, {"s": 1})
    finally:
        await pg.close()


async def test_a_write_stores_an_old_record_in_the_current_schema(
    pg: PostgresConnection, store: PostgresStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    thread = unique_thread()
    await store.create(thread, {"customer": "Ada"}, agent_id="v1-code")
    calls: list[int] = []

    def rename_customer(document: schema.Document) -> schema.Document:
        calls.append(document["version"])
        sections = dict(document["sections"])
        sections["customer_name"] = sections.pop("customer")
        return {**document, "sections": sections}

    monkeypatch.setitem(schema.CURRENT, "workflow", 2)
    monkeypatch.setitem(schema._UPCASTERS, ("workflow", 1), rename_customer)
    record = await store.get(thread)
    assert record is not None
    assert (record.sections, record.schema_version) == ({"customer_name": "Ada"}, 2)

    updated = await store.update_section(thread, "notes", ["v2"], expected_version=1, agent_id="v2")
    assert (updated.schema_version, updated.version) == (2, 2)
    assert updated.sections == {"customer_name": "Ada", "notes": ["v2"]}
    async with pg.connection("inspect") as conn:
        cursor = await conn.execute(
            "SELECT schema_version, sections FROM workflow_records WHERE thread_id = %s", (thread,)
        )
        assert await cursor.fetchone() == {"schema_version": 2, "sections": updated.sections}
    calls.clear()
    assert await store.get(thread) == updated
    assert calls == []  # stored in the current schema: nothing left to upcast
    assert [e.before for e in await store.audit_trail(thread, limit=1)] == [None]

    # Version-1 code meeting version-2 state refuses it instead of misreading it.
    monkeypatch.setitem(schema.CURRENT, "workflow", 1)
    with pytest.raises(UnsupportedSchemaVersion):
        await store.get(thread)
    with pytest.raises(UnsupportedSchemaVersion):
        await store.update_section(thread, "notes", ["v1"], expected_version=2, agent_id="v1")


async def test_a_nul_character_in_json_is_a_typed_error_and_writes_nothing(
    store: PostgresStateStore, checkpoints: PostgresCheckpointStore
) -> None:
    thread = unique_thread()
    with pytest.raises(InvalidValue, match="NUL"):
        await store.create(thread, {"intake": {"text": "charged\x00twice"}}, agent_id="intake")
    assert await store.get(thread) is None
    with pytest.raises(InvalidValue):
        await store.create(thread, {"key\x00": 1}, agent_id="intake")

    # The six characters backslash-u-0-0-0-0 are text like any other, escaped backslash or not.
    literal = {"text": "\\u0000", "after_a_backslash": "\\\\u0000"}
    await store.create(thread, {"intake": literal}, agent_id="intake")
    with pytest.raises(InvalidValue):
        await store.update_section(
            thread, "intake", {"text": "\\\x00"}, expected_version=1, agent_id="intake"
        )
    record = await store.get(thread)
    assert record is not None and (record.version, record.sections) == (1, {"intake": literal})

    (checkpoint_id,) = _ids(1)
    with pytest.raises(InvalidValue):
        await checkpoints.put_checkpoint(
            _checkpoint(thread, checkpoint_id, metadata={"source": "in\x00put"}), []
        )
    assert await checkpoints.get_checkpoint(thread, "", None) is None


async def test_unreachable_server_is_backend_unavailable() -> None:
    settings = Settings(
        state_cold_backend="postgres",
        postgres_url=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
        postgres_pool_timeout_seconds=0.5,
    )
    pg = PostgresConnection(settings.postgres)
    try:
        store = PostgresStateStore(pg)
        with pytest.raises(BackendUnavailable):
            await store.get("t")
        health = await store.health()
        assert not health.up and "postgres" in health.detail
    finally:
        await pg.close()


async def test_a_server_refusing_every_connection_fails_calls_at_once_not_asked_by_each() -> None:
    """A server that closes every connection at once (as one refusing sign-ins does): the
    pool only logged each failed connect, every call waiting out the pool's timeout
    (10 s) for "couldn't get a connection". Now each call fails at once, saying why; and
    the calls of a burst do not each connect: one tries, the others fail as it did."""
    accepted = 0

    async def refuse(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = Settings(
        state_cold_backend="postgres",
        postgres_url=f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable",
    )
    pg = PostgresConnection(settings.postgres)
    try:
        store = PostgresStateStore(pg)
        began = time.monotonic()
        for _ in range(20):
            with pytest.raises(BackendUnavailable, match="server closed the connection"):
                await store.get("t")
        assert time.monotonic() - began < 0.9
        assert accepted == 1
        await asyncio.sleep(OPEN_RETRY_SECONDS)
        with pytest.raises(BackendUnavailable):
            await store.get("t")
        assert accepted == 2
    finally:
        await pg.close()
        server.close()
        await server.wait_closed()


async def test_a_closed_port_fails_blocking_calls_at_once_as_async_ones() -> None:
    """The saver's sync API (the blocking pool) against a closed port: as the async pool,
    its call fails at once naming the refusal, not after the pool's timeout (10 s) with
    "couldn't get a connection"; and the failure is remembered for either pool."""
    settings = Settings(
        state_cold_backend="postgres",
        postgres_url=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?sslmode=disable",
    )
    pg = PostgresConnection(settings.postgres)

    def blocking_call() -> None:
        with pg.blocking_connection("probe") as conn:
            conn.execute("SELECT 1")

    try:
        began = time.monotonic()
        with pytest.raises(BackendUnavailable, match="refused"):
            await asyncio.to_thread(blocking_call)
        assert time.monotonic() - began < 2.0
        with pytest.raises(BackendUnavailable, match="refused"):
            await PostgresStateStore(pg).get("t")  # within OPEN_RETRY_SECONDS: not asked
    finally:
        await pg.close()


async def test_pool_size_and_timeouts_come_from_the_settings(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        "postgres",
        hot=False,
        postgres_pool_min_size=1,
        postgres_pool_max_size=1,
        postgres_pool_timeout_seconds=0.3,
        postgres_operation_timeout_seconds=1.0,
    )
    pg = PostgresConnection(settings.postgres)
    try:
        pool = await pg.pool()
        assert (pool.min_size, pool.max_size, pool.timeout) == (1, 1, 0.3)
        # The only connection is busy: a second caller gives up after the pool timeout.
        async with pg.connection("holder"):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                async with pg.connection("waiter"):
                    pass
            assert 0.25 <= time.monotonic() - started < 0.9
        # A statement that does not answer in time is abandoned after the operation timeout.
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="no answer in time"):
            async with pg.connection("slow") as conn:
                await conn.execute("SELECT pg_sleep(5)")
        assert 0.9 <= time.monotonic() - started < 3
    finally:
        await pg.close()


class RecordingCredential:
    """Stands in for Entra ID: hands out numbered tokens and records the scopes asked for."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **_: object) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(f"token-{len(self.scopes)}", int(time.time()) + 3600)

    async def close(self) -> None:
        """Nothing to release."""


async def test_each_new_connection_signs_in_with_a_fresh_token(
    make_settings: Callable[..., Settings],
) -> None:
    credential = RecordingCredential()
    pg = PostgresConnection(make_settings("postgres", hot=False).postgres, credential=credential)
    try:
        async with pg.connection("first") as first, pg.connection("second") as second:
            passwords = {first.info.password, second.info.password}
    finally:
        await pg.close()
    # The pool may open a spare connection in the background: at least two tokens.
    issued = {f"token-{n}" for n in range(1, len(credential.scopes) + 1)}
    assert len(passwords) == 2 and passwords <= issued
    assert set(credential.scopes) == {(ENTRA_SCOPE,)}


# --------------------------------------------------------------------------- checkpoints


def _checkpoint(
    thread: str,
    checkpoint_id: str,
    *,
    ns: str = "",
    parent: str | None = None,
    metadata: dict[str, object] | None = None,
    versions: dict[str, str | int | float] | None = None,
) -> StoredCheckpoint:
    return StoredCheckpoint(
        thread_id=thread,
        checkpoint_ns=ns,
        checkpoint_id=checkpoint_id,
        parent_checkpoint_id=parent,
        checkpoint=("msgpack", f"checkpoint {checkpoint_id}".encode()),
        metadata=metadata or {},
        channel_versions=versions or {},
    )


def _ids(count: int) -> list[str]:
    """Time-ordered ids shaped like LangGraph's uuid6 strings (ascending)."""
    return [f"1f0{n:05x}-0000-6000-8000-{uuid.uuid4().hex[:12]}" for n in range(count)]


async def _blob_versions(pg: PostgresConnection, thread: str) -> set[tuple[str, str]]:
    async with pg.connection("inspect") as conn:
        cursor = await conn.execute(
            "SELECT channel, version FROM cp_blobs WHERE thread_id = %s", (thread,)
        )
        return {(row["channel"], row["version"]) for row in await cursor.fetchall()}


async def test_ten_megabyte_values_round_trip(checkpoints: PostgresCheckpointStore) -> None:
    thread = unique_thread()
    big = os.urandom(10 * 1024 * 1024)
    (checkpoint_id,) = _ids(1)
    await checkpoints.put_checkpoint(
        _checkpoint(thread, checkpoint_id, versions={"messages": "v1"}),
        [StoredBlob("messages", "v1", ("bytes", big)), StoredBlob("empty", "v1", ("empty", b""))],
    )
    await checkpoints.put_writes(
        thread,
        "",
        checkpoint_id,
        [StoredWrite("task", "", 0, "messages", ("bytes", big))],
        upsert=False,
    )
    blobs = await checkpoints.get_blobs(thread, "", {"messages": "v1", "empty": "v1", "gone": "v1"})
    assert blobs == {"messages": ("bytes", big), "empty": ("empty", b"")}
    (write,) = await checkpoints.get_writes(thread, "", checkpoint_id)
    assert write.value == ("bytes", big)


async def test_large_payloads_are_stored_with_lz4_where_the_server_has_it(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore
) -> None:
    thread = unique_thread()
    (checkpoint_id,) = _ids(1)
    text = b"refund charge account login " * 4096  # compressible, well over the TOAST threshold
    await checkpoints.put_checkpoint(
        dataclasses.replace(
            _checkpoint(thread, checkpoint_id, versions={"messages": "1"}),
            checkpoint=("msgpack", text),
        ),
        [StoredBlob("messages", "1", ("msgpack", text))],
    )
    await checkpoints.put_writes(
        thread, "", checkpoint_id, [StoredWrite("t", "", 0, "m", ("msgpack", text))], upsert=False
    )
    async with pg.connection("inspect") as conn:
        try:
            async with conn.transaction():
                await conn.execute("CREATE TEMPORARY TABLE lz4_probe (b bytea COMPRESSION lz4)")
            expected = "lz4"
        except psycopg.errors.FeatureNotSupported:
            expected = "pglz"
        cursor = await conn.execute(
            "SELECT (SELECT pg_column_compression(blob) FROM cp_blobs WHERE thread_id = %(t)s),"
            " (SELECT pg_column_compression(blob) FROM cp_writes WHERE thread_id = %(t)s),"
            " (SELECT pg_column_compression(checkpoint) FROM cp_checkpoints"
            "  WHERE thread_id = %(t)s) AS checkpoint",
            {"t": thread},
        )
        row = await cursor.fetchone()
    assert row is not None and set(row.values()) == {expected}
    assert (await checkpoints.get_blobs(thread, "", {"messages": "1"}))["messages"][1] == text


async def test_latest_with_blobs_and_writes_is_one_statement_whatever_the_history(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore
) -> None:
    thread = unique_thread()
    ids = _ids(50)
    # Stored out of order: "latest" is the greatest id, not the last written.
    for checkpoint_id in [*ids[25:], *ids[:25]]:
        await checkpoints.put_checkpoint(_checkpoint(thread, checkpoint_id), [])
    newest = _ids(51)[-1]
    await checkpoints.put_checkpoint(
        _checkpoint(thread, newest, versions={"a": 2, "b": "v\\1", "c": 1.5}),
        [
            StoredBlob("a", 2, ("json", b"a2")),
            StoredBlob("b", "v\\1", ("json", b"b")),
            StoredBlob("c", 1.5, ("empty", b"")),
        ],
    )
    writes = [StoredWrite("task", "path", 0, "ch\\an", ("json", b"w"))]
    await checkpoints.put_writes(thread, "", newest, writes, upsert=False)

    pg.counters.reset()
    latest = await checkpoints.get_checkpoint(thread, "", None)
    assert pg.counters.requests == 1
    assert latest is not None and latest.checkpoint_id == newest
    assert latest.blobs == {"a": ("json", b"a2"), "b": ("json", b"b"), "c": ("empty", b"")}
    assert latest.writes == writes
    older = await checkpoints.get_checkpoint(thread, "", ids[3])
    assert older is not None and (older.blobs, older.writes) == ({}, [])
    assert await checkpoints.get_checkpoint(thread, "child", None) is None


async def test_blob_reads_are_key_lookups_not_scans_of_the_thread(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore
) -> None:
    thread = unique_thread()
    for checkpoint_id, n in zip(_ids(300), range(300), strict=True):
        await checkpoints.put_checkpoint(
            _checkpoint(thread, checkpoint_id, versions={"a": str(n)}),
            [StoredBlob("a", str(n), ("json", b"1"))],
        )
    async with pg.connection("inspect") as conn:
        await conn.execute("ANALYZE cp_blobs")
        plans = []
        for query, params in (
            (
                f"{SELECT_CHECKPOINTS_SQL} WHERE thread_id = %s AND checkpoint_ns = ''"
                " ORDER BY checkpoint_id DESC LIMIT 1",
                (thread,),
            ),
            (GET_BLOBS_SQL, (["a"], ["7"], thread, "")),
        ):
            cursor = await conn.execute(f"EXPLAIN {query}", params)
            plans.append("\n".join(row["QUERY PLAN"] for row in await cursor.fetchall()))
    for plan in plans:
        blob_scans = [line for line in plan.splitlines() if "on cp_blobs" in line]
        assert blob_scans and all("Index Scan using cp_blobs_pkey" in s for s in blob_scans), plan
        assert "channel = " in plan and "version = " in plan, plan


async def test_a_read_with_its_delta_history_is_not_compiled_by_jit(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore
) -> None:
    # The planner guesses a thousand rows per step of the history's recursive walks, so
    # the statement's estimated cost passes jit_above_cost: compiled, it took 80 ms with
    # a small chunk table and over a second with a million chunks, for 2 ms of work.
    thread = unique_thread()
    parent, child = _ids(2)
    await checkpoints.put_checkpoint(
        _checkpoint(thread, parent, versions={"messages": 1}),
        [StoredBlob("messages", 1, ("json", b"[]"))],
    )
    await checkpoints.put_checkpoint(
        _checkpoint(
            thread,
            child,
            parent=parent,
            versions={"messages": 2},
            metadata={"counters_since_delta_snapshot": {"messages": 1}},
        ),
        [],
    )
    read = SELECT_CHECKPOINT_WITH_HISTORY_SQL.replace(
        "{where}", "WHERE thread_id = %s AND checkpoint_ns = '' AND checkpoint_id = %s"
    )
    async with pg.connection("inspect") as conn, conn.transaction():
        # Whether this small table's estimate passes the threshold depends on its
        # statistics: the threshold is lowered so that any JIT the session allows happens.
        await conn.execute("SET LOCAL jit_above_cost = 0")
        cursor = await conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {read}", (thread, child))
        [plan] = (await cursor.fetchone() or {}).values()
    assert plan[0]["Plan"]["Actual Rows"] == 1
    assert "JIT" not in plan[0], plan[0]["JIT"]


# Other threads' rows, as a store serving many threads holds them: about 300 of each
# kind a thread. The planner chose to hash a sequential scan of a whole table when it
# could not tell that a statement reads a few threads (seen on a benchmark's store and on
# one with a million checkpoints: a prune took 0.7-1.2 s instead of 20 ms).
CROWD_SQL = """
WITH crowd AS (
    SELECT %(prefix)s || (n / 300) AS thread_id, n,
           lpad(to_hex(n), 8, '0') AS checkpoint_id
    FROM generate_series(1, 150000) AS n
), checkpoints AS (
    INSERT INTO cp_checkpoints (thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id,
                                type, checkpoint, metadata, channel_versions, schema_version)
    SELECT thread_id, '', checkpoint_id, NULL, 'msgpack', '\\x00',
           jsonb_build_object('run_id', 'run-' || (n / 30)),
           jsonb_build_object('messages', n::text), 1
    FROM crowd
), blobs AS (
    INSERT INTO cp_blobs (thread_id, checkpoint_ns, channel, version, type, blob, schema_version)
    SELECT thread_id, '', 'messages', n::text, 'msgpack', '\\x00', 1 FROM crowd
), writes AS (
    INSERT INTO cp_writes (thread_id, checkpoint_ns, checkpoint_id, task_id, idx, task_path,
                           channel, type, blob, schema_version)
    SELECT thread_id, '', checkpoint_id, 'task', 0, '', 'messages', 'msgpack', '\\x00', 1
    FROM crowd
), chunks AS (
    INSERT INTO cp_chunks (thread_id, digest, node, data)
    SELECT thread_id, sha256(int4send(n)), n %% 10 = 0, '\\x00' FROM crowd
), deleted AS (
    INSERT INTO cp_deleted_threads (thread_id, deleted_at, before_checkpoint_id)
    SELECT %(prefix)s || 'deleted-' || n, now(), '1f0' FROM crowd
), audit AS (
    INSERT INTO state_audit_log (thread_id, version, agent_id, section, before, after, at,
                                 schema_version)
    SELECT %(prefix)s || 'case-' || n, 1, 'agent', 'case', '{}', '{}', now(), 1 FROM crowd
)
-- Workflow records of as many cases, and an archive of every hundredth.
INSERT INTO workflow_records (thread_id, version, sections, schema_version, created_at,
                              updated_at)
SELECT %(prefix)s || 'case-' || n || CASE WHEN n %% 100 = 0 THEN '~archive~1' ELSE '' END,
       1, '{}', 1, now(), now()
FROM crowd
"""
CROWDED_TABLES = (
    "cp_checkpoints",
    "cp_blobs",
    "cp_writes",
    "cp_chunks",
    "cp_deleted_threads",
    "workflow_records",
    "state_audit_log",
)


# Session-scoped, not module: under pytest-xdist a worker runs other modules' tests between
# these, and each switch tore a module fixture down (the crowd built 3 times in a CI run).
@pytest.fixture(scope="session")
def crowd_database(stack_env: dict[str, str]) -> Iterator[str]:
    """A database of the crowd's own on the session server (dropped whole afterwards)."""
    with own_database(stack_env["POSTGRES_URL"]) as url:
        yield url


@pytest.fixture(scope="session")
async def crowded(
    crowd_database: str, make_settings: Callable[..., Settings]
) -> AsyncIterator[PostgresConnection]:
    """The store crowded with other threads' rows, filled once for the tests that only ask
    the planner (EXPLAIN runs nothing): 150,000 rows a table took 8-10 s to write each
    time. A database of its own, so the other tests never see the crowd."""
    connection = PostgresConnection(
        make_settings("postgres", hot=False, postgres_url=crowd_database).postgres
    )
    await connection.setup()
    try:
        async with connection.connection("crowd") as conn:
            await conn.execute(CROWD_SQL, {"prefix": "crowd-"})
            await conn.execute(f"ANALYZE {', '.join(CROWDED_TABLES)}")
        yield connection
    finally:
        await connection.close()


async def _plans(pg: PostgresConnection, statements: list[tuple[str, Any]]) -> list[str]:
    """The plans the server chooses for these statements (nothing is executed)."""
    plans = []
    async with pg.connection("inspect") as conn:
        for query, params in statements:
            cursor = await conn.execute(f"EXPLAIN {query}", params)
            plans.append("\n".join(row["QUERY PLAN"] for row in await cursor.fetchall()))
    return plans


async def test_delta_history_reads_chunks_by_key_however_many_other_threads_stored(
    crowded: PostgresConnection,
) -> None:
    # A seed's chunks: the planner guessed thousands of digests per manifest (6 ms a
    # read on a benchmark's store, growing with the table).
    plans = await _plans(
        crowded,
        [
            (
                SELECT_CHECKPOINT_WITH_HISTORY_SQL.replace(
                    "{where}", "WHERE thread_id = %s AND checkpoint_ns = '' AND checkpoint_id = %s"
                ),
                ("thread", "id"),
            ),
            (
                DELTA_HISTORY_SQL,
                {"thread_id": "t", "checkpoint_ns": "", "checkpoint_id": "c", "channels": ["m"]},
            ),
        ],
    )
    for plan in plans:
        chunk_scans = [line for line in plan.splitlines() if "on cp_chunks" in line]
        assert chunk_scans and not any("Seq Scan" in scan for scan in chunk_scans), plan


async def test_prune_and_run_deletes_read_only_their_threads_however_many_others_stored(
    crowded: PostgresConnection,
) -> None:
    threads = ["thread-a", "thread-b"]
    # A long thread's prune: 150 deleted checkpoints of one thread (a per-row array
    # naming it 150 times once made the planner expect that many threads' rows).
    deleted = {
        "thread_ids": ["thread-a"] * 150,
        "threads": ["thread-a"],
        "namespaces": [""] * 150,
        "checkpoint_ids": [f"{n:08x}" for n in range(150)],
        "channel_versions": [Jsonb({"messages": str(n)}) for n in range(150)],
    }
    plans = await _plans(
        crowded,
        [
            (DELETE_ALL_BUT_LATEST_SQL, {"thread_ids": threads}),
            (RUN_THREADS_SQL, {"run_ids": ["run-7"]}),
            (LATE_RUN_THREADS_SQL, {"run_ids": ["run-7"]}),
            (MARK_EMPTIED_SQL, {"thread_ids": threads, "before_id": "1f1"}),
            (DELETE_RUN_CHECKPOINTS_SQL, {"run_ids": ["run-7"], "thread_ids": threads}),
            (DELETE_DEPENDENTS_SQL, deleted),
        ],
    )
    for plan in plans:
        scans = [line for line in plan.splitlines() if "Seq Scan on cp_" in line]
        assert not scans, plan


async def test_retention_reads_only_the_threads_it_deletes_however_many_others_stored(
    crowded: PostgresConnection,
) -> None:
    window = {"now": None, "ttl": 3600, "limit": 50, "spare": ["spared-thread"]}
    plans = await _plans(
        crowded,
        [
            (postgres_retention.EXPIRED_RECORDS_SQL, window),
            (postgres_retention.EXPIRED_CHECKPOINT_ONLY_SQL, window),
            (postgres_retention.EXPIRED_ORPHAN_ARCHIVES_SQL, window),
            (
                postgres_retention.DELETE_THREADS_SQL,
                {"thread_ids": ["thread-a", "thread-b"], "now": None, "before_id": "1f1"},
            ),
            (postgres_retention.EXPIRED_DELETIONS_SQL, window),
        ],
    )
    for plan in plans:
        scans = [line for line in plan.splitlines() if "Seq Scan on" in line]
        assert not scans, plan


async def test_list_pages_with_keyset_pagination(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore
) -> None:
    thread = unique_thread()
    count = LIST_PAGE_SIZE * 2 + 7
    ids = _ids(count)
    async with pg.transaction("seed") as conn, conn.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO cp_checkpoints (thread_id, checkpoint_ns, checkpoint_id, type,"
            " checkpoint, metadata, channel_versions, schema_version)"
            " VALUES (%s, %s, %s, 'msgpack', '\\x00', %s, '{}', 1)",
            [
                (thread, "" if n % 2 else "child", cid, psycopg.types.json.Jsonb({"step": n}))
                for n, cid in enumerate(ids)
            ],
        )

    async def listed(**kwargs: object) -> list[str]:
        arguments: dict[str, object] = {
            "thread_id": thread,
            "checkpoint_ns": None,
            "before": None,
            "limit": None,
            "metadata_filter": None,
            **kwargs,
        }
        return [c.checkpoint_id async for c in checkpoints.list_checkpoints(**arguments)]  # type: ignore[arg-type]

    pg.counters.reset()
    assert await listed() == ids[::-1]
    assert pg.counters.requests == 3  # pages of LIST_PAGE_SIZE, not the whole thread at once
    pg.counters.reset()
    assert await listed(limit=5) == ids[::-1][:5]
    assert pg.counters.requests == 1
    assert await listed(checkpoint_ns="", before=ids[11], limit=3) == [ids[9], ids[7], ids[5]]
    assert await listed(metadata_filter={"step": 42}) == [ids[42]]
    across_threads = await listed(thread_id=None, metadata_filter={"step": 3})
    assert ids[3] in across_threads


async def test_writes_insert_or_upsert(checkpoints: PostgresCheckpointStore) -> None:
    thread = unique_thread()
    (checkpoint_id,) = _ids(1)
    first = [
        StoredWrite("b-task", "p", 1, "x", ("json", b"1")),
        StoredWrite("a-task", "p", 0, "y", ("json", b"2")),
    ]
    await checkpoints.put_writes(thread, "", checkpoint_id, first, upsert=False)
    repeat = [StoredWrite("b-task", "p", 1, "x", ("json", b"changed"))]
    await checkpoints.put_writes(thread, "", checkpoint_id, repeat, upsert=False)
    assert await checkpoints.get_writes(thread, "", checkpoint_id) == first[::-1]
    await checkpoints.put_writes(thread, "", checkpoint_id, repeat, upsert=True)
    assert (await checkpoints.get_writes(thread, "", checkpoint_id))[1] == repeat[0]

    # Repeats inside one call: the first is kept without upsert, the last with it.
    twice = [
        StoredWrite("c-task", "", 0, "z", ("json", b"first")),
        StoredWrite("c-task", "", 0, "z", ("json", b"last")),
    ]
    await checkpoints.put_writes(thread, "", checkpoint_id, twice, upsert=False)
    assert (await checkpoints.get_writes(thread, "", checkpoint_id))[2].value == ("json", b"first")
    await checkpoints.put_writes(thread, "", checkpoint_id, twice, upsert=True)
    assert (await checkpoints.get_writes(thread, "", checkpoint_id))[2].value == ("json", b"last")


async def test_delete_for_runs_and_prune_collect_unused_blobs(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore
) -> None:
    thread = unique_thread()
    first, second, third = _ids(3)
    await checkpoints.put_checkpoint(
        _checkpoint(thread, first, metadata={"run_id": "run-1"}, versions={"a": "1", "b": "1"}),
        [StoredBlob("a", "1", ("json", b"a1")), StoredBlob("b", "1", ("json", b"b1"))],
    )
    await checkpoints.put_writes(
        thread, "", first, [StoredWrite("t", "", 0, "a", ("json", b"w"))], upsert=False
    )
    # The second checkpoint still uses a@1 but has a new b.
    await checkpoints.put_checkpoint(
        _checkpoint(thread, second, metadata={"run_id": "run-2"}, versions={"a": "1", "b": "2"}),
        [StoredBlob("b", "2", ("json", b"b2"))],
    )
    await checkpoints.delete_for_runs(["run-1"])
    assert await checkpoints.get_checkpoint(thread, "", first) is None
    assert await checkpoints.get_writes(thread, "", first) == []
    assert await _blob_versions(pg, thread) == {("a", "1"), ("b", "2")}

    await checkpoints.put_checkpoint(
        _checkpoint(thread, third, metadata={"run_id": "run-3"}, versions={"a": "3", "b": "2"}),
        [StoredBlob("a", "3", ("json", b"a3"))],
    )
    await checkpoints.prune([thread], strategy="keep_latest")
    assert [c.checkpoint_id async for c in _list(checkpoints, thread)] == [third]
    assert await _blob_versions(pg, thread) == {("a", "3"), ("b", "2")}

    await checkpoints.prune([thread], strategy="delete")
    assert [c async for c in _list(checkpoints, thread)] == []
    assert await _blob_versions(pg, thread) == set()


async def test_copy_thread_copies_blobs_and_writes(checkpoints: PostgresCheckpointStore) -> None:
    source, target = unique_thread(), unique_thread()
    (checkpoint_id,) = _ids(1)
    await checkpoints.put_checkpoint(
        _checkpoint(source, checkpoint_id, ns="child:1", versions={"a": 1}),
        [StoredBlob("a", 1, ("json", b"a"))],
    )
    write = StoredWrite("t", "", 0, "a", ("json", b"w"))
    await checkpoints.put_writes(source, "child:1", checkpoint_id, [write], upsert=False)
    await checkpoints.copy_thread(source, target)
    copied = await checkpoints.get_checkpoint(target, "child:1", None)
    assert copied is not None and copied.channel_versions == {"a": 1}
    assert await checkpoints.get_blobs(target, "child:1", {"a": 1}) == {"a": ("json", b"a")}
    assert await checkpoints.get_writes(target, "child:1", checkpoint_id) == [write]
    await checkpoints.delete_thread(source)
    assert await checkpoints.get_checkpoint(source, "child:1", None) is None
    assert await checkpoints.get_checkpoint(target, "child:1", None) is not None


def _batch(thread: str, other: str, ids: list[str]) -> list[FlushOp]:
    """Write-behind work for two threads, interleaved, with every kind of repeat in it."""
    first, second = ids

    def put(
        thread_id: str, checkpoint_id: str, parent: str | None, blobs: list[StoredBlob]
    ) -> CheckpointPut:
        versions = {blob.channel: blob.version for blob in blobs}
        return CheckpointPut(
            _checkpoint(
                thread_id,
                checkpoint_id,
                parent=parent,
                metadata={"step": checkpoint_id},
                versions=versions,
            ),
            blobs,
        )

    def write(idx: int, value: bytes, task: str = "task") -> StoredWrite:
        return StoredWrite(task, "path", idx, "messages", ("json", value))

    return [
        put(
            thread,
            first,
            None,
            [StoredBlob("messages", "1", ("json", b"m1")), StoredBlob("a", 1, ("json", b"a1"))],
        ),
        put(other, first, None, [StoredBlob("messages", "1", ("json", b"other"))]),
        WritesPut(
            thread,
            "",
            first,
            [write(0, b"w0"), write(1, b"w1"), write(0, b"w0 repeated")],
            upsert=False,
        ),
        # A retried put of the same checkpoint: its blob keeps the first value, the row the last.
        put(thread, first, None, [StoredBlob("messages", "1", ("json", b"m1 retried"))]),
        WritesPut(thread, "", first, [write(1, b"w1 replaced")], upsert=True),
        WritesPut(thread, "", first, [write(1, b"w1 ignored")], upsert=False),
        WritesPut(thread, "", first, [write(-1, b"error", task="other-task")], upsert=True),
        WritesPut(
            thread, "", first, [write(-1, b"error replaced", task="other-task")], upsert=True
        ),
        put(thread, second, first, [StoredBlob("messages", "2", ("json", b"m2" * 1000))]),
        WritesPut(other, "", first, [write(0, b"other write")], upsert=False),
    ]


async def _state(checkpoints: PostgresCheckpointStore, thread: str) -> list[tuple[object, ...]]:
    """Everything stored for a thread, with the thread id left out."""
    return [
        (
            c.checkpoint_id,
            c.parent_checkpoint_id,
            c.checkpoint,
            c.metadata,
            c.channel_versions,
            c.blobs,
            c.writes,
            await checkpoints.get_blobs(thread, "", {"messages": "1", "a": 1}),
        )
        async for c in _list(checkpoints, thread)
    ]


async def test_apply_batch_is_one_statement_with_the_effect_of_the_calls_in_order(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore
) -> None:
    ids = _ids(2)
    called, called_other = unique_thread(), unique_thread()
    for op in _batch(called, called_other, ids):
        if isinstance(op, CheckpointPut):
            await checkpoints.put_checkpoint(op.checkpoint, op.blobs)
        else:
            await checkpoints.put_writes(
                op.thread_id, op.checkpoint_ns, op.checkpoint_id, op.writes, upsert=op.upsert
            )
    expected, expected_other = (
        await _state(checkpoints, called),
        await _state(checkpoints, called_other),
    )
    assert expected[1][6] == [
        StoredWrite("other-task", "path", -1, "messages", ("json", b"error replaced")),
        StoredWrite("task", "path", 0, "messages", ("json", b"w0")),
        StoredWrite("task", "path", 1, "messages", ("json", b"w1 replaced")),
    ]
    assert expected[1][7] == {"messages": ("json", b"m1"), "a": ("json", b"a1")}

    batched, batched_other = unique_thread(), unique_thread()
    batch = _batch(batched, batched_other, ids)
    pg.counters.reset()
    await checkpoints.apply_batch(batch)
    assert pg.counters.requests == 1
    assert await _state(checkpoints, batched) == expected
    assert await _state(checkpoints, batched_other) == expected_other

    # Idempotent: applied again, or a prefix first and then all of it, the same state.
    await checkpoints.apply_batch(batch)
    assert await _state(checkpoints, batched) == expected
    replayed, replayed_other = unique_thread(), unique_thread()
    replay = _batch(replayed, replayed_other, ids)
    await checkpoints.apply_batch(replay[:5])
    await checkpoints.apply_batch(replay)
    assert await _state(checkpoints, replayed) == expected
    assert await _state(checkpoints, replayed_other) == expected_other
    await checkpoints.apply_batch([])


@pytest.mark.parametrize("statement_parameters", [None, 20], ids=["one-statement", "several"])
async def test_a_fenced_batch_under_an_older_token_is_refused_whole_even_after_a_delete(
    pg: PostgresConnection,
    checkpoints: PostgresCheckpointStore,
    monkeypatch: pytest.MonkeyPatch,
    statement_parameters: int | None,
) -> None:
    if statement_parameters is not None:
        monkeypatch.setattr(postgres_checkpoints, "MAX_STATEMENT_PARAMETERS", statement_parameters)
    thread = unique_thread()
    ids = _ids(2)
    ops = [op for op in _batch(thread, unique_thread(), ids) if op.thread_id == thread]
    pg.counters.reset()
    await checkpoints.apply_batch(ops[:4], fence=100)
    if statement_parameters is None:
        assert pg.counters.requests == 1  # the fence moves in the batch's own statement
    await checkpoints.apply_batch(ops, fence=100)  # the same holder again: applied
    whole = await _state(checkpoints, thread)
    assert len(whole) == 2

    with pytest.raises(StaleFencingToken) as refused:
        await checkpoints.apply_batch(ops[:1], fence=99)
    assert (refused.value.presented, refused.value.highest) == (99, 100)

    await checkpoints.delete_thread(thread, fence=300)
    with pytest.raises(StaleFencingToken):
        await checkpoints.apply_batch(ops, fence=200)
    assert await _state(checkpoints, thread) == []
    await checkpoints.delete_thread(thread, fence=250)  # a delete never lowers the fence
    with pytest.raises(StaleFencingToken):
        await checkpoints.apply_batch(ops, fence=280)
    await checkpoints.apply_batch(ops, fence=400)
    assert await _state(checkpoints, thread) == whole
    with pytest.raises(ValueError, match="one thread"):
        await checkpoints.apply_batch(_batch(unique_thread(), unique_thread(), ids), fence=500)


async def test_a_late_fenced_batch_waits_for_a_delete_then_is_refused_without_a_deadlock(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore
) -> None:
    """A batch under an older token arriving while `delete_thread` holds the raised fence:
    it waits on the fence row (taken before any checkpoint row), then is refused, so the
    delete never waits on rows the batch locked (a deadlock, one of them aborted)."""
    thread = unique_thread()
    ops = [op for op in _batch(thread, unique_thread(), _ids(2)) if op.thread_id == thread]
    await checkpoints.apply_batch(ops, fence=100)
    async with pg.transaction("delete_thread") as conn:  # what delete_thread(fence=300) runs
        await conn.execute(
            postgres_checkpoints.RAISE_FENCE_SQL, {"thread_id": thread, "token": 300}
        )
        late = asyncio.create_task(checkpoints.apply_batch(ops, fence=100))
        await asyncio.sleep(0.3)
        assert not late.done()  # waiting for the fence row
        await conn.execute(
            postgres_checkpoints.DELETE_THREADS_SQL,
            {"thread_ids": [thread], "mark": True, "before_id": "1f1"},
        )
    with pytest.raises(StaleFencingToken):
        await asyncio.wait_for(late, timeout=5)
    assert await _state(checkpoints, thread) == []


async def test_a_put_is_one_statement_refused_whole_when_its_parent_is_gone_or_spared(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put goes on from a stored parent or none: its check is in its own statement (a
    refusal leaves nothing, its blobs included), even split over several statements."""
    thread = unique_thread()
    first, second, late, forked = _ids(4)
    blob = [StoredBlob("messages", "v2", ("json", b"[2]"))]
    pg.counters.reset()
    await checkpoints.put_checkpoint(_checkpoint(thread, first), [])  # no parent: no check
    await checkpoints.put_checkpoint(
        _checkpoint(thread, second, parent=first, versions={"messages": "v2"}), blob
    )
    assert pg.counters.requests == 2
    async with pg.connection("inspect") as conn:
        await conn.execute(
            "UPDATE cp_checkpoints SET spared = true WHERE thread_id = %s AND checkpoint_id = %s",
            (thread, second),
        )
    # Split to a statement per row, the check still travels with the checkpoint's.
    monkeypatch.setattr(postgres_checkpoints, "MAX_STATEMENT_PARAMETERS", 10)
    for parent in (second, "1f000000-0000-6000-8000-000000000000"):  # spared, never stored
        with pytest.raises(ParentGone) as refused:
            await checkpoints.put_checkpoint(
                _checkpoint(thread, late, parent=parent, versions={"messages": "v3"}),
                [StoredBlob("messages", "v3", ("json", b"[3]"))],
            )
        assert refused.value.parent_checkpoint_id == parent
        assert checkpoints.blocking_available
        # The sync API's own connection runs the same statement.
        with pytest.raises(ParentGone):
            await asyncio.to_thread(
                checkpoints.put_checkpoint_blocking, _checkpoint(thread, late, parent=parent), []
            )
    assert [c.checkpoint_id async for c in _list(checkpoints, thread)] == [second, first]
    assert await _blob_versions(pg, thread) == {("messages", "v2")}
    # A parent its caller vouches for (the write-behind log holds it) is not checked.
    await checkpoints.put_checkpoint(
        _checkpoint(thread, forked, parent="1f000000-0000-6000-8000-000000000000"),
        [],
        parent_vouched=True,
    )
    assert (await _list(checkpoints, thread).__anext__()).checkpoint_id == forked


async def test_a_put_racing_delete_for_runs_waits_for_it_then_is_refused(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore
) -> None:
    """A run's step arriving while `delete_for_runs` deletes the run: it waits for the
    thread's maintenance lock, then finds its parent gone (not the snapshot it started
    with), so the deleted run never comes back as the latest."""
    thread = unique_thread()
    kept, doomed, late = _ids(3)
    run = {"run_id": f"run-{uuid.uuid4().hex[:8]}"}
    await checkpoints.put_checkpoint(_checkpoint(thread, kept), [])
    await checkpoints.put_checkpoint(_checkpoint(thread, doomed, parent=kept, metadata=run), [])
    async with pg.transaction("delete_for_runs") as conn:  # what delete_for_runs runs
        lock = postgres_checkpoints.THREAD_MAINTENANCE_LOCK
        await conn.execute(
            postgres_checkpoints.LOCK_THREADS_SQL, {"lock": lock, "thread_ids": [thread]}
        )
        step = asyncio.create_task(
            checkpoints.put_checkpoint(_checkpoint(thread, late, parent=doomed, metadata=run), [])
        )
        await asyncio.sleep(0.3)
        assert not step.done()  # waiting for the thread's lock
        await conn.execute(
            DELETE_RUN_CHECKPOINTS_SQL, {"run_ids": [run["run_id"]], "thread_ids": [thread]}
        )
    with pytest.raises(ParentGone):
        await asyncio.wait_for(step, timeout=5)
    assert [c.checkpoint_id async for c in _list(checkpoints, thread)] == [kept]


async def test_a_parentless_put_of_a_run_landing_during_its_delete_is_deleted_too(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put with no parent (a subgraph's first step) of the run `delete_for_runs` deletes,
    arriving during the batch's transaction and committed before the call's last look:
    it survived the call (it committed inside the batch, after its delete statement)."""
    thread = unique_thread()
    kept, doomed, late = _ids(3)
    run = {"run_id": f"run-{uuid.uuid4().hex[:8]}"}
    await checkpoints.put_checkpoint(_checkpoint(thread, kept), [])
    await checkpoints.put_checkpoint(_checkpoint(thread, doomed, parent=kept, metadata=run), [])
    delete_dependents = postgres_checkpoints._delete_dependents
    steps: list[asyncio.Task[None]] = []

    async def step_then_delete(conn: Any, deleted: list[dict[str, Any]]) -> None:
        # The batch's delete statement ran: the subgraph's first step arrives.
        if not steps:
            subgraph = _checkpoint(thread, late, ns="child:1", metadata=run)
            steps.append(asyncio.create_task(checkpoints.put_checkpoint(subgraph, [])))
            await asyncio.wait(steps, timeout=0.3)
        await delete_dependents(conn, deleted)

    connection = pg.connection

    @contextlib.asynccontextmanager
    async def once_it_landed(operation: str, **kwargs: Any) -> AsyncIterator[Any]:
        if operation == "delete_for_runs" and steps:  # a look after the batch
            await asyncio.wait_for(steps[0], timeout=5)
        async with connection(operation, **kwargs) as conn:
            yield conn

    monkeypatch.setattr(postgres_checkpoints, "_delete_dependents", step_then_delete)
    monkeypatch.setattr(pg, "connection", once_it_landed)
    assert await checkpoints.delete_for_runs([run["run_id"]]) == {thread}
    await asyncio.wait_for(steps[0], timeout=5)
    stored = [(c.checkpoint_ns, c.checkpoint_id) async for c in _list(checkpoints, thread)]
    assert stored == [("", kept)]


@pytest.mark.parametrize("maintenance", ["delete_thread", "prune"])
async def test_a_put_built_on_the_chunk_memo_held_across_a_delete_names_no_chunk_it_removed(
    pg: PostgresConnection,
    checkpoints: PostgresCheckpointStore,
    monkeypatch: pytest.MonkeyPatch,
    maintenance: str,
) -> None:
    """A put prepared while the chunker remembered its parent's chunks (it sends only the
    chunks its value added), held until the same store's `delete_thread` or prune, which
    forget the memo only before deleting, is done: it names chunks only its parent's value
    reaches. A delete of the whole thread took the parent: the put is refused. A prune
    keeps the parent (the thread's latest), so its chunks too: the put reads back whole,
    by a store that remembers nothing."""
    thread = unique_thread()
    first, parent, late = _ids(3)
    values = [os.urandom(20_000)]
    values += [values[-1] + os.urandom(10_000), values[-1] + os.urandom(20_000)]
    for n, (at, on) in enumerate([(first, None), (parent, first)], start=1):
        await checkpoints.put_checkpoint(
            _checkpoint(thread, at, parent=on, versions={"m": f"v{n}"}),
            [StoredBlob("m", f"v{n}", ("bytes", values[n - 1]))],
        )
    tip = checkpoints._chunker.tip(thread, "")
    assert tip is not None and tip.checkpoint_id == parent  # the late put builds on it
    assert checkpoints._chunker.remembered((thread, "", "m")) is not None
    held, go_on = asyncio.Event(), asyncio.Event()
    connection = pg.connection

    @contextlib.asynccontextmanager
    async def held_put(operation: str, **kwargs: Any) -> AsyncIterator[Any]:
        if operation == "put_checkpoint":  # its statements (and chunk list) are made
            held.set()
            await go_on.wait()
        async with connection(operation, **kwargs) as conn:
            yield conn

    monkeypatch.setattr(pg, "connection", held_put)
    put = asyncio.create_task(
        checkpoints.put_checkpoint(
            _checkpoint(thread, late, parent=parent, versions={"m": "v3"}),
            [StoredBlob("m", "v3", ("bytes", values[2]))],
        )
    )
    await asyncio.wait_for(held.wait(), timeout=5)
    if maintenance == "delete_thread":
        await checkpoints.delete_thread(thread)
    else:
        await checkpoints.prune([thread], strategy="keep_latest")
    go_on.set()
    fresh = PostgresCheckpointStore(pg)
    if maintenance == "delete_thread":
        with pytest.raises(ParentGone):
            await put
        assert await fresh.get_checkpoint(thread, "", None) is None
        return
    await put
    latest = await fresh.get_checkpoint(thread, "", None)
    assert latest is not None and latest.checkpoint_id == late
    assert latest.blobs == {"m": ("bytes", values[2])}


async def test_a_parentless_put_and_writes_landing_inside_delete_thread_stand_as_after_it(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore
) -> None:
    """A put with no parent (which waits for the thread's maintenance lock, `TURN_CTE`) or a
    `put_writes` (which takes no lock) landing inside `delete_thread` (after its delete
    statement, before its commit) leaves what it would after the delete, never a part of
    it: the put whole (its blob too, of a key the delete removed), the writes with the
    thread's mark."""
    thread = unique_thread()
    first, late = _ids(2)
    blob = StoredBlob("messages", "v1", ("json", b"[1]"))
    write = StoredWrite("task", "", 0, "messages", ("json", b"[2]"))
    await checkpoints.put_checkpoint(
        _checkpoint(thread, first, versions={"messages": "v1"}), [blob]
    )
    await checkpoints.put_writes(thread, "", first, [write], upsert=False)
    async with pg.transaction("delete_thread") as conn:  # what delete_thread runs
        lock = postgres_checkpoints.THREAD_MAINTENANCE_LOCK
        await conn.execute(
            postgres_checkpoints.LOCK_THREADS_SQL, {"lock": lock, "thread_ids": [thread]}
        )
        await conn.execute(
            postgres_checkpoints.DELETE_THREADS_SQL,
            {"thread_ids": [thread], "mark": True, "before_id": late},
        )
        await checkpoints.put_writes(
            thread, "", first, [dataclasses.replace(write, task_id="other")], upsert=False
        )  # not blocked: a key the delete did not hold
        step = asyncio.create_task(
            checkpoints.put_checkpoint(
                _checkpoint(thread, late, versions={"messages": "v1"}),
                [StoredBlob("messages", "v1", ("json", b"[3]"))],
            )
        )
        await asyncio.sleep(0.3)
        assert not step.done()  # it waits for the delete's lock
    await asyncio.wait_for(step, timeout=5)
    [stored] = [c async for c in _list(checkpoints, thread)]
    assert (stored.checkpoint_id, stored.blobs) == (late, {"messages": ("json", b"[3]")})
    assert [w.task_id for w in await checkpoints.get_writes(thread, "", first)] == ["other"]
    async with pg.connection("inspect") as conn:
        cursor = await conn.execute(
            "SELECT before_checkpoint_id FROM cp_deleted_threads WHERE thread_id = %s", (thread,)
        )
        assert await cursor.fetchall() == [{"before_checkpoint_id": late}]


class _RolledBack(Exception):
    """Leaves a transaction of a test, rolled back."""


@pytest.mark.parametrize("via", ["delete_thread", "prune"])
async def test_a_put_holding_its_parent_as_delete_thread_runs_is_deleted_with_the_thread(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore, via: str
) -> None:
    """A write-through put that locked its parent row before `delete_thread` (or a prune
    that deletes) began: the delete waits for it, then deletes its checkpoint too, so the
    thread never comes back holding a checkpoint whose parent is gone. The put is held
    after its parent's lock by a blob of the same key another transaction inserted and
    has not committed (its insert waits for that one's outcome)."""
    thread = unique_thread()
    first, late = _ids(2)
    await checkpoints.put_checkpoint(_checkpoint(thread, first), [])
    blob = StoredBlob("messages", "v2", ("json", b"[2]"))
    with pytest.raises(_RolledBack):
        async with pg.transaction("hold") as holder:
            await holder.execute(
                "INSERT INTO cp_blobs (thread_id, checkpoint_ns, channel, version, type, blob,"
                " schema_version) VALUES (%s, '', 'messages', 'v2', 'json', '[0]', 1)",
                (thread,),
            )
            step = asyncio.create_task(
                checkpoints.put_checkpoint(
                    _checkpoint(thread, late, parent=first, versions={"messages": "v2"}), [blob]
                )
            )
            await asyncio.sleep(0.3)
            assert not step.done()  # its parent locked, its blob waiting for the holder
            if via == "prune":
                delete = asyncio.create_task(checkpoints.prune([thread], strategy="delete"))
            else:
                delete = asyncio.create_task(checkpoints.delete_thread(thread))
            await asyncio.sleep(0.3)
            assert not delete.done()  # waiting for the put
            raise _RolledBack
    await asyncio.wait_for(step, timeout=5)
    await asyncio.wait_for(delete, timeout=5)
    assert [c.checkpoint_id async for c in _list(checkpoints, thread)] == []
    assert await _blob_versions(pg, thread) == set()
    # A put after the delete finds its parent gone.
    with pytest.raises(ParentGone):
        await checkpoints.put_checkpoint(_checkpoint(thread, late, parent=first), [])


async def test_a_batch_over_the_parameter_limit_commits_whole_or_not_at_all(
    pg: PostgresConnection,
    checkpoints: PostgresCheckpointStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A limit of 20 parameters puts each row in a statement of its own.
    monkeypatch.setattr(postgres_checkpoints, "MAX_STATEMENT_PARAMETERS", 20)
    thread = unique_thread()
    ids = _ids(2)
    batch = _batch(thread, unique_thread(), ids)
    pg.counters.reset()
    await checkpoints.apply_batch(batch)
    assert pg.counters.requests > 5
    reference = unique_thread()
    monkeypatch.undo()
    await checkpoints.apply_batch(_batch(reference, unique_thread(), ids))
    assert await _state(checkpoints, thread) == await _state(checkpoints, reference)

    # The last statement fails on the server (idx out of integer range): nothing stays.
    monkeypatch.setattr(postgres_checkpoints, "MAX_STATEMENT_PARAMETERS", 20)
    failing = unique_thread()
    bad = WritesPut(
        failing, "", ids[0], [StoredWrite("t", "", 2**40, "c", ("json", b""))], upsert=True
    )
    # Raw or mapped to a typed error, it is the server's refusal of the last statement.
    with pytest.raises((psycopg.DataError, StateError), match="out of range"):
        await checkpoints.apply_batch([*_batch(failing, unique_thread(), ids), bad])
    assert await _state(checkpoints, failing) == []


def _list(checkpoints: PostgresCheckpointStore, thread: str) -> AsyncIterator[StoredCheckpoint]:
    return checkpoints.list_checkpoints(
        thread_id=thread, checkpoint_ns=None, before=None, limit=None, metadata_filter=None
    )


async def test_after_a_server_restart_no_call_sees_the_dead_connections(
    tmp_path: Path,
) -> None:
    """The pool's idle connections all died with the server; each is found closed before
    anything is sent on it and replaced, so no caller gets `BackendUnavailable`."""
    server = PostgresServer(port=free_port(), workdir=tmp_path / "postgres")
    await asyncio.to_thread(server.start)
    settings = Settings(state_cold_backend="postgres", postgres_url=server.url)
    pg = PostgresConnection(settings.postgres)
    try:
        store = PostgresStateStore(pg)
        await store.setup()
        await store.create("t", {"s": 1}, agent_id="a")
        # Fill the pool with several idle connections.
        await asyncio.gather(*(store.get("t") for _ in range(4)))
        # Fast shutdown (SIGINT) cuts every session, as a restart or failover does.
        assert server.pid is not None
        os.kill(server.pid, signal.SIGINT)
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)

        for _ in range(5):
            record = await store.get("t")
            assert record is not None and record.sections == {"s": 1}
    finally:
        await pg.close()
        await asyncio.to_thread(server.stop)
        server.remove_data()


@pytest.mark.parametrize("strategy", ["delete", "keep_latest"])
async def test_a_prune_of_many_threads_at_once_is_not_refused(
    checkpoints: PostgresCheckpointStore, strategy: PruneStrategy
) -> None:
    """A prune of more threads than one transaction may lock (the server's lock table
    holds max_locks_per_transaction per connection): each thread's maintenance lock taken
    in one transaction ran out of shared memory, where the prune alone did not."""
    kept, pruned = unique_thread("kept"), unique_thread("pruned")
    first, second = _ids(2)
    for thread in (kept, pruned):
        await checkpoints.put_checkpoint(_checkpoint(thread, first), [])
    await checkpoints.put_checkpoint(_checkpoint(pruned, second, parent=first), [])
    many = [pruned, *(f"{pruned}-{n}" for n in range(40_000))]
    await checkpoints.prune(many, strategy=strategy)
    left = [c.checkpoint_id async for c in _list(checkpoints, pruned)]
    assert left == ([] if strategy == "delete" else [second])
    assert [c.checkpoint_id async for c in _list(checkpoints, kept)] == [first]


class FewLocksPostgres(PostgresServer):
    """Started with the smallest lock table Postgres allows (max_locks_per_transaction 10,
    not 64): set on the command line, not by ALTER SYSTEM and a restart."""

    def command(self) -> list[str]:
        return [*super().command(), "-c", "max_locks_per_transaction=10"]


@pytest.fixture
async def few_locks_pg(tmp_path: Path) -> AsyncIterator[PostgresConnection]:
    """A server of its own with the smallest lock table: a transaction locking every thread
    overflows it with a fifth of the threads the session server needs (each a row to write
    and delete)."""
    server = FewLocksPostgres(port=free_port(), workdir=tmp_path / "postgres")
    await asyncio.to_thread(server.start)
    with psycopg.connect(server.url, autocommit=True) as admin:
        # The setting the test relies on, checked: a server on the default would pass.
        locks = admin.execute("SHOW max_locks_per_transaction").fetchone()
        assert locks == ("10",), locks
    pg = PostgresConnection(
        Settings(state_cold_backend="postgres", postgres_url=server.url).postgres
    )
    try:
        await pg.setup()
        yield pg
    finally:
        await pg.close()
        await asyncio.to_thread(server.stop)
        server.remove_data()


async def test_delete_for_runs_of_a_run_on_many_threads_is_not_refused(
    few_locks_pg: PostgresConnection,
) -> None:
    """A run with checkpoints on more threads than one transaction may lock (the server's
    lock table holds max_locks_per_transaction per connection): each thread's maintenance
    lock taken in one transaction ran out of shared memory, failing for good."""
    pg = few_locks_pg
    checkpoints = PostgresCheckpointStore(pg)
    run = f"run-{uuid.uuid4().hex[:8]}"
    kept, doomed = _ids(2)
    first = unique_thread("first")
    await checkpoints.put_checkpoint(_checkpoint(first, kept), [])
    await checkpoints.put_checkpoint(
        _checkpoint(first, doomed, parent=kept, metadata={"run_id": run}), []
    )
    many = [f"{first}-{n}" for n in range(8_000)]
    async with pg.connection("seed") as conn:  # one statement: put_checkpoint 40,000 times is slow
        await conn.execute(
            "INSERT INTO cp_checkpoints (thread_id, checkpoint_ns, checkpoint_id, type,"
            " checkpoint, metadata, channel_versions, schema_version)"
            " SELECT thread_id, '', %(id)s, 'msgpack', '', %(metadata)s, '{}', %(version)s"
            " FROM unnest(%(threads)s::text[]) AS thread_id",
            {
                "id": doomed,
                "metadata": Jsonb({"run_id": run}),
                "version": schema.CURRENT["checkpoint"],
                "threads": many,
            },
        )
    assert await checkpoints.delete_for_runs([run]) == {first, *many}
    assert [c.checkpoint_id async for c in _list(checkpoints, first)] == [kept]
    async with pg.connection("inspect") as conn:
        cursor = await conn.execute(
            "SELECT count(*) AS left FROM cp_checkpoints WHERE metadata ->> 'run_id' = %s", (run,)
        )
        assert (await cursor.fetchone())["left"] == 0


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("metadata", [1]),
        ("metadata", "text"),
        ("channel_versions", [1]),
        ("channel_versions", 7),
        ("channel_versions", {"messages": {"v": 2}}),
    ],
    ids=[
        "metadata array",
        "metadata string",
        "versions array",
        "versions number",
        "version object",
    ],
)
async def test_a_damaged_checkpoint_row_is_corrupt_state(
    pg: PostgresConnection, checkpoints: PostgresCheckpointStore, column: str, value: object
) -> None:
    """A JSON column of the wrong shape (a hand edit, a bad migration) reads as damage,
    typed, as a damaged Cosmos document does: not a list as metadata past the port, nor an
    untyped error from the reader."""
    thread = unique_thread()
    [first] = _ids(1)
    blob = [StoredBlob("messages", "v2", ("json", b"[2]"))]
    await checkpoints.put_checkpoint(_checkpoint(thread, first, versions={"messages": "v2"}), blob)
    async with pg.connection("inspect") as conn:
        await conn.execute(
            f"UPDATE cp_checkpoints SET {column} = %s WHERE thread_id = %s",
            (Jsonb(value), thread),
        )
    with pytest.raises(CorruptState):
        await checkpoints.get_checkpoint(thread, "", first)
    with pytest.raises(CorruptState):
        await checkpoints.get_checkpoint(thread, "", None)
    with pytest.raises(CorruptState):
        [c async for c in _list(checkpoints, thread)]
