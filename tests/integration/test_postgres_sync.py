"""The sync API with no hot tier, on Postgres signed in through POSTGRES_URL
(`TieredCheckpointSaver.open_sync`): reads and writes run on the caller's own thread,
through a blocking pool, with the same results and guarantees as the async API."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from langgraph.checkpoint.base import empty_checkpoint

from devstack import PostgresServer, free_port
from state.checkpoint import TieredCheckpointSaver
from state.cold import chunks
from state.cold.circuit import OPEN_SECONDS
from state.cold.postgres_client import PostgresConnection
from state.cold.postgres_store import PostgresStateStore
from state.errors import BackendClosed, BackendUnavailable, SaverClosed, StaleFencingToken
from state.settings import Settings
from tests.chat_graph import CHECKPOINTS_PER_INVOKE, chat_graph
from tests.integration.test_write_behind_sync import config, in_thread, loop_thread_held

# Over the chunking threshold: stored as a manifest and chunks, assembled on read.
LARGE = "a" * 20_000


@pytest.fixture
def settings(stack_env: dict[str, str]) -> Settings:
    return Settings.model_validate(
        {"state_cold_backend": "postgres", "postgres_url": stack_env["POSTGRES_URL"]}
    )


@pytest.fixture
def saver(settings: Settings) -> Iterator[TieredCheckpointSaver]:
    with TieredCheckpointSaver.open_sync(settings) as opened:
        yield opened


def test_sync_calls_do_not_wait_for_the_loop_thread(saver: TieredCheckpointSaver) -> None:
    """With the loop thread stuck, a put of a large value, its writes, reads of the latest
    and of a named checkpoint, and a whole run all complete: none of them hands over to
    it. What they stored reads back the same through the async API."""
    base = config()
    thread_id = base["configurable"]["thread_id"]
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"messages": [LARGE]}
    checkpoint["channel_versions"] = {"messages": saver.get_next_version(None, None)}
    run = config()
    with loop_thread_held(saver):
        stored = in_thread(
            lambda: saver.put(
                base, checkpoint, {"source": "input", "step": -1}, checkpoint["channel_versions"]
            ),
            timeout=10,
        )
        in_thread(lambda: saver.put_writes(stored, [("messages", ["b"])], "task-1"), timeout=10)
        latest = in_thread(lambda: saver.get_tuple(config(thread_id)), timeout=10)
        named = in_thread(lambda: saver.get_tuple(stored), timeout=10)
        in_thread(lambda: chat_graph(saver).invoke({"messages": ["hello"]}, run), timeout=20)

    assert latest is not None and named is not None
    assert latest.checkpoint["id"] == named.checkpoint["id"] == checkpoint["id"]
    assert latest.checkpoint["channel_values"]["messages"] == [LARGE]
    assert latest.pending_writes == named.pending_writes == [("task-1", "messages", ["b"])]
    through_loop = saver._sync(saver.aget_tuple(config(thread_id)))
    assert through_loop is not None
    assert through_loop.checkpoint == latest.checkpoint
    assert through_loop.pending_writes == latest.pending_writes
    history = list(saver.list(run))
    assert len(history) == CHECKPOINTS_PER_INVOKE
    assert len(history[0].checkpoint["channel_values"]["messages"]) == 5


def test_a_missing_thread_reads_as_none(saver: TieredCheckpointSaver) -> None:
    assert saver.get_tuple(config()) is None


def test_a_stale_fencing_token_is_refused_on_the_blocking_path(
    saver: TieredCheckpointSaver, settings: Settings
) -> None:
    """A fenced sync write is checked against the thread's record (its fence is 8)."""
    thread_id = f"pgs-{uuid.uuid4().hex[:12]}"

    async def fenced_record() -> None:
        connection = PostgresConnection(settings.postgres)
        try:
            records = PostgresStateStore(connection)
            await records.create(thread_id, {"run": {}}, agent_id="sync-test")
            await records.update_section(
                thread_id, "run", {}, expected_version=1, agent_id="sync-test", fencing_token=8
            )
        finally:
            await connection.close()

    asyncio.run(fenced_record())
    graph = chat_graph(saver)
    with pytest.raises(StaleFencingToken) as refused:
        graph.invoke({"messages": ["late"]}, config(thread_id, fencing_token=7))
    assert (refused.value.presented, refused.value.highest) == (7, 8)
    assert saver.get_tuple(config(thread_id)) is None
    graph.invoke({"messages": ["current"]}, config(thread_id, fencing_token=8))
    latest = saver.get_tuple(config(thread_id))
    assert latest is not None
    assert latest.checkpoint["channel_values"]["messages"][0] == "current"


def test_while_postgres_restarts_sync_calls_fail_typed_then_recover(tmp_path: Path) -> None:
    """Every pooled connection is cut (a fast shutdown): a sync call made while the server
    is down raises `BackendUnavailable` within the pool's timeout, never hangs, and once
    it is back the blocking pool reconnects and what was written before is all there."""
    server = PostgresServer(port=free_port(), workdir=tmp_path / "postgres")
    server.start()
    try:
        settings = Settings.model_validate(
            {
                "state_cold_backend": "postgres",
                "postgres_url": server.url,
                "postgres_pool_timeout_seconds": 2,
            }
        )
        with TieredCheckpointSaver.open_sync(settings) as saver:
            graph = chat_graph(saver)
            before = config()
            graph.invoke({"messages": ["before"]}, before)
            assert server.process is not None
            server.process.send_signal(signal.SIGINT)  # fast shutdown: sessions cut at once
            server.process.wait(30)
            server.stop()
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                saver.get_tuple(before)
            assert time.monotonic() - started < 10
            server.start()
            found = None
            for _ in range(50):  # a connection the cut left in the pool fails once
                try:
                    found = saver.get_tuple(before)
                    break
                except BackendUnavailable:
                    time.sleep(0.1)
            assert found is not None
            assert found.checkpoint["channel_values"]["messages"][0] == "before"
            after = config()
            graph.invoke({"messages": ["after"]}, after)
            assert saver.get_tuple(after) is not None
    finally:
        server.stop()
        server.remove_data()


def test_a_sync_call_the_saver_closes_under_fails_and_reopens_nothing(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put held on its way to Postgres while the `open_sync` block ends: released, it
    raises `SaverClosed`, stores nothing, and leaves no session of this saver's on the
    server (no pool opened again after the close, for nobody to close)."""
    name = f"closing-{uuid.uuid4().hex[:8]}"
    base = stack_env["POSTGRES_URL"]
    url = f"{base}{'&' if '?' in base else '?'}application_name={name}"
    settings = Settings.model_validate({"state_cold_backend": "postgres", "postgres_url": url})
    arrived, release = threading.Event(), threading.Event()
    held_thread: list[threading.Thread] = []
    original = PostgresConnection.blocking_connection

    @contextmanager
    def held(self: PostgresConnection, operation: str) -> Iterator[object]:
        if threading.current_thread() in held_thread:
            arrived.set()
            release.wait(10)
        with original(self, operation) as conn:
            yield conn

    monkeypatch.setattr(PostgresConnection, "blocking_connection", held)
    outcome: list[BaseException | object] = []
    late = config()
    with TieredCheckpointSaver.open_sync(settings) as saver:
        chat_graph(saver).invoke({"messages": ["before"]}, config())  # the pool is open
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"messages": ["late"]}
        checkpoint["channel_versions"] = {"messages": saver.get_next_version(None, None)}

        def put_late() -> None:
            try:
                outcome.append(
                    saver.put(
                        late,
                        checkpoint,
                        {"source": "input", "step": -1},
                        checkpoint["channel_versions"],
                    )
                )
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=put_late, daemon=True)
        held_thread.append(worker)
        worker.start()
        assert arrived.wait(10)
    release.set()
    worker.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], SaverClosed), outcome

    def sessions() -> int:
        with psycopg.connect(base, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
            ).fetchone()
        assert row is not None
        return int(row[0])

    deadline = time.monotonic() + 5
    while sessions() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sessions() == 0
    with TieredCheckpointSaver.open_sync(settings) as reopened:
        assert reopened.get_tuple(late) is None


async def test_a_closed_connection_opens_no_pool_again(settings: Settings) -> None:
    """After `close`, both APIs refuse with `BackendClosed` instead of opening a new pool."""
    connection = PostgresConnection(settings.postgres)
    async with connection.connection("probe") as conn:
        await conn.execute("SELECT 1")
    with connection.blocking_connection("probe") as blocking:
        blocking.execute("SELECT 1")
    await connection.close()
    with pytest.raises(BackendClosed):
        async with connection.connection("probe"):
            pass
    with pytest.raises(BackendClosed), connection.blocking_connection("probe"):
        pass


def _signal_all(postmaster: int, signum: int) -> None:
    """`signum` to the postmaster and its children (each backend runs in a process group
    of its own, so a group signal would miss them)."""
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    for pid in [postmaster, *map(int, children)]:
        os.kill(pid, signum)


def test_a_paused_server_fails_a_sync_call_in_time_then_recovers(tmp_path: Path) -> None:
    """Every Postgres process SIGSTOPped (connections acknowledged, nothing answered): a
    sync write raises `BackendUnavailable` a second past the operation timeout instead of
    waiting for ever, the next call fails at once, and once the server runs again the
    saver carries on."""
    server = PostgresServer(port=free_port(), workdir=tmp_path / "postgres")
    server.start()
    assert server.process is not None
    paused = False
    try:
        settings = Settings.model_validate(
            {
                "state_cold_backend": "postgres",
                "postgres_url": server.url,
                "postgres_operation_timeout_seconds": 2,
                "postgres_pool_timeout_seconds": 2,
            }
        )
        with TieredCheckpointSaver.open_sync(settings) as saver:
            graph = chat_graph(saver)
            graph.invoke({"messages": ["before"]}, config())
            _signal_all(server.process.pid, signal.SIGSTOP)
            paused = True
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                in_thread(lambda: graph.invoke({"messages": ["paused"]}, config()), timeout=30)
            assert time.monotonic() - started < 10
            _signal_all(server.process.pid, signal.SIGCONT)
            paused = False
            # Meanwhile the process does not wait on it again (`AnswerCircuit`).
            with pytest.raises(BackendUnavailable, match="answered nothing lately"):
                graph.invoke({"messages": ["refused"]}, config())
            time.sleep(OPEN_SECONDS)
            after = config()
            graph.invoke({"messages": ["after"]}, after)
            found = saver.get_tuple(after)
            assert found is not None
            assert found.checkpoint["channel_values"]["messages"][0] == "after"
    finally:
        if paused:
            _signal_all(server.process.pid, signal.SIGCONT)
        server.stop()
        server.remove_data()


def test_the_blocking_pool_keeps_the_options_of_the_url(stack_env: dict[str, str]) -> None:
    """POSTGRES_URL selecting a schema (`options=-c search_path=...`): the sync API's pool
    adds its statement timeout to those options, so both APIs work in that schema."""
    schema = f"sync_{uuid.uuid4().hex[:8]}"
    base = stack_env["POSTGRES_URL"]
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{base}{'&' if '?' in base else '?'}options=-c%20search_path%3D{schema}"
    settings = Settings.model_validate({"state_cold_backend": "postgres", "postgres_url": url})
    try:
        with TieredCheckpointSaver.open_sync(settings) as saver:
            thread = config()
            chat_graph(saver).invoke({"messages": ["hello"]}, thread)
            through_loop = saver._sync(saver.aget_tuple(thread))
            assert through_loop is not None, "the sync API wrote outside the URL's schema"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_sync_callers_on_many_threads_share_the_stores_memos(
    saver: TieredCheckpointSaver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twelve threads put and read large values at once while the chunker evicts what it
    remembers (a small budget): its memos, shared by every caller's thread, stay whole
    (no KeyError, no OrderedDict mutated during iteration)."""
    monkeypatch.setattr(chunks, "REMEMBER_BYTES", 200_000)
    errors: list[BaseException] = []

    def worker() -> None:
        parent = config()
        thread_id = parent["configurable"]["thread_id"]
        try:
            for step in range(150):
                checkpoint = empty_checkpoint()
                checkpoint["channel_values"] = {"messages": [os.urandom(12_000).hex()]}
                checkpoint["channel_versions"] = {
                    "messages": saver.get_next_version(None, None) + str(step)
                }
                parent = saver.put(
                    parent,
                    checkpoint,
                    {"source": "loop", "step": step},
                    checkpoint["channel_versions"],
                )
                assert saver.get_tuple(config(thread_id)) is not None
        except BaseException as exc:
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # thread switches as often as they can come
    try:
        threads = [threading.Thread(target=worker) for _ in range(12)]
        for started in threads:
            started.start()
        for started in threads:
            started.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, [repr(error) for error in errors[:5]]
