"""Write-behind entries the cold store refuses for good, on real servers: the flusher names
and records them once, a boundary fails at once naming the entry, health reports them, and
an operator's discard drops the entry with what depends on it so the rest of the thread
drains."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.base.id import uuid6
from typer.testing import CliRunner

from agent_state_cli.cli import app
from devstack import RedisServer, free_port
from state.checkpoint.flusher import DISCARD_READS, Flusher
from state.cold.postgres_checkpoints import PostgresCheckpointStore
from state.errors import (
    BackendUnavailable,
    DiscardOutpaced,
    EntryStuck,
    LockLost,
    NotStuck,
    RequestRejected,
    StateTooLarge,
)
from state.hot.redis_client import hot_key
from state.ports import (
    CheckpointPut,
    CheckpointStore,
    FlushOp,
    StoredCheckpoint,
    StoredWrite,
    StuckEntry,
    WritesPut,
)
from state.settings import Settings
from support_cases.runtime import Runtime
from support_cases.settings import AppSettings
from tests.chat_graph import chat_graph
from tests.integration.test_stack_cli_faults import CLI, PYTHONPATH
from tests.integration.test_write_behind import (
    COLD_BACKENDS,
    LOG_ENTRY_DAMAGES,
    WriteBehind,
    _HeldBack,
    another_workers_flusher,
    cold_latest_id,
    config,
    invoked_once,
    log_key,
    open_write_behind,
    settings_for,
)


@pytest.fixture(params=COLD_BACKENDS)
async def tiers(
    request: pytest.FixtureRequest, stack_env: dict[str, str], tmp_path: Path
) -> AsyncIterator[WriteBehind]:
    # A Redis of its own: the stuck record is shared by every thread of a cold store, and
    # must hold this test's entries only.
    server = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    server.start()
    try:
        async with open_write_behind(settings_for(stack_env, request.param, server.url)) as opened:
            yield opened
    finally:
        server.stop()


def unstorable(backend: str, max_item_bytes: int) -> str:
    """Metadata the cold store refuses for good: a NUL character jsonb cannot hold; on
    Cosmos, more than an item holds (what an older write-behind put, before the pre-check,
    could log)."""
    return "nul\x00" if backend == "postgres" else "x" * (max_item_bytes + 1)


MAX_ITEM_BYTES = Settings.model_fields["state_max_item_bytes"].default


@dataclass
class Poisoned:
    thread_id: str
    stored: str  # the last checkpoint the cold store can take
    refused: str  # the checkpoint it refuses
    child: str  # a checkpoint on the refused one


async def poisoned(
    saver: BaseCheckpointSaver[Any],
    flusher: Flusher,
    store: CheckpointStore,
    note: str | None = None,
    run_id: str | None = None,
) -> Poisoned:
    """A thread whose log holds, in order: a run's entries, a put the cold store refuses,
    writes to it, a put on it, then writes to the last stored checkpoint (which do not
    depend on the refused one). The refused put bypasses the saver's pre-check, as an
    entry logged by code from before a check was added. `note`: its metadata's note, one
    the store takes (the refusal is then a test's `Refusing` store's), not one it refuses.
    `run_id`: the run's, which the refused put and the put on it carry too."""
    graph = chat_graph(saver)
    cfg = config() if run_id is None else config(run_id=run_id)
    thread_id = cfg["configurable"]["thread_id"]
    await graph.ainvoke({"messages": ["hello"]}, cfg, durability="async")
    logged = await flusher.log.read(thread_id, count=1000)
    last = [entry.op for entry in logged if isinstance(entry.op, CheckpointPut)][-1]
    backend = "postgres" if isinstance(store, PostgresCheckpointStore) else "cosmos"
    refused = dataclasses.replace(
        last.checkpoint,
        checkpoint_id=str(uuid6()),
        parent_checkpoint_id=last.checkpoint.checkpoint_id,
        metadata={
            **last.checkpoint.metadata,
            "note": unstorable(backend, MAX_ITEM_BYTES) if note is None else note,
        },
    )
    child: StoredCheckpoint = dataclasses.replace(
        last.checkpoint, checkpoint_id=str(uuid6()), parent_checkpoint_id=refused.checkpoint_id
    )
    log = flusher.log
    await log.append_put(refused, last.blobs, fence=None)
    write = StoredWrite("task-1", "", 0, "messages", ("json", b'"later"'))
    await log.append_writes(thread_id, "", refused.checkpoint_id, [write], upsert=False, fence=None)
    await log.append_put(child, last.blobs, fence=None)
    await log.append_writes(
        thread_id,
        "",
        last.checkpoint.checkpoint_id,
        [dataclasses.replace(write, task_id="task-2")],
        upsert=False,
        fence=None,
    )
    return Poisoned(
        thread_id, last.checkpoint.checkpoint_id, refused.checkpoint_id, child.checkpoint_id
    )


async def test_a_refused_entry_is_named_recorded_once_and_a_boundary_fails_at_once(
    tiers: WriteBehind, caplog: pytest.LogCaptureFixture
) -> None:
    thread = await poisoned(tiers.saver, tiers.flusher, tiers.store)
    entries = await tiers.flusher.log.read(thread.thread_id, count=1000)
    refused_entry = next(
        entry.entry_id
        for entry in entries
        if isinstance(entry.op, CheckpointPut)
        and entry.op.checkpoint.checkpoint_id == thread.refused
    )
    caplog.set_level(logging.WARNING, logger="state.checkpoint.flusher")

    with pytest.raises(EntryStuck) as stuck:
        await tiers.saver.aflush(thread.thread_id)
    assert (stuck.value.thread_id, stuck.value.entry_id, stuck.value.checkpoint_id) == (
        thread.thread_id,
        refused_entry,
        thread.refused,
    )
    # What the cold store could take before it is stored; nothing after it.
    assert await cold_latest_id(tiers, thread.thread_id) == thread.stored
    assert len(await tiers.flusher.log.read(thread.thread_id, count=1000)) == 4

    # Recorded in Redis, without a TTL, for health and the operator.
    [recorded] = await tiers.flusher.stuck()
    assert (recorded.thread_id, recorded.entry_id, recorded.checkpoint_id, recorded.kind) == (
        thread.thread_id,
        refused_entry,
        thread.refused,
        "put",
    )
    assert recorded.reason.split(":")[0] in {"InvalidValue", "StateTooLarge"}
    assert recorded.since > 0
    stuck_keys = [key async for key in tiers.redis.scan_iter("*:stuck")]
    assert [await tiers.redis.ttl(key) for key in stuck_keys] == [-1]
    backlog = await tiers.flusher.backlog()
    assert backlog.stuck_threads == 1
    assert backlog.oldest_stuck == recorded

    # Warned about once, whatever passes and flushers come after.
    await tiers.flusher.drain()
    other = Flusher(tiers.flusher.log, tiers.store, lock_ttl_ms=2_000)
    with pytest.raises(EntryStuck):
        await other.flush_thread(thread.thread_id)
    await other.drain()
    warned = [r for r in caplog.records if refused_entry in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert thread.thread_id in warned[0].getMessage()
    assert thread.refused in warned[0].getMessage()


async def test_discarding_a_stuck_entry_drops_what_depends_on_it_and_the_rest_drains(
    tiers: WriteBehind, caplog: pytest.LogCaptureFixture
) -> None:
    thread = await poisoned(tiers.saver, tiers.flusher, tiers.store)
    with pytest.raises(EntryStuck) as stuck:
        await tiers.flusher.flush_thread(thread.thread_id)
    entry_id = stuck.value.entry_id
    with pytest.raises(NotStuck):
        await tiers.flusher.discard_stuck(thread.thread_id, "0-1")
    caplog.set_level(logging.WARNING, logger="state.checkpoint.flusher")

    dropped = await tiers.flusher.discard_stuck(thread.thread_id, entry_id)

    # The refused put, the writes to it and the put on it: the cold store never receives a
    # checkpoint whose parent it does not hold. The writes to the stored checkpoint stay.
    described = [
        (type(entry.op).__name__, entry.op.checkpoint.checkpoint_id)
        if isinstance(entry.op, CheckpointPut)
        else (type(entry.op).__name__, entry.op.checkpoint_id)
        for entry in dropped
    ]
    assert described == [
        ("CheckpointPut", thread.refused),
        ("WritesPut", thread.refused),
        ("CheckpointPut", thread.child),
    ]
    for entry in dropped:
        assert any(entry.entry_id in r.getMessage() for r in caplog.records), entry.entry_id
    assert await tiers.flusher.stuck() == []
    [left] = await tiers.flusher.log.read(thread.thread_id, count=1000)
    assert isinstance(left.op, WritesPut) and left.op.checkpoint_id == thread.stored

    await tiers.saver.aflush(thread.thread_id)  # a boundary succeeds again
    assert not await tiers.flusher.log.pending(thread.thread_id)
    assert (await tiers.flusher.backlog()).stuck_threads == 0
    assert await cold_latest_id(tiers, thread.thread_id) == thread.stored
    for gone in (thread.refused, thread.child):
        assert await tiers.store.get_checkpoint(thread.thread_id, "", gone) is None
    # The run goes on from what is stored, with the later writes: nothing cached names a
    # dropped checkpoint.
    latest = await tiers.saver.aget_tuple(config(thread.thread_id))
    assert latest is not None
    assert latest.config["configurable"]["checkpoint_id"] == thread.stored
    assert ("task-2", "messages", "later") in (latest.pending_writes or [])


async def test_health_reports_stuck_threads_and_is_degraded(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    server = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    server.start()
    try:
        settings = AppSettings.model_validate(
            {
                "state_cold_backend": "postgres",
                "postgres_url": stack_env["POSTGRES_URL"],
                "redis_url": server.url,
                "state_write_mode": "write-behind",
            }
        )
        runtime = await Runtime.open(settings)
        try:
            assert (await runtime.service.health()).status == "ok"
            flusher = runtime.backends.flusher
            assert flusher is not None
            thread = await poisoned(runtime.saver, flusher, runtime.backends.checkpoints)
            with pytest.raises(EntryStuck) as stuck:
                await flusher.flush_thread(thread.thread_id)

            health = await runtime.service.health()
            assert health.status == "degraded"
            assert health.backlog is not None and health.backlog.stuck_threads == 1
            oldest = health.backlog.oldest_stuck
            assert oldest is not None
            assert (oldest.thread_id, oldest.entry_id, oldest.checkpoint_id) == (
                thread.thread_id,
                stuck.value.entry_id,
                thread.refused,
            )
            assert oldest.reason.startswith("InvalidValue")

            await flusher.discard_stuck(thread.thread_id, stuck.value.entry_id)
            await flusher.flush_thread(thread.thread_id)
            health = await runtime.service.health()
            assert health.status == "ok"
            assert health.backlog is not None and health.backlog.stuck_threads == 0
        finally:
            await runtime.close()
    finally:
        server.stop()


async def test_the_cli_lists_stuck_entries_and_discards_one_with_its_dependents(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    server = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    server.start()
    env = {
        "COLUMNS": "200",
        "STATE_COLD_BACKEND": "postgres",
        "POSTGRES_URL": stack_env["POSTGRES_URL"],
        "REDIS_URL": server.url,
        "STATE_WRITE_MODE": "write-behind",
    }

    async def cli(*args: str) -> tuple[int, str, str]:
        result = await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)
        return result.exit_code, result.output, result.stdout

    try:
        async with open_write_behind(settings_for(stack_env, "postgres", server.url)) as tiers:
            thread = await poisoned(tiers.saver, tiers.flusher, tiers.store)
            with pytest.raises(EntryStuck) as stuck:
                await tiers.flusher.flush_thread(thread.thread_id)
            entry_id = stuck.value.entry_id

            code, output, stdout = await cli("write-behind", "stuck", "--json")
            assert code == 0, output
            [listed] = json.loads(stdout)
            assert (listed["thread_id"], listed["entry_id"], listed["checkpoint_id"]) == (
                thread.thread_id,
                entry_id,
                thread.refused,
            )
            assert listed["reason"].startswith("InvalidValue")

            # Not confirmed: nothing discarded.
            code, output, _ = await cli("write-behind", "discard", thread.thread_id, entry_id)
            assert code == 1, output
            assert len(await tiers.flusher.log.read(thread.thread_id, count=1000)) == 4
            code, output, _ = await cli("write-behind", "discard", thread.thread_id, "0-1", "--yes")
            assert code == 1 and "is not stuck" in output, output

            code, output, _ = await cli(
                "write-behind", "discard", thread.thread_id, entry_id, "--yes"
            )
            assert code == 0, output
            assert "discarded 3 write-behind entries" in output
            for checkpoint_id in (thread.refused, thread.child):
                assert checkpoint_id in output
            assert "2 later entries referred to a discarded checkpoint" in output
            assert not await tiers.flusher.log.pending(thread.thread_id)
            assert await cold_latest_id(tiers, thread.thread_id) == thread.stored
            code, output, stdout = await cli("write-behind", "stuck", "--json")
            assert code == 0 and json.loads(stdout) == [], output
    finally:
        server.stop()


async def test_a_worker_flushes_a_thread_again_once_another_process_discarded_its_stuck_entry(
    tiers: WriteBehind,
) -> None:
    # The worker's background pass finds the thread stuck, and leaves it for a while.
    thread = await poisoned(tiers.saver, tiers.flusher, tiers.store)
    await tiers.flusher.drain()  # the run's entries before the refused put are stored
    [stuck] = await tiers.flusher.stuck()
    # The operator's CLI, another process (a flusher of its own), discards it and flushes.
    cli = Flusher(tiers.flusher.log, tiers.store, lock_ttl_ms=2_000)
    await cli.discard_stuck(thread.thread_id, stuck.entry_id)
    await cli.flush_thread(thread.thread_id)
    assert not await tiers.flusher.log.pending(thread.thread_id)

    # The run goes on: its next entry is the worker's to flush in the background, not left
    # in Redis until the stuck thread's retry delay ends.
    write = StoredWrite("task-3", "", 0, "messages", ("json", b'"after"'))
    await tiers.flusher.log.append_writes(
        thread.thread_id, "", thread.stored, [write], upsert=False, fence=None
    )
    assert await tiers.flusher.drain() == 1
    assert not await tiers.flusher.log.pending(thread.thread_id)


async def test_a_drop_by_a_discard_whose_lock_was_taken_over_removes_nothing(
    tiers: WriteBehind,
) -> None:
    """A discard paused past its lock (between its lease check and the drop) while another
    flusher took the thread: the drop is refused in the same step as it would remove, so it
    never reports entries as dropped that the new holder may have stored meanwhile."""
    thread = await poisoned(tiers.saver, tiers.flusher, tiers.store)
    entries = await tiers.flusher.log.read(thread.thread_id, count=1000)
    newest = await tiers.flusher.log.newest(thread.thread_id)
    holder = await tiers.flusher.log.lock_thread(thread.thread_id, ttl_ms=10_000)
    assert holder is not None
    try:
        with pytest.raises(LockLost):
            await tiers.flusher.log.drop_entries(
                thread.thread_id,
                [entry.entry_id for entry in entries],
                newest=newest,
                lock_token=f"{holder}0",  # a token the lock no longer holds
            )
    finally:
        await tiers.flusher.log.unlock_thread(thread.thread_id, holder)
    after = await tiers.flusher.log.read(thread.thread_id, count=1000)
    assert [entry.entry_id for entry in after] == [entry.entry_id for entry in entries]
    await tiers.flusher.delete_thread(thread.thread_id)


async def test_a_stuck_entry_reported_after_its_thread_was_unlisted_is_not_recorded(
    tiers: WriteBehind,
) -> None:
    """A flusher past its lock, paused, reports the refusal after another process discarded
    the entry and the thread left the listing: nothing would ever clear that record (no
    flush takes the thread again), so it is not kept, and health does not stay degraded."""
    thread = await poisoned(tiers.saver, tiers.flusher, tiers.store)
    entries = await tiers.flusher.log.read(thread.thread_id, count=1000)
    refused = next(
        entry
        for entry in entries
        if isinstance(entry.op, CheckpointPut)
        and entry.op.checkpoint.checkpoint_id == thread.refused
    )
    newest = await tiers.flusher.log.newest(thread.thread_id)
    token = await tiers.flusher.log.lock_thread(thread.thread_id, ttl_ms=10_000)
    assert token is not None
    await tiers.flusher.log.drop_entries(
        thread.thread_id, [entry.entry_id for entry in entries], newest=newest, lock_token=token
    )
    await tiers.flusher.log.unlock_thread(thread.thread_id, token)
    late = StuckEntry(
        thread_id=thread.thread_id,
        entry_id=refused.entry_id,
        checkpoint_ns="",
        checkpoint_id=thread.refused,
        kind="put",
        reason="InvalidValue: reported late",
        since=0.0,
    )
    assert not await tiers.flusher.log.note_stuck(late)
    assert await tiers.flusher.stuck() == []
    assert (await tiers.flusher.backlog()).stuck_threads == 0


async def test_a_rollback_of_runs_a_stuck_backlog_goes_on_from_names_the_stuck_entry(
    tiers: WriteBehind,
) -> None:
    """A rollback (deleting a run's checkpoints) of a case whose backlog is held back by a
    stuck entry is refused as that entry (the API's EntryStuck answer, for an operator to
    act on), not as the generic outage a client would only retry."""
    run = f"run-{uuid6()}"
    thread = await poisoned(tiers.saver, tiers.flusher, tiers.store, run_id=run)
    with pytest.raises(EntryStuck) as stuck:
        await tiers.flusher.flush_thread(thread.thread_id)

    with pytest.raises(EntryStuck) as refused:
        await tiers.saver.adelete_for_runs([run])

    assert (refused.value.thread_id, refused.value.entry_id, refused.value.checkpoint_id) == (
        thread.thread_id,
        stuck.value.entry_id,
        thread.refused,
    )
    assert await cold_latest_id(tiers, thread.thread_id) == thread.stored  # nothing deleted
    await tiers.flusher.delete_thread(thread.thread_id)


@LOG_ENTRY_DAMAGES
async def test_a_damaged_log_entry_is_recorded_stuck_and_an_operator_can_discard_it(
    tiers: WriteBehind, damage: dict[bytes, bytes]
) -> None:
    """An entry that cannot be read back holds its thread back for good, as one the cold
    store refuses: it is recorded stuck (reason: damaged), so health and the CLI show it and
    a boundary names it, and a discard drops it with what depends on it."""
    _, _, thread_id, _ = await invoked_once(tiers)
    key = log_key(tiers, thread_id)
    logged = await tiers.redis.xrange(key)
    at = max(
        i
        for i, (_, fields) in enumerate(logged)
        if fields[b"op"] == b"put" and any(name.startswith(b"b:") for name in fields)
    )
    head = json.loads(logged[at][1][b"head"])
    await tiers.redis.delete(key)
    ids = []
    for i, (_, fields) in enumerate(logged):
        if i == at:
            fields = {
                name: next((v for prefix, v in damage.items() if name.startswith(prefix)), value)
                for name, value in fields.items()
            }
        ids.append((await tiers.redis.xadd(key, fields)).decode())

    await tiers.flusher.drain()

    [stuck] = await tiers.flusher.stuck()
    assert (stuck.thread_id, stuck.entry_id, stuck.kind) == (thread_id, ids[at], "put")
    assert stuck.checkpoint_id == ("" if b"head" in damage else head["id"])
    assert stuck.reason.startswith("damaged: ")
    assert (await tiers.flusher.backlog()).stuck_threads == 1
    assert await cold_latest_id(tiers, thread_id) == head["parent"]  # those before it
    with pytest.raises(EntryStuck) as boundary:
        await tiers.saver.aflush(thread_id)
    assert boundary.value.entry_id == ids[at]

    dropped = await tiers.flusher.discard_stuck(thread_id, ids[at])

    assert dropped[0].entry_id == ids[at]
    # (The saver would say the checkpoints it appended were lost: they were discarded.)
    await tiers.flusher.flush_thread(thread_id)
    assert not await tiers.flusher.log.pending(thread_id)
    assert await tiers.flusher.stuck() == []
    assert await cold_latest_id(tiers, thread_id) == head["parent"]


async def test_a_run_appending_while_a_discard_runs_goes_on_and_nothing_lands_on_a_dropped_step(
    tiers: WriteBehind,
) -> None:
    """An operator's discard must not tell a live run its thread is gone (`ThreadExpiring`,
    the API's 410): the run's steps appended meanwhile are kept when they build on what
    stays, and dropped with the stuck entry when they build on a dropped checkpoint."""
    thread = await poisoned(tiers.saver, tiers.flusher, tiers.store)
    with pytest.raises(EntryStuck) as stuck:
        await tiers.flusher.flush_thread(thread.thread_id)
    log = tiers.flusher.log
    read = log.read
    kept = StoredWrite("task-4", "", 0, "messages", ("json", b'"meanwhile"'))
    on_dropped = StoredWrite("task-5", "", 0, "messages", ("json", b'"lost"'))

    async def read_as_a_run_appends(thread_id: str, **options: Any) -> list[Any]:
        entries = await read(thread_id, **options)
        if thread_id == thread.thread_id and not kept_appended:
            kept_appended.append(True)
            await log.append_writes(thread_id, "", thread.stored, [kept], upsert=False, fence=None)
            await log.append_writes(
                thread_id, "", thread.child, [on_dropped], upsert=False, fence=None
            )
        return entries

    kept_appended: list[bool] = []
    log.read = read_as_a_run_appends  # type: ignore[method-assign]
    try:
        dropped = await tiers.flusher.discard_stuck(thread.thread_id, stuck.value.entry_id)
    finally:
        log.read = read  # type: ignore[method-assign]

    assert kept_appended
    assert dropped[0].entry_id == stuck.value.entry_id
    assert any(
        isinstance(entry.op, WritesPut) and entry.op.checkpoint_id == thread.child
        for entry in dropped
    )
    await tiers.flusher.flush_thread(thread.thread_id)
    assert not await log.pending(thread.thread_id)
    assert await tiers.store.get_checkpoint(thread.thread_id, "", thread.child) is None
    latest = await tiers.saver.aget_tuple(config(thread.thread_id))
    assert latest is not None
    assert latest.config["configurable"]["checkpoint_id"] == thread.stored
    assert ("task-4", "messages", "meanwhile") in (latest.pending_writes or [])


async def test_a_discard_that_appends_keep_outpacing_says_so_and_leaves_the_entry_stuck(
    tiers: WriteBehind,
) -> None:
    """A run appending to the thread between each of the discard's reads and its drop: the
    discard gives up, nothing dropped, saying why (not that Redis is unavailable: it
    answered every call), and goes through once the run pauses."""
    thread = await poisoned(tiers.saver, tiers.flusher, tiers.store)
    with pytest.raises(EntryStuck) as stuck:
        await tiers.flusher.flush_thread(thread.thread_id)
    log = tiers.flusher.log
    read = log.read
    appended: list[str] = []

    async def read_as_a_run_appends(thread_id: str, **options: Any) -> list[Any]:
        entries = await read(thread_id, **options)
        if thread_id == thread.thread_id:
            write = StoredWrite(f"task-{len(appended)}", "", 0, "messages", ("json", b'"x"'))
            await log.append_writes(thread_id, "", thread.stored, [write], upsert=False, fence=None)
            appended.append(write.task_id)
        return entries

    log.read = read_as_a_run_appends  # type: ignore[method-assign]
    try:
        with pytest.raises(DiscardOutpaced) as outpaced:
            await tiers.flusher.discard_stuck(thread.thread_id, stuck.value.entry_id)
    finally:
        log.read = read  # type: ignore[method-assign]

    assert len(appended) == DISCARD_READS
    assert not isinstance(outpaced.value, BackendUnavailable)
    assert "unavailable" not in str(outpaced.value)
    assert outpaced.value.entry_id == stuck.value.entry_id
    assert [entry.entry_id for entry in await tiers.flusher.stuck()] == [stuck.value.entry_id]
    dropped = await tiers.flusher.discard_stuck(thread.thread_id, stuck.value.entry_id)
    assert dropped[0].entry_id == stuck.value.entry_id
    await tiers.flusher.flush_thread(thread.thread_id)
    assert not await log.pending(thread.thread_id)


class Refusing:
    """The cold store, refusing for good every batch holding a put of `checkpoint_id` (a
    cause an operator can fix: a permission, a limit)."""

    def __init__(self, store: CheckpointStore, checkpoint_id: str) -> None:
        self.store = store
        self.checkpoint_id = checkpoint_id

    async def apply_batch(self, ops: Sequence[FlushOp], *, fence: int | None = None) -> None:
        if any(
            isinstance(op, CheckpointPut) and op.checkpoint.checkpoint_id == self.checkpoint_id
            for op in ops
        ):
            raise RequestRejected("cold", "refused for the test")
        await self.store.apply_batch(ops, fence=fence)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_a_discard_fences_off_a_flusher_paused_past_its_lock_with_the_entry_in_its_batch(
    tiers: WriteBehind,
) -> None:
    """Another worker's flusher holds the stuck entry and what depends on it in a batch on its
    way to the cold tier (the refusal's cause fixed meanwhile), and its lock lapses; the
    operator's discard takes the lock and drops them. The late batch must not store the
    discarded checkpoints after the discard: it is refused by the cold fence, as after a
    delete, and that flusher goes on with what is left."""
    thread = await poisoned(tiers.saver, tiers.flusher, tiers.store, note="fixable")
    refusing = Refusing(tiers.store, thread.refused)
    first = Flusher(tiers.flusher.log, refusing, lock_ttl_ms=2_000)  # type: ignore[arg-type]
    with pytest.raises(EntryStuck) as stuck:
        await first.flush_thread(thread.thread_id)

    held_back = _HeldBack(tiers.store)
    paused = another_workers_flusher(tiers, held_back)
    late = asyncio.create_task(paused.flush_thread(thread.thread_id))
    await held_back.reached.wait()
    # Its lock lapses (evicted, or it was paused past its TTL).
    await tiers.redis.delete(
        hot_key(thread.thread_id, "wb-flushing", namespace=tiers.cache.namespace)
    )
    dropped = await tiers.flusher.discard_stuck(thread.thread_id, stuck.value.entry_id)
    assert len(dropped) == 3
    held_back.go.set()
    await asyncio.wait_for(late, timeout=30)

    for gone in (thread.refused, thread.child):
        assert await tiers.store.get_checkpoint(thread.thread_id, "", gone) is None
    assert await cold_latest_id(tiers, thread.thread_id) == thread.stored
    assert not await tiers.flusher.log.pending(thread.thread_id)


class PastDeadline:
    """The cold store, whose refusal of a batch of several entries comes back only once
    `deadline` (a `time.monotonic()` time) has passed (a slow store, a long batch)."""

    def __init__(self, store: CheckpointStore, deadline: float) -> None:
        self.store = store
        self.deadline = deadline
        self.applied: list[int] = []  # the size of each batch sent

    async def apply_batch(self, ops: Sequence[FlushOp], *, fence: int | None = None) -> None:
        self.applied.append(len(ops))
        try:
            await self.store.apply_batch(ops, fence=fence)
        except (RequestRejected, StateTooLarge):
            if len(ops) > 1:
                await asyncio.sleep(max(0.0, self.deadline - time.monotonic()))
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_applying_a_refused_batch_one_entry_at_a_time_stops_at_the_drains_deadline(
    tiers: WriteBehind,
) -> None:
    """The timer's pass must end before the next tick: past its deadline, the fallback that
    applies a refused batch entry by entry leaves the rest in the log, as the batch path
    does, rather than go on with up to a batch's worth of single cold requests."""
    thread = await poisoned(tiers.saver, tiers.flusher, tiers.store)
    logged = len(await tiers.flusher.log.read(thread.thread_id, count=1000))
    slow = PastDeadline(tiers.store, time.monotonic() + 1.0)
    flusher = Flusher(tiers.flusher.log, slow, lock_ttl_ms=5_000)  # type: ignore[arg-type]

    applied = await flusher.drain(deadline=slow.deadline)

    # The batch, then one entry (a pass applies at least one step past the deadline).
    assert slow.applied == [logged, 1]
    assert applied == 1
    assert len(await tiers.flusher.log.read(thread.thread_id, count=1000)) == logged - 1
    assert await tiers.flusher.stuck() == []  # not reached yet: the next pass's to find
    await tiers.flusher.delete_thread(thread.thread_id)


def test_the_cli_names_a_malformed_cosmos_key_in_one_line(stack_env: dict[str, str]) -> None:
    """A key cut short (not base64) used to end `write-behind stuck` in the SDK's
    `binascii.Error: Incorrect padding` traceback, at the first signed request."""
    malformed = stack_env["COSMOS_KEY"][:-3]
    env = {
        "COLUMNS": "200",
        "STATE_COLD_BACKEND": "cosmos",
        "COSMOS_ENDPOINT": stack_env["COSMOS_ENDPOINT"],
        "COSMOS_KEY": malformed,
        "REDIS_URL": stack_env["REDIS_URL"],
        "STATE_WRITE_MODE": "write-behind",
    }
    result = CliRunner().invoke(app, ["write-behind", "stuck"], env=env)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("COSMOS_KEY is not a Cosmos account key"), line
    assert malformed not in result.output


def test_the_cli_run_in_process_leaves_the_logger_levels_as_they_were(
    stack_env: dict[str, str],
) -> None:
    """Found by review: `write-behind stuck` quieted the clients' loggers (and the
    flusher's) for the whole process: a program running it in-process lost their warnings
    for good, after a command that succeeded too."""
    names = ("azure", "psycopg", "state.checkpoint.flusher")
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    env = {
        "COLUMNS": "200",
        "STATE_COLD_BACKEND": "cosmos",
        "COSMOS_ENDPOINT": stack_env["COSMOS_ENDPOINT"],
        "COSMOS_KEY": stack_env["COSMOS_KEY"],
        "COSMOS_CREATE_IF_MISSING": "true",
        "REDIS_URL": stack_env["REDIS_URL"],
        "STATE_WRITE_MODE": "write-behind",
    }
    mine = [logging.NOTSET, logging.INFO, logging.WARNING]
    try:
        for logger, level in zip(loggers, mine, strict=True):
            logger.setLevel(level)
        result = CliRunner().invoke(app, ["write-behind", "stuck", "--json"], env=env)
        assert result.exit_code == 0, result.output
        assert [logger.level for logger in loggers] == mine
    finally:
        for logger, level in zip(loggers, before, strict=True):
            logger.setLevel(level)


async def test_a_rollback_is_refused_while_a_damaged_entry_past_a_stuck_one_may_hold_its_runs(
    tiers: WriteBehind,
) -> None:
    """A backlog held back by a stuck entry, with a damaged entry later in it (a put of the
    runs rolled back, but unreadable): the rollback cannot tell it does not hold the runs'
    checkpoints, which would land after the deletion once the operator discards the stuck
    one. It is refused, as a backlog it can read and that holds one is, not answered done
    on the strength of the entries before the damaged one."""
    run = f"run-{uuid6()}"
    thread = await poisoned(tiers.saver, tiers.flusher, tiers.store)
    with pytest.raises(EntryStuck) as stuck:
        await tiers.flusher.flush_thread(thread.thread_id)
    key = log_key(tiers, thread.thread_id)
    _, fields = next(
        (entry_id, fields)
        for entry_id, fields in reversed(await tiers.redis.xrange(key))
        if fields[b"op"] == b"put" and any(name.startswith(b"b:") for name in fields)
    )
    head = json.loads(fields[b"head"])
    head.update(id=str(uuid6()), metadata={**head["metadata"], "run_id": run})
    damaged = {
        name: b"\x00\x00" if name.startswith(b"b:") else value for name, value in fields.items()
    }
    await tiers.redis.xadd(key, {**damaged, b"head": json.dumps(head).encode()})

    with pytest.raises(EntryStuck) as refused:
        await tiers.saver.adelete_for_runs([run])

    assert refused.value.entry_id == stuck.value.entry_id
    await tiers.flusher.delete_thread(thread.thread_id)


async def test_a_discard_drops_the_dependents_past_a_damaged_entry_after_the_stuck_one(
    tiers: WriteBehind,
) -> None:
    """A read of the log stops short of a damaged entry: a discard must read on past it, or
    the put on the dropped checkpoint beyond it stays, and once the damaged entry is gone
    the cold store receives a checkpoint whose parent it never held."""
    thread = await poisoned(tiers.saver, tiers.flusher, tiers.store)
    with pytest.raises(EntryStuck) as stuck:
        await tiers.flusher.flush_thread(thread.thread_id)
    key = log_key(tiers, thread.thread_id)
    logged = await tiers.redis.xrange(key)
    at = [entry_id.decode() for entry_id, _ in logged].index(stuck.value.entry_id) + 1
    await tiers.redis.delete(key)
    for i, (entry_id, fields) in enumerate(logged):
        if i == at:  # the writes to the refused checkpoint: one of them cut short
            assert fields[b"op"] == b"writes"
            fields = {n: b"\x00" if n.startswith(b"w:") else v for n, v in fields.items()}
        await tiers.redis.xadd(key, fields, id=entry_id)

    dropped = await tiers.flusher.discard_stuck(thread.thread_id, stuck.value.entry_id)

    assert [entry.entry_id for entry in dropped] == [
        entry_id.decode() for entry_id, _ in logged[at - 1 : at + 2]
    ]
    await tiers.flusher.flush_thread(thread.thread_id)
    assert not await tiers.flusher.log.pending(thread.thread_id)
    assert await cold_latest_id(tiers, thread.thread_id) == thread.stored
    assert await tiers.store.get_checkpoint(thread.thread_id, "", thread.child) is None


def test_the_cli_says_redis_is_unavailable_in_one_line(stack_env: dict[str, str]) -> None:
    """Run as a user runs it (its own process: logging as it is outside pytest), with Redis
    out of reach: one line, not the flusher's closing drain warning before it."""
    env = {
        **os.environ,
        "PYTHONPATH": PYTHONPATH,
        "COLUMNS": "200",
        "STATE_COLD_BACKEND": "cosmos",
        "COSMOS_ENDPOINT": stack_env["COSMOS_ENDPOINT"],
        "COSMOS_KEY": stack_env["COSMOS_KEY"],
        "COSMOS_CREATE_IF_MISSING": "true",
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "STATE_WRITE_MODE": "write-behind",
    }
    result = subprocess.run(
        [*CLI, "write-behind", "stuck"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("redis unavailable"), result.stderr


@pytest.mark.parametrize(
    "damage",
    [{"metadata": 5}, {"versions": ["messages"]}, {"versions": {"messages": None}}, {"id": 5}],
    ids=["metadata-not-an-object", "versions-not-an-object", "a-version-null", "id-not-a-string"],
)
async def test_a_log_entry_whose_head_holds_a_field_of_the_wrong_type_is_recorded_stuck(
    tiers: WriteBehind, damage: dict[str, Any]
) -> None:
    """A put's head that is an object but holds a field of the wrong type (damaged in Redis)
    is a damaged entry as any other: recorded stuck, holding back its thread only. It failed
    the cold store's packing with an untyped error instead: the whole drain pass raised (its
    later threads never reached), nothing was recorded, and a boundary raised a TypeError."""
    _, _, thread_id, _ = await invoked_once(tiers)
    _, _, healthy, hot = await invoked_once(tiers)
    key = log_key(tiers, thread_id)
    logged = await tiers.redis.xrange(key)
    at = next(i for i, (_, fields) in enumerate(logged) if fields[b"op"] == b"put")
    await tiers.redis.delete(key)
    ids = []
    for i, (_, fields) in enumerate(logged):
        if i == at:
            head = {**json.loads(fields[b"head"]), **damage}
            fields = {**fields, b"head": json.dumps(head).encode()}
        ids.append((await tiers.redis.xadd(key, fields)).decode())

    await tiers.flusher.drain()

    assert await cold_latest_id(tiers, healthy) == hot.config["configurable"]["checkpoint_id"]
    [stuck] = await tiers.flusher.stuck()
    assert (stuck.thread_id, stuck.entry_id, stuck.kind) == (thread_id, ids[at], "put")
    assert stuck.reason.startswith("damaged: ")
    assert await tiers.redis.xlen(key) == len(logged) - at
    with pytest.raises(EntryStuck) as boundary:
        await tiers.saver.aflush(thread_id)
    assert boundary.value.entry_id == ids[at]
    await tiers.flusher.discard_stuck(thread_id, ids[at])
    await tiers.flusher.flush_thread(thread_id)
    assert await tiers.flusher.stuck() == []


async def test_a_thread_listed_again_after_its_flush_is_not_counted_twice_in_the_backlog(
    tiers: WriteBehind,
) -> None:
    """A flush unlists a thread whose log it emptied, and finds an entry landed in between
    (the append's own listing, its second command, not run yet): it lists the thread again.
    The entry is counted by its append; the relisting counted it once more, and the backlog
    stayed one entry high for as long as any thread was listed (on a busy store, for good)."""
    _, _, other, _ = await invoked_once(tiers)  # keeps the listing from emptying
    _, _, thread_id, _ = await invoked_once(tiers)
    log = tiers.flusher.log
    key = log_key(tiers, thread_id)
    late = next(fields for _, fields in await tiers.redis.xrange(key) if fields[b"op"] == b"writes")
    settle = log.settle

    async def late_append_first(thread: str, marker: float) -> bool:
        await tiers.redis.xadd(key, late)  # the append's script: its listing comes after
        return await settle(thread, marker)

    log.settle = late_append_first  # type: ignore[method-assign]
    try:
        await tiers.flusher.flush_thread(thread_id)
    finally:
        del log.settle
    await log._run("dirty", [log._dirty, log._since, log._entries], [thread_id, 1])

    backlog = await tiers.flusher.backlog()
    assert backlog.threads == 2
    assert backlog.entries == await tiers.redis.xlen(log_key(tiers, other)) + 1
    await tiers.flusher.flush_thread(thread_id)
    await tiers.flusher.flush_thread(other)
    assert (await tiers.flusher.backlog()).entries == 0


async def test_a_thread_listed_again_as_the_only_one_keeps_its_entry_counted(
    tiers: WriteBehind,
) -> None:
    """As above, on a cluster (the listing and the log on different nodes): the late
    append's listing lands before the flush reads its marker, its entry after the flush read
    the log. The settle then unlists the only listed thread and zeroes the count, the
    append's with it: the relisting must count the entry again, or the backlog reads one
    thread of no entries for as long as any thread is listed."""
    _, _, thread_id, _ = await invoked_once(tiers)
    log = tiers.flusher.log
    key = log_key(tiers, thread_id)
    late = next(fields for _, fields in await tiers.redis.xrange(key) if fields[b"op"] == b"writes")
    marker, settle = log.marker, log.settle

    async def late_listing_first(thread: str) -> float | None:
        # The append's second command, counting its entry, before its first.
        await log._run("dirty", [log._dirty, log._since, log._entries], [thread, 1])
        return await marker(thread)

    async def late_entry_first(thread: str, listed: float) -> bool:
        await tiers.redis.xadd(key, late)
        return await settle(thread, listed)

    log.marker = late_listing_first  # type: ignore[method-assign]
    log.settle = late_entry_first  # type: ignore[method-assign]
    try:
        await tiers.flusher.flush_thread(thread_id)
    finally:
        del log.marker, log.settle

    backlog = await tiers.flusher.backlog()
    assert (backlog.threads, backlog.entries) == (1, 1)
    await tiers.flusher.flush_thread(thread_id)
    assert (await tiers.flusher.backlog()).entries == 0
