"""Retention over both tiers: a thread the cold sweep expires is forgotten by Redis too.

The cold sweep (`ColdRetention`, one per backend) deletes a thread's cold state only.
Left alone, Redis would go on serving what it held of the thread (its record, its
latest checkpoint) until its hot TTL, and a run continuing from that checkpoint
would write children whose ancestors the sweep deleted: a chain that no longer
rebuilds (a DeltaChannel's history, a value stored at an ancestor). A write-behind
backlog the sweep did not see would be flushed onto the deleted thread the same way.
So for each thread the sweep deleted, `TieredRetention` does what `delete_thread`
does to the hot tier: the backlog is discarded under the flush lock and the cold
flush fence raised (`Flusher.delete_thread`, which deletes the cold checkpoints
again: nothing, unless a run wrote in between), then the cached checkpoints, the
cached record and the thread's event log are dropped.

Known limit, as for the cold sweep alone: a run that writes in the instant between
the cold deletion and this forgetting can still lose that write. A failure to reach
Redis stops the sweep (the timer logs it and sweeps again on its next tick); the
threads already deleted keep their hot state until it expires, and an unflushed
backlog (no TTL) until Redis lets it be flushed, onto the deleted thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .ports import CheckpointCache, ColdRetention, EventLog, HotStateStore

if TYPE_CHECKING:
    from .checkpoint.flusher import Flusher


class TieredRetention:
    """`ColdRetention` whose sweep also forgets each deleted thread's hot state."""

    def __init__(
        self,
        cold: ColdRetention,
        *,
        records: HotStateStore | None,
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
        deleted: Callable[[str], Awaitable[None]] | None = None,
    ) -> int:
        async def forget(thread_id: str) -> None:
            await self._forget(thread_id)
            if deleted is not None:
                await deleted(thread_id)

        return await self._cold.sweep(limit=limit, now=now, deleted=forget)

    async def _forget(self, thread_id: str) -> None:
        if self._flusher is not None:
            await self._flusher.delete_thread(thread_id)
        if self._checkpoints is not None:
            await self._checkpoints.invalidate(thread_id)
        if self._records is not None:
            await self._records.invalidate(thread_id)
        if self._events is not None:
            await self._events.delete(thread_id)
