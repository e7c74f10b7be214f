"""The write-behind flusher: moves acknowledged checkpoint work from the hot log to the cold tier.

Every worker runs one in the background (woken by its own appends, and polling
for work other workers left behind, which it takes once it has lingered:
ADOPT_AFTER_SECONDS); the timer function runs a `drain` pass too.
A thread is flushed by one flusher at a time (the log's per-thread lock), oldest
entry first, so the cold tier receives a thread's operations in order; entries
leave the log only after the cold tier has them, and applying one twice is
harmless (`CheckpointStore.apply_batch` is idempotent). The lock is short and
renewed while its holder works: a flusher that dies or is paused mid-batch holds
the thread up for one lock TTL at most, and the next one re-applies that batch. A
flusher back from a pause longer than the TTL finds its lease run out (by the clock,
before each batch) and applies nothing more; a pause inside a batch's own cold
requests is caught by the cold store: each batch carries the lock's fencing token,
and the store refuses one older than the thread's newest (a later holder's, or a
`delete_thread` made under the lock), even when Redis lost the lock key meanwhile.

`flush_thread` is the synchronous boundary: it returns once everything appended
to the thread before the call is in the cold tier. `settle_all` does that for
every thread with a backlog, before an operation the cold tier answers across
threads (`delete_for_runs`, a listing without a thread id); `drain`, the
background pass, skips a thread another flusher holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from ..errors import (
    BackendUnavailable,
    DiscardOutpaced,
    EntryStuck,
    FlushLockBusy,
    LockLost,
    LogEntryDamaged,
    LogEntryLost,
    NotStuck,
    RequestRejected,
    StaleFencingToken,
    StateError,
    StateTooLarge,
)
from ..ports import (
    Backlog,
    CheckpointPut,
    CheckpointStore,
    FlushOp,
    LogEntry,
    StoredCheckpoint,
    StuckEntry,
    WriteBehindLog,
    WritesPut,
)
from ..shielding import taken_or_given_back

log = logging.getLogger(__name__)

# Entries applied per cold batch: large enough to amortise round trips, small enough
# that a batch finishes well within the flush lock.
BATCH_ENTRIES = 64
# Threads flushed at once by a drain pass, out of the oldest listed ones.
CONCURRENT_THREADS = 8
LISTED_THREADS = CONCURRENT_THREADS * 4
# How often an idle flusher looks for work other workers left behind.
POLL_SECONDS = 1.0
# The background pass takes a thread this worker did not append to only once it has seen
# it listed this long: its own worker is flushing it (within WAKE_DELAY_MAX_SECONDS),
# unless it died. A thread that hops between workers mid-run costs each of them its
# chunks again (a store builds on what it stored itself, `state.cold.chunks`) and a lock
# handover per hop.
ADOPT_AFTER_SECONDS = 5.0
# How long an append makes a thread this worker's own, for the background pass, unless
# a flush empties the thread first (the run's end: its next run may be another worker's).
OWN_SECONDS = 60.0
# Appends from callers' threads noted at most, between two looks of the loop.
APPENDED_ELSEWHERE_MAX = 10_000
# After its own append wakes it, a flusher waits until appends pause this long, so its
# cold requests and CPU stay off the path of a run in progress (which appends every few
# ms) and one pass takes a run's entries together ...
WAKE_DELAY_SECONDS = 0.1
# ... but no longer than this after the first wake, so a steady stream of appends (many
# runs at once) is still drained; longer than most runs, whose own boundary then flushes
# them in one batch.
WAKE_DELAY_MAX_SECONDS = 1.0
# A background pass that found the cold tier out waits this long before the next one,
# doubling up to the max while it stays out (entries wait in the log meanwhile).
COLD_OUT_BACKOFF_SECONDS = 0.25
COLD_OUT_BACKOFF_MAX_SECONDS = 5.0
LOCK_POLL_SECONDS = 0.005
# How long a boundary waits for the thread's flush lock: its holder renews it while it
# drains, so this bounds a long drain by another flusher, not a dead one.
LOCK_WAIT_SECONDS = 60.0
# How long appends to a thread the retention sweep is deleting stay refused if the sweep
# cannot end the refusal (it died; a Redis failure, unless its flusher lives on to end it
# once Redis is back): longer than any sweep holds a thread.
EXPIRING_REFUSAL_MS = 3_600_000
# (thread, namespace) pairs whose last applied put is remembered, for the saver's check
# that a boundary's flush really stored what this process appended.
APPLIED_REMEMBERED = 10_000
# `settle_all` lists every thread with a backlog in one read: paging could step over a
# thread while other flushers unlist the ones before it.
ALL_LISTED = 1_000_000
# What the cold store answers for an entry it will never store, sent again unchanged (an
# outage is `BackendUnavailable`, a lost lock `StaleFencingToken`: both pass).
PERMANENT_REFUSALS = (RequestRejected, StateTooLarge)
# Reads of a thread's log by a discard, each undone by an append landing before its drop.
DISCARD_READS = 5
# How long the background pass leaves a thread it found stuck before it tries it again (its
# cause may be fixed: a permission granted, a limit raised); a boundary tries at once.
STUCK_RETRY_SECONDS = 60.0


class _Lease:
    """A held flush lock, renewed in the background at a third of its TTL; `lost` once
    it was taken by another or could not be renewed before it ran out.

    It also knows until when it is surely held: its TTL from when the lock (or the last
    renewal that held) was asked for. A process paused past that (a long GC, a frozen
    VM) finds the lease run out on `check` before its renewer has had a turn to say so,
    and does not apply a batch another flusher may have applied and acknowledged since.
    """

    def __init__(
        self, log: WriteBehindLog, thread_id: str, token: str, ttl_ms: int, asked_at: float
    ) -> None:
        self.thread_id = thread_id
        self.token = token
        self.fence = int(token)
        self.lost = False
        self.applied = 0  # entries applied under this lease, kept if it is lost midway
        self._log = log
        self._ttl_ms = ttl_ms
        self._held_until = asked_at + ttl_ms / 1000
        self._renewer = asyncio.create_task(self._renew(), name=f"flush-lease:{thread_id}")

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            asked_at = time.monotonic()
            try:
                held = await self._log.renew_thread_lock(
                    self.thread_id, self.token, ttl_ms=self._ttl_ms
                )
            except BackendUnavailable:
                held = time.monotonic() < self._held_until
            else:
                if held:
                    self._held_until = asked_at + self._ttl_ms / 1000
            if not held:
                self.lost = True
                return

    def check(self) -> None:
        if self.lost or time.monotonic() >= self._held_until:
            self.lost = True
            raise LockLost(f"flush of {self.thread_id!r}", "not renewed within its TTL")

    async def release(self) -> None:
        self._renewer.cancel()
        try:
            # `wait`, not the task itself: its cancellation is the renewer's, whereas one
            # raised here is the caller's own, which must reach it (after the unlock).
            await asyncio.wait([self._renewer])
            if not self._renewer.cancelled() and self._renewer.exception() is not None:
                # A defect, not an outage (that is `BackendUnavailable`, handled there): said
                # here, not left to asyncio's "exception was never retrieved" at collection.
                log.error(
                    "flush lock renewer of %r failed",
                    self.thread_id,
                    exc_info=self._renewer.exception(),
                )
        finally:
            if not self.lost:
                # Shielded: a caller cancelled meanwhile would otherwise leave the lock to
                # hold the thread's next flush up for its TTL.
                await asyncio.shield(_finishing(_unlock(self._log, self.thread_id, self.token)))


# Unlocks a cancelled caller left running: the event loop references its tasks weakly.
_unlocking: set[asyncio.Task[None]] = set()


async def _landed(command: Coroutine[Any, Any, None]) -> None:
    """A command that refuses the thread's appends or ends that refusal, awaited to its reply
    even if the caller is cancelled meanwhile, once or again (then cancelled after it): sent,
    a refusal lands anyway, and the end of the caller's block, which ends the refusal on
    another connection, could otherwise come first and leave it standing for
    EXPIRING_REFUSAL_MS; the end of a refusal, cancelled before it is sent, would leave it
    standing as long."""
    sending = asyncio.ensure_future(command)
    cancelled: asyncio.CancelledError | None = None
    while not sending.done():
        try:
            # asyncio.wait never cancels what it waits for.
            await asyncio.wait({sending})
        except asyncio.CancelledError as again:
            cancelled = again
    if cancelled is not None:
        with contextlib.suppress(StateError):
            sending.result()
        raise cancelled
    sending.result()


def _finishing(unlock: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    task = asyncio.ensure_future(unlock)
    _unlocking.add(task)
    task.add_done_callback(_unlocking.discard)
    return task


async def _unlock(log_: WriteBehindLog, thread_id: str, token: str) -> None:
    try:
        await log_.unlock_thread(thread_id, token)
    except BackendUnavailable as exc:
        # What this flusher applied is in the cold tier either way: a boundary must not
        # fail for an unlock, and the lock lapses within its TTL.
        log.warning("flush lock of %r left to expire: %s", thread_id, exc)


@dataclass(frozen=True)
class _Drained:
    applied: int
    unlisted: bool
    cold_out: bool = False  # stopped by the cold tier being unreachable


def _dependents(entries: list[LogEntry]) -> list[LogEntry]:
    """The first entry and every later one that depends on what is dropped with it, per
    namespace: writes to a dropped checkpoint, and a put whose parent is dropped or lost
    writes (its values were computed from them, and a DeltaChannel is rebuilt from its
    ancestors' writes), and so on down that branch. Writes to a checkpoint that stays, from
    other tasks, do not depend on them."""
    first = entries[0]
    dropped = [first]
    if isinstance(first.op, CheckpointPut):
        key = (first.op.checkpoint.checkpoint_ns, first.op.checkpoint.checkpoint_id)
        gone, parents_gone = {key}, {key}
    else:
        gone, parents_gone = set(), {(first.op.checkpoint_ns, first.op.checkpoint_id)}
    for entry in entries[1:]:
        op = entry.op
        if isinstance(op, CheckpointPut):
            checkpoint = op.checkpoint
            if (checkpoint.checkpoint_ns, checkpoint.parent_checkpoint_id) in parents_gone:
                key = (checkpoint.checkpoint_ns, checkpoint.checkpoint_id)
                gone.add(key)
                parents_gone.add(key)
                dropped.append(entry)
        elif (op.checkpoint_ns, op.checkpoint_id) in gone:
            dropped.append(entry)
    return dropped


def described(entry: LogEntry) -> str:
    """An entry as an operator reads it: its id, thread and checkpoint."""
    op = entry.op
    if isinstance(op, CheckpointPut):
        checkpoint = op.checkpoint
        return (
            f"{entry.entry_id} of {checkpoint.thread_id!r}: checkpoint {checkpoint.checkpoint_id}"
            f" (namespace {checkpoint.checkpoint_ns!r}, parent {checkpoint.parent_checkpoint_id})"
        )
    return (
        f"{entry.entry_id} of {op.thread_id!r}: {len(op.writes)} writes to checkpoint"
        f" {op.checkpoint_id} (namespace {op.checkpoint_ns!r})"
    )


def _damaged_entry(damaged: LogEntryDamaged) -> StuckEntry:
    return StuckEntry(
        thread_id=damaged.thread_id,
        entry_id=damaged.entry_id,
        checkpoint_ns=damaged.checkpoint_ns,
        checkpoint_id=damaged.checkpoint_id,
        kind="put" if damaged.kind == "put" else "writes",
        reason=f"damaged: {damaged.reason}",
        since=0.0,  # the log's clock, as it records it
    )


def _stand_in(damaged: LogEntryDamaged) -> LogEntry:
    """A damaged entry as what could be read of it (its checkpoint's ids), for a discard to
    find the later entries that depend on it and to name it."""
    if damaged.kind == "writes":
        op: FlushOp = WritesPut(
            damaged.thread_id, damaged.checkpoint_ns, damaged.checkpoint_id, [], upsert=False
        )
    else:
        op = CheckpointPut(
            StoredCheckpoint(
                thread_id=damaged.thread_id,
                checkpoint_ns=damaged.checkpoint_ns,
                checkpoint_id=damaged.checkpoint_id,
                parent_checkpoint_id=None,
                checkpoint=("", b""),
                metadata={},
                channel_versions={},
            ),
            [],
        )
    return LogEntry(damaged.entry_id, op)


def _namespace(op: FlushOp) -> str:
    return op.checkpoint.checkpoint_ns if isinstance(op, CheckpointPut) else op.checkpoint_ns


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


class Flusher:
    def __init__(self, log: WriteBehindLog, store: CheckpointStore, *, lock_ttl_ms: int) -> None:
        self.log = log
        self.store = store
        self._lock_ttl_ms = lock_ttl_ms
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.flushed_entries = 0
        # Threads this worker appended to (last append), and others seen listed (first seen).
        self._own: dict[str, float] = {}
        self._own_pruned_over = 4 * LISTED_THREADS
        # Appends the sync API made on its callers' threads, noted on the loop at its next
        # look: waking the loop thread for each would cost every write a cross-thread
        # wake-up and a contended GIL. Bounded: a flusher never started forgets the oldest.
        self._appended_elsewhere: deque[tuple[str, float]] = deque(maxlen=APPENDED_ELSEWHERE_MAX)
        # Set while the background pass waits for a wake-up (read on the callers' threads).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting = False
        self._foreign: dict[str, float] = {}
        # (thread, namespace) -> the last checkpoint put this flusher applied.
        self._applied_puts: OrderedDict[tuple[str, str], str] = OrderedDict()
        # (thread, namespace, checkpoint) -> the (task, idx) of the writes this flusher applied.
        self._applied_writes: OrderedDict[tuple[str, str, str], set[tuple[str, int]]] = (
            OrderedDict()
        )
        # Threads whose deletion is done but whose refusal of appends Redis failed to end.
        self._refusals_owed: set[str] = set()
        # Threads found stuck (`EntryStuck`) -> when the background pass tries them again,
        # and their listing marker then: one that moved (an append since, after another
        # process discarded the entry and flushed the thread) is tried at once.
        self._stuck_until: dict[str, tuple[float, float]] = {}

    # ----------------------------------------------------------------------- boundaries

    async def flush_thread(self, thread_id: str, *, deadline: float | None = None) -> int:
        """Return once every entry appended to the thread before this call is in the cold
        tier; how many entries this call applied. `deadline` (a `time.monotonic()` time):
        wait for the flush lock until then at the latest, not LOCK_WAIT_SECONDS (raises
        `FlushLockBusy`)."""
        applied = 0
        longest = time.monotonic() + LOCK_WAIT_SECONDS
        deadline = longest if deadline is None else min(deadline, longest)
        while True:
            try:
                async with self._holding(thread_id, deadline) as lease:
                    await self._drain_locked(lease)
                    self._stuck_until.pop(thread_id, None)  # its cause fixed, or discarded
                    return applied + lease.applied
            except LockLost:
                applied += lease.applied
                # Paused past the lock's TTL: whoever took the lock over may not have
                # flushed all of it yet; take it again and finish.
                if time.monotonic() > deadline:
                    raise

    async def settle_thread(
        self, thread_id: str, *, pending: bool | None = None, strict: bool = False
    ) -> None:
        """Flush the thread if it has a backlog (before a read the cold tier answers);
        `pending`: whether it has, when the caller read it already (a cache miss does).

        With the hot tier unreachable there is nothing to flush from: a read goes on
        against the cold tier, which is what a reader can have; `strict` (before a change
        the backlog must not land after, as maintenance makes) raises instead.
        `FlushLockBusy` is always raised: Redis answered, and the backlog newer than the
        cold tier is in it (another flusher still applying it); the cold tier's older
        state must not be read as the latest, nor a run go on from it (it would fork the
        thread, its steps flushed after that backlog).
        """
        try:
            if pending is None:
                pending = await self.log.pending(thread_id)
            if pending:
                await self.flush_thread(thread_id)
        except FlushLockBusy:
            raise
        except BackendUnavailable as exc:
            if strict:
                raise
            log.warning("write-behind log unreachable (%s): reading the cold tier as is", exc)

    async def settle_all(self) -> dict[str, StateError]:
        """Return once every entry appended before the call is in the cold tier, whatever
        its thread (before an operation the cold tier answers across threads), but for the
        threads whose flush fails, which it returns with why (`EntryStuck`: the operator's to
        resolve, which a caller refusing for that thread says as such). Unlike `drain`, waits
        for a thread another flusher holds. A thread that cannot be flushed (a newer format, a cold
        refusal, a lock never released) is logged and left in the log, as `drain` leaves
        it: one bad thread must not stop an operation on all the others. An unreachable
        hot tier raises (nothing could be flushed)."""
        listed = [thread_id for thread_id, _ in await self.log.dirty_threads(limit=ALL_LISTED)]
        slots = asyncio.Semaphore(CONCURRENT_THREADS)

        async def settle(thread_id: str) -> StateError | None:
            async with slots:
                try:
                    await self.flush_thread(thread_id)
                except StateError as exc:
                    log.warning("write-behind backlog of %r left in the log: %s", thread_id, exc)
                    return exc
                return None

        left: dict[str, StateError] = {}
        for start in range(0, len(listed), LISTED_THREADS):
            page = listed[start : start + LISTED_THREADS]
            settled = await asyncio.gather(*(settle(thread_id) for thread_id in page))
            left |= {t: exc for t, exc in zip(page, settled, strict=True) if exc is not None}
        return left

    @contextlib.asynccontextmanager
    async def discarding(self, thread_id: str) -> AsyncIterator[int]:
        """For a caller deleting the thread's cold state itself, inside the block (the
        retention sweep): the backlog dropped under the flush lock, and appends refused
        (`ThreadExpiring`) from the same step to the block's end, so no flusher can apply
        a step onto the deleted thread, not even one whose lock outlived the block's or
        that took the lock after a failure here. Should the refusal outlive the block (a
        Redis failure ending it), this flusher's next pass ends it once Redis is back (the
        background one: within POLL_SECONDS), or it expires after EXPIRING_REFUSAL_MS (this
        process gone). Yields the fencing token the deletion must raise the thread's flush
        fence to (see `delete_thread`)."""
        async with self.holding(thread_id) as fence:
            try:
                # Inside: a discard that fails after its script set the refusal (its reply
                # lost, its unlisting failed) must end it too, the thread not deleted.
                await _landed(self.log.discard(thread_id, refuse_appends_ms=EXPIRING_REFUSAL_MS))
                yield max(fence, await self.log.fence_now())
            finally:
                await self._accept_appends(thread_id)

    @contextlib.asynccontextmanager
    async def refusing(
        self, thread_id: str, *, deadline: float | None = None
    ) -> AsyncIterator[int]:
        """`discarding`, the backlog kept until `discard_refused`: for the retention sweep,
        which may yet spare the thread (a run resumed it), and must then not lose the steps
        the run was told were stored. Inside the block nothing is appended or flushed.
        `deadline`: as `holding`'s."""
        async with self.holding(thread_id, deadline=deadline) as fence:
            try:
                await _landed(self.log.refuse_appends(thread_id, for_ms=EXPIRING_REFUSAL_MS))
                yield max(fence, await self.log.fence_now())
            finally:
                await self._accept_appends(thread_id)

    async def discard_refused(self, thread_id: str) -> None:
        """Drop the backlog of a thread inside a `refusing` block (it is being deleted)."""
        await _landed(self.log.discard(thread_id, refuse_appends_ms=EXPIRING_REFUSAL_MS))

    async def _accept_appends(self, thread_id: str) -> None:
        """End the refusal a `discarding` or `refusing` block set, under the thread's flush
        lock: the block ended, and no other deletion of the thread is under way (its refusal
        must not be ended here). Landed whatever becomes of the caller, before the lock is
        let go."""
        await _landed(self._accepting(thread_id))

    async def _accepting(self, thread_id: str) -> None:
        try:
            await self.log.accept_appends(thread_id)
        except BackendUnavailable as exc:
            self._refusals_owed.add(thread_id)
            log.warning("appends to %r refused until Redis is back: %s", thread_id, exc)
        else:
            self._refusals_owed.discard(thread_id)

    async def _end_owed_refusals(self) -> None:
        """End the refusals Redis failed to end; one whose thread's lock is held is left
        to the next pass (the holder may be deleting the thread again)."""
        for thread_id in list(self._refusals_owed):
            with contextlib.suppress(BackendUnavailable):
                async with self._holding(thread_id, time.monotonic()):
                    await self._accept_appends(thread_id)

    async def delete_thread(self, thread_id: str) -> None:
        """Delete the thread's backlog and its cold checkpoints. Under the flush lock, so no
        flusher applies (resurrects) the dropped backlog; and fenced past every lock token
        granted before the discard, so neither does one that took the lock anyway (it
        lapsed, or Redis evicted it). Appends are refused (`ThreadExpiring`) from the
        discard until the cold delete is done, as the retention sweep refuses them: a run
        writing meanwhile would otherwise find its parent still in the cold tier, append
        a child, and have it flushed back onto the deleted thread once the lock is
        released (its new lock token is past the fence)."""
        async with self.discarding(thread_id) as fence:
            await self.store.delete_thread(thread_id, fence=fence)

    @contextlib.asynccontextmanager
    async def holding_flushed(self, thread_id: str) -> AsyncIterator[None]:
        """The thread's flush lock, held once everything appended before the call is in
        the cold tier: no flush changes the thread's cold state inside the block (a copy
        or a prune reading it in several requests sees one state, and a prune collecting
        chunks never takes those of a step flushed meanwhile). Appends go on into the log,
        flushed after the block. Raises `LockLost` at its end if the lock was lost
        meanwhile (a flush may have interleaved: the caller should do its work again)."""
        async with self._holding(thread_id, time.monotonic() + LOCK_WAIT_SECONDS) as lease:
            await self._drain_locked(lease)
            yield
            lease.check()

    @contextlib.asynccontextmanager
    async def holding(self, thread_id: str, *, deadline: float | None = None) -> AsyncIterator[int]:
        """The thread's flush lock, waited for: no flusher applies its entries meanwhile.
        Yields the lock's fencing token, for a cold write that must fence off earlier
        holders (`CheckpointStore.delete_thread`). `deadline` (a `time.monotonic()` time):
        wait for the lock until then at the latest, not LOCK_WAIT_SECONDS (raises
        `FlushLockBusy`)."""
        longest = time.monotonic() + LOCK_WAIT_SECONDS
        async with self._holding(
            thread_id, longest if deadline is None else min(deadline, longest)
        ) as lease:
            yield lease.fence

    async def _lock(self, thread_id: str) -> str | None:
        """The thread's flush lock's token, if it was free. Cancelled meanwhile, the caller
        stops at once, but the lock script may run all the same (its reply lost): a lock
        it took is released as soon as it answers, not left to hold the thread's next
        flush up for its TTL."""
        return await taken_or_given_back(
            self.log.lock_thread(thread_id, ttl_ms=self._lock_ttl_ms),
            lambda token: token is None or _finishing(_unlock(self.log, thread_id, token)),
        )

    @contextlib.asynccontextmanager
    async def _holding(self, thread_id: str, deadline: float) -> AsyncIterator[_Lease]:
        while True:
            asked_at = time.monotonic()
            token = await self._lock(thread_id)
            if token is not None:
                break
            if time.monotonic() > deadline:
                raise FlushLockBusy(thread_id)
            await asyncio.sleep(LOCK_POLL_SECONDS)
        lease = _Lease(self.log, thread_id, token, self._lock_ttl_ms, asked_at)
        try:
            yield lease
        finally:
            await lease.release()

    # ----------------------------------------------------------------------- draining

    async def drain(
        self,
        *,
        limit: int | None = None,
        adopt_after: float | None = None,
        unflushed_for: float = 0.0,
        deadline: float | None = None,
    ) -> int:
        """Flush listed threads (oldest backlog first) until none is left that this
        flusher can take, or `limit` entries were applied; returns entries applied.
        `adopt_after`: take a thread this worker did not append to only once this flusher
        has seen it listed for that long (the background pass; see ADOPT_AFTER_SECONDS).
        `unflushed_for`: only threads whose oldest unflushed entry is that old.
        `deadline` (a `time.monotonic()` time): no thread is taken, nor another batch
        applied, after it; what is left stays in the log for the next pass."""
        applied, _ = await self._drain(
            limit=limit, adopt_after=adopt_after, unflushed_for=unflushed_for, deadline=deadline
        )
        return applied

    async def _drain(
        self,
        *,
        limit: int | None,
        adopt_after: float | None,
        unflushed_for: float,
        deadline: float | None = None,
    ) -> tuple[int, bool]:
        """`drain`, and whether it stopped because the cold tier was unreachable."""
        self._take_appended_elsewhere()  # which threads are this worker's own
        await self._end_owed_refusals()
        total = 0
        skip = 0
        slots = asyncio.Semaphore(CONCURRENT_THREADS)
        seen: set[str] = set()
        cold_out = False
        while (limit is None or total < limit) and not _past(deadline):
            listed = await self.log.dirty_threads(
                limit=LISTED_THREADS, skip=skip, unflushed_for=unflushed_for
            )
            if not listed:
                break
            seen.update(thread for thread, _ in listed)
            taken = [
                (thread, marker)
                for thread, marker in listed
                if self._takes(thread, marker, adopt_after)
            ]
            results = await asyncio.gather(
                *(self._take(thread, marker, slots, deadline) for thread, marker in taken)
            )
            done = [result for result in results if result is not None]
            total += sum(result.applied for result in done)
            if not any(result.applied or result.unlisted for result in done):
                if any(result.cold_out for result in done):
                    # Every other thread would fail the same way: a pass over thousands of
                    # them (a backlog piling up while runs go on) would only load Redis.
                    cold_out = True
                    break
                # Nothing moved: these threads belong to other flushers, or cannot be
                # flushed by this one (an entry of a newer format, a cold refusal). They
                # stay the oldest listed, so look past them, or they would hide the rest.
                if len(listed) < LISTED_THREADS:
                    break
                skip += len(listed)
        if adopt_after is not None:
            self._foreign = {t: at for t, at in self._foreign.items() if t in seen}
        return total, cold_out

    async def drain_abandoned(self, *, deadline: float | None = None) -> int:
        """The timer's pass: flush the threads no worker flushed for ADOPT_AFTER_SECONDS
        (their worker died or stopped). A live worker flushes its own within
        WAKE_DELAY_MAX_SECONDS, so its threads are left to it: taken here, a run's thread
        would cost its worker a lock handover and its chunks again. Returns entries
        applied. The timer's runtime is new each tick, so this reads the age from the
        log, not from what this flusher has seen (`adopt_after`). `deadline`: as `drain`'s
        (a tick must end before the next is due)."""
        return await self.drain(unflushed_for=ADOPT_AFTER_SECONDS, deadline=deadline)

    def _takes(self, thread_id: str, marker: float, adopt_after: float | None) -> bool:
        now = time.monotonic()
        until, stuck_marker = self._stuck_until.get(thread_id, (now, marker))
        if now < until and marker == stuck_marker:
            return False
        if adopt_after is None:
            return True
        if now - self._own.get(thread_id, -OWN_SECONDS) < OWN_SECONDS:
            return True
        return now - self._foreign.setdefault(thread_id, now) >= adopt_after

    async def _take(
        self,
        thread_id: str,
        marker: float,
        slots: asyncio.Semaphore,
        deadline: float | None = None,
    ) -> _Drained | None:
        """Flush the thread unless another flusher has it, or `deadline` passed (None)."""
        async with slots:
            if _past(deadline):
                return None
            asked_at = time.monotonic()
            token = await self._lock(thread_id)
            if token is None:
                return None
            lease = _Lease(self.log, thread_id, token, self._lock_ttl_ms, asked_at)
            try:
                drained = await self._drain_locked(lease, deadline)
            except EntryStuck:
                # Said once, as it was recorded (`_refused`); tried again later, not per pass.
                self._stuck_until[thread_id] = (time.monotonic() + STUCK_RETRY_SECONDS, marker)
                return _Drained(lease.applied, False)  # those before it are stored
            except BackendUnavailable as exc:
                log.warning("write-behind flush of %r failed: %s", thread_id, exc)
                return _Drained(lease.applied, False, cold_out=exc.backend != self.log.name)
            except StateError as exc:
                # Left in the log (the backlog's age shows it); other threads go on.
                log.warning("write-behind flush of %r failed: %s", thread_id, exc)
                return None
            finally:
                await lease.release()
            self._stuck_until.pop(thread_id, None)
            return drained

    async def _drain_locked(self, lease: _Lease, deadline: float | None = None) -> _Drained:
        """Apply the thread's backlog; past `deadline`, the rest stays listed for later."""
        thread_id = lease.thread_id
        marker = await self.log.marker(thread_id)
        while True:
            try:
                entries = await self.log.read(thread_id, count=BATCH_ENTRIES)
            except LogEntryLost as lost:
                # Stuck in the log, it would fail every flush of the thread for good. Gone,
                # it is lost as in any loss of Redis: the writer's next put or boundary
                # learns it (`HotStateLost`) and the run resumes from the cold tier.
                if await self.log.drop_lost(lost, lock_token=lease.token):
                    log.error("%s: dropped the thread's unflushed entries and cache", lost)
                    break
                continue  # not lost after all (an earlier flusher's late acknowledgement)
            except LogEntryDamaged as damaged:
                # It fails every flush of the thread until an operator discards it: recorded
                # as a refused entry is, so health and `agent-state write-behind` show it.
                raise await self._noted(_damaged_entry(damaged)) from damaged
            if not entries:
                break
            left = await self._apply(lease, entries, deadline)
            if left == 0:
                break
            if _past(deadline):
                return _Drained(lease.applied, False)
        unlisted = False
        if marker is not None:
            unlisted = await self.log.settle(thread_id, marker)
            # On a cluster the listing and the entry live on different nodes: an entry
            # can land after the read above yet be counted in `marker`. Keep it listed.
            if unlisted and await self.log.pending(thread_id):
                await self.log.mark_dirty(thread_id)
                unlisted = False
        if unlisted:
            self._own.pop(thread_id, None)
            self._foreign.pop(thread_id, None)
        return _Drained(lease.applied, unlisted)

    async def _apply(
        self, lease: _Lease, entries: list[LogEntry], deadline: float | None = None
    ) -> int:
        """Apply the entries and acknowledge them; how many the log has left. A batch the
        cold store refuses for good is applied one entry at a time, so those before the
        refused one are stored and it is named (`EntryStuck`); past `deadline`, as between
        batches, the rest is left in the log (then at least those, not the log's count)."""
        lease.check()
        try:
            await self.store.apply_batch([entry.op for entry in entries], fence=lease.fence)
        except StaleFencingToken as exc:
            # Another holder came after this one; the lock is released as usual (a no-op
            # unless it is still this one's: then a clock that went back refused it).
            raise LockLost(f"flush of {lease.thread_id!r}", str(exc)) from exc
        except PERMANENT_REFUSALS as exc:
            if len(entries) == 1:
                raise await self._refused(entries[0], exc) from exc
            left = 0
            for done, entry in enumerate(entries):
                if done and _past(deadline):
                    return len(entries) - done
                left = await self._apply(lease, [entry])
            return left
        self._note_applied(entries)
        left = await self.log.ack(lease.thread_id, [entry.entry_id for entry in entries])
        lease.applied += len(entries)
        self.flushed_entries += len(entries)
        return left

    async def _refused(self, entry: LogEntry, exc: StateError) -> EntryStuck:
        """Record an entry the cold store refused for good, warning once per entry."""
        op = entry.op
        ns, checkpoint_id = (
            (op.checkpoint.checkpoint_ns, op.checkpoint.checkpoint_id)
            if isinstance(op, CheckpointPut)
            else (op.checkpoint_ns, op.checkpoint_id)
        )
        stuck = StuckEntry(
            thread_id=op.thread_id,
            entry_id=entry.entry_id,
            checkpoint_ns=ns,
            checkpoint_id=checkpoint_id,
            kind="put" if isinstance(op, CheckpointPut) else "writes",
            reason=f"{type(exc).__name__}: {exc}",
            since=0.0,  # the log's clock, as it records it
        )
        return await self._noted(stuck)

    async def _noted(self, stuck: StuckEntry) -> EntryStuck:
        """Record a stuck entry, warning once per entry."""
        failure = EntryStuck(stuck.thread_id, stuck.entry_id, stuck.checkpoint_id, stuck.reason)
        try:
            noted = await self.log.note_stuck(stuck)
        except BackendUnavailable as unrecorded:
            log.warning("%s (not recorded: %s)", failure, unrecorded)
        else:
            if noted:
                log.warning("%s", failure)
        return failure

    async def stuck(self) -> list[StuckEntry]:
        """The entries the cold store refused for good, one per thread, oldest first."""
        return await self.log.stuck()

    async def discard_stuck(self, thread_id: str, entry_id: str) -> list[LogEntry]:
        """Drop the thread's stuck entry `entry_id` (`NotStuck` unless it is recorded and
        still the oldest in the log), and every later entry that depends on it (`_dependents`:
        writes to a dropped checkpoint, a put on one or on one whose writes were dropped), so
        the cold store never receives a reference to a checkpoint it does not hold. Returns what
        was dropped, in order; the thread's other entries are left for the next flush.

        Appends go on meanwhile (a run on the thread is not told it is gone): the drop is one
        step with the cache's, made only if nothing was appended since the read (else read
        again, `DISCARD_READS` times at most: `DiscardOutpaced`), so a step on a dropped
        checkpoint is either dropped with it or, appended after, finds its parent nowhere
        (`HotStateLost`: the run resumes from the cold tier).
        Fenced as a flush is: the cold fence is raised first, so a flusher paused past its
        lock with these entries in its batch cannot store them after the drop (its cause
        fixed meanwhile), and the drop is made only while the lock is surely held (`LockLost`)."""
        recorded = {stuck.thread_id: stuck.entry_id for stuck in await self.log.stuck()}
        if recorded.get(thread_id) != entry_id:
            raise NotStuck(thread_id, entry_id)
        async with self._holding(thread_id, time.monotonic() + LOCK_WAIT_SECONDS) as lease:
            # Past every lock token granted so far, as a delete's (`discarding`).
            await self.store.fence_thread(thread_id, max(lease.fence, await self.log.fence_now()))
            for _ in range(DISCARD_READS):
                newest = await self.log.newest(thread_id)
                entries, damaged = await self._discard_view(thread_id, newest)
                if not entries or entries[0].entry_id != entry_id:
                    raise NotStuck(thread_id, entry_id)
                if damaged is not None and not damaged.checkpoint_id:
                    # Not even its checkpoint's id: any later entry of its namespace may
                    # depend on it.
                    ns = damaged.checkpoint_ns
                    dropped = [entries[0], *(e for e in entries[1:] if _namespace(e.op) == ns)]
                else:
                    dropped = _dependents(entries)
                lease.check()
                ids = [entry.entry_id for entry in dropped]
                dropping = self.log.drop_entries(
                    thread_id, ids, newest=newest, lock_token=lease.token
                )
                if await dropping is not None:
                    break
            else:
                raise DiscardOutpaced(thread_id, entry_id, DISCARD_READS)
        self._stuck_until.pop(thread_id, None)
        for entry in dropped:
            log.warning("discarded write-behind entry %s", described(entry))
        return dropped

    async def _discard_view(
        self, thread_id: str, newest: str | None
    ) -> tuple[list[LogEntry], LogEntryDamaged | None]:
        """The thread's log up to `newest` for a discard to choose from, a damaged entry as
        its stand-in (`_stand_in`): a read stops short of one, so it reads on past it (an
        entry beyond may depend on what is dropped). With the oldest entry's damage, if any."""
        entries: list[LogEntry] = []
        oldest: LogEntryDamaged | None = None
        after: str | None = None
        while newest is not None:
            try:
                read = await self.log.read(thread_id, count=ALL_LISTED, after=after)
            except LogEntryDamaged as damaged:
                oldest = oldest if entries else damaged
                read = [_stand_in(damaged)]
            except LogEntryLost:
                if not entries:
                    raise
                break  # the rest goes at the flush that meets it (`_drain_locked`)
            if not read:
                break
            entries += read
            if any(entry.entry_id == newest for entry in read):
                break  # not on after appends landing meanwhile: the drop refuses those
            after = read[-1].entry_id
        return entries, oldest

    def last_applied(self, thread_id: str, checkpoint_ns: str) -> str | None:
        """The id of the last checkpoint put of the (thread, namespace) this flusher applied
        to the cold tier, if it remembers one."""
        return self._applied_puts.get((thread_id, checkpoint_ns))

    def applied_writes(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str
    ) -> set[tuple[str, int]]:
        return self._applied_writes.get((thread_id, checkpoint_ns, checkpoint_id), set())

    def _note_applied(self, entries: list[LogEntry]) -> None:
        for entry in entries:
            if isinstance(entry.op, WritesPut):
                wkey = (entry.op.thread_id, entry.op.checkpoint_ns, entry.op.checkpoint_id)
                self._applied_writes.setdefault(wkey, set()).update(
                    (w.task_id, w.idx) for w in entry.op.writes
                )
                self._applied_writes.move_to_end(wkey)
                while len(self._applied_writes) > APPLIED_REMEMBERED:
                    self._applied_writes.popitem(last=False)
            if isinstance(entry.op, CheckpointPut):
                key = (entry.op.checkpoint.thread_id, entry.op.checkpoint.checkpoint_ns)
                self._applied_puts[key] = entry.op.checkpoint.checkpoint_id
                self._applied_puts.move_to_end(key)
        while len(self._applied_puts) > APPLIED_REMEMBERED:
            self._applied_puts.popitem(last=False)

    async def backlog(self) -> Backlog:
        return await self.log.backlog()

    # ----------------------------------------------------------------------- background

    def notify_from_thread(self, thread_id: str) -> None:
        """`notify` from a thread other than the loop's: the loop is woken only when its
        background pass waits for work; otherwise it takes the note at its next look."""
        self._appended_elsewhere.append((thread_id, time.monotonic()))
        loop = self._loop
        if self._waiting and loop is not None:
            self._waiting = False
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._wake.set)

    def _take_appended_elsewhere(self) -> bool:
        """Note the appends `notify_from_thread` queued; whether there were any."""
        taken = False
        while self._appended_elsewhere:
            thread_id, at = self._appended_elsewhere.popleft()
            self._note_own(thread_id, at)
            taken = True
        return taken

    def notify(self, thread_id: str) -> None:
        """This worker appended to the thread: drain soon."""
        self._note_own(thread_id, time.monotonic())
        self._wake.set()

    def _note_own(self, thread_id: str, now: float) -> None:
        self._own[thread_id] = now
        # Listed from now on for this worker's appends, not another's lingering ones.
        self._foreign.pop(thread_id, None)
        if len(self._own) > self._own_pruned_over:
            self._own = {t: at for t, at in self._own.items() if now - at < OWN_SECONDS}
            # Pruned again only once it doubled: with more threads than that unflushed (the
            # cold tier down under load), a scan per append would make appends quadratic.
            self._own_pruned_over = max(4 * LISTED_THREADS, 2 * len(self._own))

    def start(self) -> None:
        """Run in the background on the current loop until `stop` or `close`."""
        if self._task is None:
            self._closing = False
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self._run(), name="write-behind-flusher")

    async def stop(self, *, timeout_seconds: float = 5.0) -> None:
        """Stop the background task (its pass in progress finishes first, within the bound)."""
        if self._task is None:
            return
        # A flag, not only a cancel: a cancel that races a wake-up can be lost.
        self._closing = True
        self._wake.set()
        await asyncio.wait({self._task}, timeout=timeout_seconds)
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    async def close(self, *, final_drain_seconds: float = 5.0) -> None:
        """Stop the background task, then try to leave nothing behind (bounded)."""
        await self.stop(timeout_seconds=final_drain_seconds)
        try:
            await asyncio.wait_for(self.drain(), timeout=final_drain_seconds)
        except (TimeoutError, StateError) as exc:
            # Nothing is lost: the entries stay in the log for the next flusher.
            log.warning("write-behind backlog left for another flusher: %s", exc)

    async def _quiet(self) -> None:
        """Wait for appends to pause (or the bound), then clear the wake-up."""
        bound = time.monotonic() + WAKE_DELAY_MAX_SECONDS
        while True:
            self._wake.clear()
            await asyncio.sleep(min(WAKE_DELAY_SECONDS, max(0.0, bound - time.monotonic())))
            appended = self._take_appended_elsewhere() or self._wake.is_set()
            if self._closing or not appended or time.monotonic() >= bound:
                break
        self._wake.clear()

    async def _run(self) -> None:
        backoff = 0.0
        while not self._closing:
            await self._wait_for_work()
            if self._closing:
                return
            if self._wake.is_set():
                await self._quiet()
            try:
                _, cold_out = await self._drain(
                    limit=None, adopt_after=ADOPT_AFTER_SECONDS, unflushed_for=0.0
                )
            except Exception:
                # The loop must outlive any one failure; the entries wait in the log.
                log.exception("write-behind flush pass failed; retrying")
                await asyncio.sleep(POLL_SECONDS)
                continue
            if not cold_out:
                backoff = 0.0
                continue
            backoff = min(COLD_OUT_BACKOFF_MAX_SECONDS, max(COLD_OUT_BACKOFF_SECONDS, 2 * backoff))
            await self._backed_off(backoff)

    async def _wait_for_work(self) -> None:
        """Until an append wakes the pass, or POLL_SECONDS (others' work, left behind)."""
        # Published before the queue is looked at, so that an append queued after the look
        # sees it and wakes the loop.
        self._waiting = True
        try:
            if not self._take_appended_elsewhere():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SECONDS):
                        await self._wake.wait()
                if not self._take_appended_elsewhere():
                    return
            self._wake.set()
        finally:
            self._waiting = False

    async def _backed_off(self, seconds: float) -> None:
        """Wait `seconds` whatever appends come meanwhile, but not past `stop`; then pass."""
        deadline = time.monotonic() + seconds
        while not self._closing and (left := deadline - time.monotonic()) > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._wake.wait()
        self._wake.set()
