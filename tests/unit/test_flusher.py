"""The write-behind `Flusher` over the in-memory fakes of its ports: drain order, the per-thread
flush lock and its lease, failures that leave work in the log, in milliseconds.

The fakes keep the ports' contracts (tests/contract runs the same cases on them and on
the real servers), so what these tests prove is the flusher's own logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import pytest

from state.checkpoint import flusher as flusher_module
from state.checkpoint.flusher import Flusher
from state.errors import BackendUnavailable, EntryStuck, StateTooLarge, UnsupportedSchemaVersion
from state.ports import (
    Backlog,
    CheckpointPut,
    FlushOp,
    LogEntry,
    StoredBlob,
    StoredCheckpoint,
    StoredWrite,
    WritesPut,
)
from tests.support.fakes import MemoryCheckpointCache, MemoryCheckpointStore, MemoryWriteBehindLog

# Short, so a lease that is not renewed runs out within a test; long enough that a loop
# held up by a loaded machine (CI's two workers and their servers) still renews in time
# (at 60 ms, one renewal missed by 40 ms failed a run).
LOCK_TTL_MS = 240


def checkpoint(thread_id: str, n: int) -> StoredCheckpoint:
    return StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns="",
        checkpoint_id=f"{n:04}",
        parent_checkpoint_id=f"{n - 1:04}" if n > 1 else None,
        checkpoint=("json", b"{}"),
        metadata={"step": n},
        channel_versions={"chat": n},
    )


async def append(log: MemoryWriteBehindLog, thread_id: str, steps: int) -> None:
    """`steps` checkpoints of the thread, each with one pending write."""
    for n in range(1, steps + 1):
        await log.append_put(
            checkpoint(thread_id, n), [StoredBlob("chat", n, ("json", b"%d" % n))], fence=None
        )
        write = StoredWrite("task", "", 0, "chat", ("json", b"w%d" % n))
        await log.append_writes(thread_id, "", f"{n:04}", [write], upsert=False, fence=None)


async def stored_ids(store: MemoryCheckpointStore, thread_id: str) -> list[str]:
    found = store.list_checkpoints(
        thread_id=thread_id, checkpoint_ns="", before=None, limit=None, metadata_filter=None
    )
    return [c.checkpoint_id async for c in found]


class RecordingStore(MemoryCheckpointStore):
    """Records every batch it applies; `fail` makes the next ones raise as a cold outage."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[FlushOp]] = []
        self.fail = False
        self.pause: asyncio.Event | None = None

    async def apply_batch(self, ops: Sequence[FlushOp], *, fence: int | None = None) -> None:
        if self.fail:
            raise BackendUnavailable("memory", "cold tier down (test)")
        if self.pause is not None:
            await self.pause.wait()
        await super().apply_batch(ops, fence=fence)
        self.batches.append(list(ops))


@pytest.fixture
def log() -> MemoryWriteBehindLog:
    return MemoryWriteBehindLog(MemoryCheckpointCache())


@pytest.fixture
def store() -> RecordingStore:
    return RecordingStore()


@pytest.fixture
def flusher(log: MemoryWriteBehindLog, store: RecordingStore) -> Flusher:
    return Flusher(log, store, lock_ttl_ms=LOCK_TTL_MS)


async def test_a_drain_applies_every_thread_in_order_and_empties_the_backlog(
    log: MemoryWriteBehindLog, store: RecordingStore, flusher: Flusher
) -> None:
    for thread in ("a", "b", "c"):
        await append(log, thread, 3)
    assert (await log.backlog()).entries == 18
    assert await flusher.drain() == 18
    assert flusher.flushed_entries == 18
    for thread in ("a", "b", "c"):
        assert await stored_ids(store, thread) == ["0003", "0002", "0001"]
        applied = [op for batch in store.batches for op in batch if _thread(op) == thread]
        assert [_position(op) for op in applied] == [
            ("put", 1), ("writes", 1), ("put", 2), ("writes", 2), ("put", 3), ("writes", 3)
        ]  # fmt: skip
    assert await log.backlog() == Backlog(0, 0, None)
    assert await flusher.drain() == 0


async def test_batches_are_bounded_and_each_is_acknowledged_before_the_next(
    log: MemoryWriteBehindLog,
    store: RecordingStore,
    flusher: Flusher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flusher_module, "BATCH_ENTRIES", 4)
    await append(log, "a", 5)
    assert await flusher.flush_thread("a") == 10
    assert [len(batch) for batch in store.batches] == [4, 4, 2]
    assert not await log.pending("a")


async def test_a_drain_leaves_a_thread_another_flusher_holds(
    log: MemoryWriteBehindLog, store: RecordingStore, flusher: Flusher
) -> None:
    await append(log, "held", 1)
    await append(log, "free", 1)
    token = await log.lock_thread("held", ttl_ms=10_000)
    assert token is not None
    assert await flusher.drain() == 2
    assert await log.pending("held") and not await log.pending("free")
    await log.unlock_thread("held", token)
    assert await flusher.drain() == 2
    assert not await log.pending("held")


async def test_a_boundary_waits_for_the_lock_and_then_flushes_everything(
    log: MemoryWriteBehindLog, store: RecordingStore, flusher: Flusher
) -> None:
    await append(log, "a", 2)
    token = await log.lock_thread("a", ttl_ms=10_000)
    assert token is not None
    boundary = asyncio.create_task(flusher.flush_thread("a"))
    await asyncio.sleep(0.03)
    assert not boundary.done() and store.batches == []
    await log.unlock_thread("a", token)
    assert await boundary == 4
    assert await stored_ids(store, "a") == ["0002", "0001"]


async def test_a_holder_keeps_its_lock_past_the_ttl_by_renewing_it(
    log: MemoryWriteBehindLog, store: RecordingStore, flusher: Flusher
) -> None:
    await append(log, "a", 1)
    store.pause = asyncio.Event()
    flushing = asyncio.create_task(flusher.flush_thread("a"))
    await asyncio.sleep(3 * LOCK_TTL_MS / 1000)  # three TTLs inside one batch
    assert await log.lock_thread("a", ttl_ms=10_000) is None  # still the flusher's
    store.pause.set()
    assert await flushing == 2


async def test_a_renewer_that_fails_unexpectedly_is_reported_by_the_flusher(
    log: MemoryWriteBehindLog,
    store: RecordingStore,
    flusher: Flusher,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(*_args: Any, **_kwargs: Any) -> bool:
        raise RuntimeError("renewal bug")

    await append(log, "a", 1)
    monkeypatch.setattr(log, "renew_thread_lock", broken)
    store.pause = asyncio.Event()
    flushing = asyncio.create_task(flusher.flush_thread("a"))
    await asyncio.sleep(LOCK_TTL_MS / 1000)  # past the renewer's first turn
    store.pause.set()
    with caplog.at_level(logging.ERROR), contextlib.suppress(Exception):
        await flushing
    reported = [r for r in caplog.records if r.name == flusher_module.__name__ and r.exc_info]
    assert [str(r.exc_info[1]) for r in reported if r.exc_info] == ["renewal bug"]


async def test_a_lease_lost_mid_flush_is_taken_again_and_the_flush_finishes(
    log: MemoryWriteBehindLog,
    store: RecordingStore,
    flusher: Flusher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flusher_module, "BATCH_ENTRIES", 2)
    await append(log, "a", 2)
    store.pause = asyncio.Event()
    flushing = asyncio.create_task(flusher.flush_thread("a"))
    await asyncio.sleep(0.01)
    # Redis out of reach for longer than the TTL: the renewals fail, the lease runs out.
    log.outage.down = True
    await asyncio.sleep(3 * LOCK_TTL_MS / 1000)
    log.outage.down = False
    store.pause.set()
    await flushing
    assert log.requests["lock_thread"] == 2  # lost once, taken again
    assert await stored_ids(store, "a") == ["0002", "0001"]
    assert not await log.pending("a")


async def test_a_flusher_paused_past_its_lock_applies_nothing_the_next_holder_has(
    log: MemoryWriteBehindLog, store: RecordingStore, flusher: Flusher
) -> None:
    """Its process stalls (a long GC, a frozen VM) between reading entries and applying
    them, longer than the lock's TTL, so its renewer never ran: another flusher has taken
    the thread meanwhile. Back, it must not apply what it read."""
    await append(log, "a", 2)
    read = log.read
    taken: list[str | None] = []

    async def stalled_read(thread_id: str, *, count: int) -> list[LogEntry]:
        entries = await read(thread_id, count=count)
        time.sleep(2 * LOCK_TTL_MS / 1000)  # noqa: ASYNC251 (the whole process stops)
        taken.append(await log.lock_thread(thread_id, ttl_ms=60_000))
        return entries

    log.read = stalled_read  # type: ignore[method-assign]
    assert await flusher.drain() == 0
    assert taken[0] is not None  # the other flusher's
    assert store.batches == []
    assert await log.pending("a")


async def test_a_failing_cold_tier_leaves_the_work_in_the_log_for_the_next_pass(
    log: MemoryWriteBehindLog, store: RecordingStore, flusher: Flusher
) -> None:
    await append(log, "a", 2)
    store.fail = True
    assert await flusher.drain() == 0
    assert (await log.backlog()).entries == 4
    with pytest.raises(BackendUnavailable):
        await flusher.flush_thread("a")
    store.fail = False
    assert await flusher.drain() == 4
    assert (await log.backlog()).entries == 0


async def test_a_pass_that_finds_the_cold_tier_out_stops_at_its_first_page(
    log: MemoryWriteBehindLog, store: RecordingStore, flusher: Flusher
) -> None:
    """Every other thread would fail the same way: a pass trying thousands of them (a
    backlog piling up while runs go on) would only load Redis and the logs."""
    threads = [f"t{n:03}" for n in range(3 * flusher_module.LISTED_THREADS)]
    for thread in threads:
        await append(log, thread, 1)
    store.fail = True
    tried: list[str] = []
    lock_thread = log.lock_thread

    async def counted(thread_id: str, *, ttl_ms: int) -> int | None:
        tried.append(thread_id)
        return await lock_thread(thread_id, ttl_ms=ttl_ms)

    log.lock_thread = counted  # type: ignore[method-assign]
    assert await flusher.drain() == 0
    assert len(tried) <= flusher_module.LISTED_THREADS
    store.fail = False
    assert await flusher.drain() == 2 * len(threads)


async def test_the_background_pass_backs_off_while_the_cold_tier_is_out(
    log: MemoryWriteBehindLog,
    store: RecordingStore,
    flusher: Flusher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs appending on (each append wakes the flusher) do not make it retry the cold tier
    back to back: passes space out, and the backlog drains once the cold tier is back."""
    monkeypatch.setattr(flusher_module, "WAKE_DELAY_SECONDS", 0.01)
    monkeypatch.setattr(flusher_module, "WAKE_DELAY_MAX_SECONDS", 0.02)
    monkeypatch.setattr(flusher_module, "COLD_OUT_BACKOFF_SECONDS", 0.2)
    monkeypatch.setattr(flusher_module, "COLD_OUT_BACKOFF_MAX_SECONDS", 0.4)
    passes = 0  # a pass tries the lone thread once
    lock_thread = log.lock_thread

    async def counted(thread_id: str, *, ttl_ms: int) -> int | None:
        nonlocal passes
        passes += 1
        return await lock_thread(thread_id, ttl_ms=ttl_ms)

    monkeypatch.setattr(log, "lock_thread", counted)
    await append(log, "a", 1)
    store.fail = True
    flusher.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            flusher.notify("a")
            await asyncio.sleep(0.005)
        # Back to back, the passes numbered 47 here; spaced out (0.2 s, 0.4 s, 0.4 s...
        # apart), at most 4.
        assert 1 <= passes <= 4
        store.fail = False
        for _ in range(100):
            if not await log.pending("a"):
                break
            await asyncio.sleep(0.01)
        assert not await log.pending("a")
    finally:
        await flusher.close(final_drain_seconds=1)


async def test_threads_no_flusher_can_take_never_hide_the_ones_behind_them(
    log: MemoryWriteBehindLog, flusher: Flusher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More stuck threads than a pass lists (say, entries of a newer format after a
    rollback) stay the oldest: a drain looks past them to the threads it can flush."""
    stuck = [f"stuck-{n:02}" for n in range(flusher_module.LISTED_THREADS + 3)]
    for thread in stuck:
        await append(log, thread, 1)
    await append(log, "fine", 2)
    read = log.read

    async def refusing(thread_id: str, *, count: int) -> list[LogEntry]:
        if thread_id.startswith("stuck-"):
            raise UnsupportedSchemaVersion("write-behind entry", 9, 3)
        return await read(thread_id, count=count)

    monkeypatch.setattr(log, "read", refusing)
    assert await flusher.drain() == 4
    assert not await log.pending("fine")
    assert all([await log.pending(thread) for thread in stuck])


async def test_the_background_task_drains_after_an_append_and_close_leaves_nothing(
    log: MemoryWriteBehindLog, store: RecordingStore, flusher: Flusher
) -> None:
    flusher.start()
    try:
        await append(log, "a", 1)
        flusher.notify("a")
        for _ in range(50):  # well before the idle poll (1 s): the notify woke it
            if not await log.pending("a"):
                break
            await asyncio.sleep(0.01)
        assert await stored_ids(store, "a") == ["0001"]
        await append(log, "b", 1)  # no notify: close's last drain takes it
    finally:
        await flusher.close(final_drain_seconds=1)
    assert (await log.backlog()).entries == 0


async def test_the_background_pass_leaves_another_workers_thread_to_it_until_it_lingers(
    log: MemoryWriteBehindLog,
    store: RecordingStore,
    flusher: Flusher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each worker's flusher takes what its own worker appended; another worker's thread
    only once it stayed listed (its worker died): a thread that hopped between workers mid-run
    would cost each store its chunks again."""
    monkeypatch.setattr(flusher_module, "ADOPT_AFTER_SECONDS", 1.5)
    other = Flusher(log, store, lock_ttl_ms=LOCK_TTL_MS)
    await append(log, "mine", 1)
    await append(log, "theirs", 1)
    flusher.notify("mine")
    other.notify("theirs")
    flusher.start()
    try:
        for _ in range(50):
            if not await log.pending("mine"):
                break
            await asyncio.sleep(0.01)
        assert not await log.pending("mine")
        assert await log.pending("theirs")  # its worker (`other`) never flushes: it died
        # Flushed empty, "mine" is no longer this worker's: its next run may be another's.
        await append(log, "mine", 1)
        other.notify("mine")
        await asyncio.sleep(flusher_module.POLL_SECONDS + 0.1)
        assert await log.pending("mine")
        await asyncio.sleep(1.5 + 2 * flusher_module.POLL_SECONDS)
        assert not await log.pending("theirs") and not await log.pending("mine")
    finally:
        await flusher.close(final_drain_seconds=1)
    # A pass that adopts at once (the timer's, close's) takes any thread.
    await append(log, "theirs", 2)
    assert await flusher.drain() == 4


async def test_appends_to_many_unflushed_threads_each_cost_the_same(
    log: MemoryWriteBehindLog, flusher: Flusher
) -> None:
    """With the cold tier down under load, a worker's unflushed threads pile up: an append
    to one more must not scan them all (it did once they passed 128: 30,000 threads took
    ~20 s of CPU, against ~30 ms now; the bound leaves a wide margin either way). The
    threads stay this worker's for the background pass."""
    threads = [f"t{n}" for n in range(30_000)]
    started = time.process_time()
    for thread_id in threads:
        flusher.notify(thread_id)
    assert time.process_time() - started < 2.0
    await append(log, threads[0], 1)
    assert await flusher.drain(adopt_after=3600.0) == 2


async def test_a_thread_seen_listed_before_this_workers_own_run_is_not_adopted_after_it(
    log: MemoryWriteBehindLog, flusher: Flusher
) -> None:
    """Worker B runs the thread, then this worker A, then B again, back to back: when A
    was first seen the thread listed (B's first run) says nothing of B's next run
    (found by review)."""
    await append(log, "t", 1)  # B's run: seen listed, left to B
    assert await flusher.drain(adopt_after=0.5) == 0
    await log.ack("t", [entry.entry_id for entry in await log.read("t", count=10)])
    await append(log, "t", 1)  # A's run, flushed at its end
    flusher.notify("t")
    await flusher.flush_thread("t")
    await asyncio.sleep(0.6)
    await append(log, "t", 1)  # B's next run
    assert await flusher.drain(adopt_after=0.5) == 0


def _thread(op: FlushOp) -> str:
    return op.thread_id if isinstance(op, WritesPut) else op.checkpoint.thread_id


def _position(op: FlushOp) -> tuple[str, int]:
    if isinstance(op, WritesPut):
        return ("writes", int(op.checkpoint_id))
    return ("put", int(op.checkpoint.checkpoint_id))


async def test_the_background_task_waits_for_appends_to_pause_within_a_bound(
    log: MemoryWriteBehindLog,
    store: RecordingStore,
    flusher: Flusher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A run appends every few ms: its flush waits for the pause after it, off its path.
    monkeypatch.setattr(flusher_module, "WAKE_DELAY_SECONDS", 0.1)
    monkeypatch.setattr(flusher_module, "WAKE_DELAY_MAX_SECONDS", 5.0)
    flusher.start()
    try:
        for n in range(1, 21):
            await log.append_put(
                checkpoint("a", n), [StoredBlob("chat", n, ("json", b"%d" % n))], fence=None
            )
            flusher.notify("a")
            await asyncio.sleep(0.01)
        assert store.batches == []
        for _ in range(100):
            if not await log.pending("a"):
                break
            await asyncio.sleep(0.01)
        assert await log.backlog() == Backlog(entries=0, threads=0, oldest_age_seconds=None)
        assert len(store.batches) == 1  # the whole run in one pass

        # Appends that never pause are still drained once the bound is reached.
        monkeypatch.setattr(flusher_module, "WAKE_DELAY_MAX_SECONDS", 0.2)
        for n in range(21, 81):
            await log.append_put(
                checkpoint("a", n), [StoredBlob("chat", n, ("json", b"%d" % n))], fence=None
            )
            flusher.notify("a")
            await asyncio.sleep(0.01)
        assert len(store.batches) > 1
    finally:
        await flusher.close(final_drain_seconds=1)


async def test_a_batch_the_cold_fence_refuses_is_left_in_the_log_and_the_lock_released(
    log: MemoryWriteBehindLog, store: RecordingStore, flusher: Flusher
) -> None:
    """The cold store saw a newer token than this holder's (a clock that went back, say):
    nothing is applied or acknowledged, and the lock is free again at once, not a TTL
    later."""
    await append(log, "a", 2)
    await store.delete_thread("a", fence=10**18)
    assert await flusher.drain() == 0
    assert store.batches == []
    assert (await log.backlog()).entries == 4
    token = await log.lock_thread("a", ttl_ms=LOCK_TTL_MS * 100)
    assert token is not None
    await log.unlock_thread("a", token)


async def test_appends_on_other_threads_wake_a_waiting_flusher_once_per_burst(
    log: MemoryWriteBehindLog, store: RecordingStore, flusher: Flusher
) -> None:
    """The sync API appends on its callers' threads. A flusher waiting for work is woken
    by the first (well before its idle poll); the rest of the burst costs the loop
    thread no wake-up: the flusher takes them at its next look, and drains them all."""
    loop = asyncio.get_running_loop()
    wake_ups = 0
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal wake_ups
        wake_ups += 1
        return call_soon_threadsafe(*args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    flusher.start()
    try:
        await asyncio.sleep(0.01)  # the background pass waits for work
        threads = [f"t{n}" for n in range(20)]
        for thread in threads:
            await append(log, thread, 1)

        def burst() -> None:
            for thread in threads:
                flusher.notify_from_thread(thread)

        await asyncio.to_thread(burst)
        for _ in range(80):  # well before the idle poll (1 s)
            if not (await log.backlog()).entries:
                break
            await asyncio.sleep(0.01)
        assert (await log.backlog()).entries == 0
        # asyncio.to_thread's own hand-back is one; the burst's first append the other.
        assert wake_ups <= 2
    finally:
        del loop.call_soon_threadsafe
        await flusher.close(final_drain_seconds=1)


def test_a_discard_of_stuck_writes_takes_the_steps_computed_from_them() -> None:
    """Writes refused for good on checkpoint 2: the puts after 2 were computed from them (a
    DeltaChannel is even rebuilt from its ancestors' writes), so they and their own writes go
    with them; another task's writes to 2, and another namespace, stay."""
    puts = {n: CheckpointPut(checkpoint("t", n), []) for n in (3, 4)}
    sub = CheckpointPut(dataclasses.replace(checkpoint("t", 3), checkpoint_ns="sub:1"), [])

    def writes(checkpoint_id: str, task: str) -> WritesPut:
        return WritesPut(
            "t", "", checkpoint_id, [StoredWrite(task, "", 0, "chat", ("json", b"1"))], False
        )

    entries = [
        LogEntry("1-0", writes("0002", "refused")),
        LogEntry("2-0", writes("0002", "other")),
        LogEntry("3-0", puts[3]),
        LogEntry("4-0", writes("0003", "task")),
        LogEntry("5-0", sub),
        LogEntry("6-0", puts[4]),
    ]
    dropped = [entry.entry_id for entry in flusher_module._dependents(entries)]
    assert dropped == ["1-0", "3-0", "4-0", "6-0"]


class RefusingStore(RecordingStore):
    """Refuses for good every batch holding the put of checkpoint `refused`."""

    def __init__(self, refused: str) -> None:
        super().__init__()
        self.refused = refused
        self.refusals = 0

    async def apply_batch(self, ops: Sequence[FlushOp], *, fence: int | None = None) -> None:
        if any(
            isinstance(op, CheckpointPut) and op.checkpoint.checkpoint_id == self.refused
            for op in ops
        ):
            self.refusals += 1
            raise StateTooLarge("checkpoint", 3_000_000, 2_000_000)
        await super().apply_batch(ops, fence=fence)


async def test_the_background_pass_tries_a_stuck_thread_again_only_after_a_while(
    log: MemoryWriteBehindLog,
) -> None:
    """A refusal for good is not tried on every pass (each a cold request and no progress),
    yet is tried again later (its cause may be fixed); a boundary tries it at once."""
    store = RefusingStore("0002")
    flusher = Flusher(log, store, lock_ttl_ms=LOCK_TTL_MS)
    await append(log, "a", 3)
    await append(log, "b", 1)

    assert await flusher.drain() == 2 + 2  # "a" up to its stuck put (in order), and "b"
    assert store.refusals == 2  # the batch, then the put alone
    assert await flusher.drain() == 0
    assert store.refusals == 2  # left alone by the next pass
    with pytest.raises(EntryStuck):
        await flusher.flush_thread("a")
    assert store.refusals == 4  # the rest of "a" as one batch, then the put alone

    store.refused = "none"  # its cause fixed, and its retry time come:
    flusher._stuck_until["a"] = (time.monotonic(), flusher._stuck_until["a"][1])
    assert await flusher.drain() == 4
    assert not await log.pending("a")
    assert await log.stuck() == []


async def test_a_boundary_that_stores_a_stuck_thread_ends_its_retry_delay(
    log: MemoryWriteBehindLog,
) -> None:
    """Once a boundary stored what was stuck (its cause fixed), the background pass takes
    the thread's next entries at once, even listed with the marker it was found stuck at."""
    store = RefusingStore("0002")
    flusher = Flusher(log, store, lock_ttl_ms=LOCK_TTL_MS)
    await append(log, "a", 3)
    assert await flusher.drain() == 2  # up to the stuck put
    store.refused = "none"
    assert await flusher.flush_thread("a") == 4
    assert not await log.pending("a")

    await append(log, "a", 3)  # as many appends as the thread was listed with when stuck
    assert await flusher.drain() == 6
    assert not await log.pending("a")
