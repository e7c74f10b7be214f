"""Retention over both tiers: a thread the cold sweep expires is forgotten by Redis too.

The cold sweep (`ColdRetention`, one per backend) deletes a thread's cold state only.
Left alone, Redis would go on serving what it held of the thread (its record, its
latest checkpoint) until its hot TTL, and a run continuing from that checkpoint
would write children whose ancestors the sweep deleted: a chain that no longer
rebuilds (a DeltaChannel's history, a value stored at an ancestor). A write-behind
backlog the sweep did not see would be flushed onto the deleted thread the same way.

So when the sweep finds a thread expired (while nothing else can write it: on
Postgres its record is locked), `TieredRetention` does to the hot tier what
`delete_thread` does, in two steps. First the cached record goes (the first Redis
call: if Redis cannot be reached, the sweep stops before deleting the thread, and the
next one tries again), the thread's flush lock is taken and appends are refused from
then until the sweep ends (a run writing meanwhile is told `ThreadExpiring`: nothing
reaches the log that a flusher could apply onto the deleted thread; a thread the sweep
then spares is let go as soon as it is), and the thread's flush fence is raised past
every lock token granted before (a batch of a flusher paused past its lock is refused;
the fence stays a TTL longer). The sweep then looks
at the thread again, and spares it if a run resumed it meanwhile (a step it flushed
before the lock was taken, or a backlog the log still holds): its backlog stays, the
run's acknowledged steps that were not flushed yet with it. Only for a thread still
expired, just before its deletion, the cached checkpoints go, then the backlog, then
the event log. A reader
that caches the thread again from the cold tier before the deletion is undone once
the sweep ends: the caches of every thread it forgot are dropped again (best effort:
a failure is logged). So that such a failure (Redis cut) cannot leave a reader's fill
served once Redis is back, the checkpoints' drop before the deletion fences off fills
of what the thread held then, as delete_thread's does, and the drop at the end lifts
that fence (one it could not lift lapses with the hot TTL). An archive record
(`<thread>~archive~...`) has only a cached record to forget. A thread whose flush lock another process holds (a second sweeper, a
stuck flusher) is waited for until the sweep's deadline at most (LOCK_WAIT_SECONDS
without one), then spared: left whole in both tiers (but for its cached record) to the
next sweep, so a timer tick ends in time.

Known limit: a sweep stopped by a failure part-way leaves the threads it did not
delete whole in the cold tier, but what it forgot of them is forgotten: a backlog it
discarded is lost as if Redis had lost it (a run then resumes from its last cold
checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING

from langgraph.checkpoint.base.id import uuid6

from .errors import BackendUnavailable, FlushLockBusy
from .ports import CheckpointCache, ColdRetention, EventLog, HotStateStore
from .size import ARCHIVE_SEPARATOR

if TYPE_CHECKING:
    from .checkpoint.flusher import Flusher

log = logging.getLogger(__name__)


class TieredRetention:
    """`ColdRetention` whose sweep also forgets each expiring thread's hot state."""

    def __init__(
        self,
        cold: ColdRetention,
        *,
        records: HotStateStore,
        checkpoints: CheckpointCache | None,
        flusher: Flusher | None,
        events: EventLog | None,
    ) -> None:
        self._cold = cold
        self._records = records
        self._checkpoints = checkpoints
        self._flusher = flusher
        self._events = events
        self.name = cold.name

    async def hold(self, thread_id: str) -> None:
        await self._cold.hold(thread_id)

    async def release(self, thread_id: str) -> None:
        await self._cold.release(thread_id)

    async def sweep(
        self,
        *,
        limit: int,
        now: float | None = None,
        expiring: Callable[[str], Awaitable[int | None]] | None = None,
        spare: Collection[str] = (),
        deadline: float | None = None,
        deleting: Callable[[str], Awaitable[bool]] | None = None,
        spared: Callable[[str], Awaitable[None]] | None = None,
    ) -> int:
        forgotten: list[str] = []
        # Each forgotten thread's flush lock and refusal, by thread: held until the sweep has
        # deleted (Postgres commits a batch at once), but a spared thread's are let go as
        # soon as it is spared, so its run writes on instead of waiting out the sweep.
        refused: dict[str, contextlib.AsyncExitStack] = {}
        # Threads whose flush lock the sweep could not take in time: spared.
        busy: set[str] = set()
        # The fill fence each deleted thread's checkpoint drop set, for the last drop to lift.
        fences: dict[str, str] = {}
        try:
            async with contextlib.AsyncExitStack() as held:

                async def forget(thread_id: str) -> int | None:
                    told = None if expiring is None else await expiring(thread_id)
                    refused[thread_id] = await held.enter_async_context(contextlib.AsyncExitStack())
                    try:
                        fence = await self._forget(thread_id, refused[thread_id], deadline)
                    except FlushLockBusy:
                        # Held past the sweep's deadline (another sweeper, a stuck flusher):
                        # spared, untouched but for its cached record, for the next sweep.
                        busy.add(thread_id)
                        return told
                    forgotten.append(thread_id)
                    return fence if told is None else max(fence or 0, told)

                async def delete(thread_id: str) -> bool:
                    if thread_id in busy or await self._resumed(thread_id):
                        return False
                    if deleting is not None and not await deleting(thread_id):
                        return False
                    await self._delete(thread_id, fences)
                    return True

                async def kept(thread_id: str) -> None:
                    await refused.pop(thread_id).aclose()
                    if spared is not None:
                        await spared(thread_id)

                return await self._cold.sweep(
                    limit=limit,
                    now=now,
                    expiring=forget,
                    deleting=delete,
                    spare=spare,
                    deadline=deadline,
                    spared=kept,
                )
        finally:
            for thread_id in forgotten:
                await self._drop_cached(thread_id, fences.get(thread_id))

    async def _forget(
        self, thread_id: str, held: contextlib.AsyncExitStack, deadline: float | None
    ) -> int | None:
        """The flush fence the deletion must raise, if the thread has a backlog to guard.
        The backlog stays (`_delete` drops it): the sweep may yet spare the thread. Its
        flush lock waited for until `deadline` at most (`FlushLockBusy`)."""
        await self._records.invalidate(thread_id)
        if ARCHIVE_SEPARATOR in thread_id or self._flusher is None:
            return None
        return await held.enter_async_context(self._flusher.refusing(thread_id, deadline=deadline))

    async def _resumed(self, thread_id: str) -> bool:
        """Whether the thread has a backlog, found under the flush lock with appends refused
        since the first look: a run's acknowledged steps the cold tier has not seen yet (it
        resumed the thread just before), which the second look cannot see either."""
        if ARCHIVE_SEPARATOR in thread_id or self._flusher is None:
            return False
        return await self._flusher.log.pending(thread_id)

    async def _delete(self, thread_id: str, fences: dict[str, str]) -> None:
        """The thread's hot state, once the sweep has looked again and is deleting it; the
        fill fence its checkpoints' drop sets goes into `fences` (`_drop_cached` lifts it)."""
        if ARCHIVE_SEPARATOR in thread_id:
            return
        # Before the backlog goes: a cached checkpoint whose log is gone would be a parent
        # for a run's next put, should the sweep stop before deleting the thread. Strict:
        # a copy Redis may still serve must not outlive the cold delete.
        if self._checkpoints is not None:
            # Kept before the drop: should a later step fail (the backlog's discard, the
            # cold delete), the thread stays and the fence must still be lifted at the end.
            fences[thread_id] = str(uuid6(clock_seq=-1))
            await self._checkpoints.invalidate(
                thread_id, strict=True, deleted_at=fences[thread_id], fence_fills=True
            )
        if self._flusher is not None:
            await self._flusher.discard_refused(thread_id)
        if self._events is not None:
            await self._events.delete(thread_id)

    async def _drop_cached(self, thread_id: str, fence: str | None) -> None:
        try:
            await self._records.invalidate(thread_id)
            if self._checkpoints is not None and ARCHIVE_SEPARATOR not in thread_id:
                if fence is None:
                    await self._checkpoints.invalidate(thread_id)
                else:
                    # Marked as the drop after delete_thread's is: what a reader filled
                    # meanwhile (its lease too) goes, and the fence with it.
                    await self._checkpoints.invalidate(
                        thread_id, deleted_at=str(uuid6(clock_seq=-1)), lift_fence=fence
                    )
        except BackendUnavailable as exc:
            log.warning("the hot copy of expired %r may outlive it: %s", thread_id, exc)
