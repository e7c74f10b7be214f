"""Retention in the Cosmos container (`ColdRetention`): a per-thread sweep, holds exempt.

Per-item TTL cannot keep a thread whole: an item expires by its own last
write, and a live thread's latest checkpoint names values written steps (or
weeks) before it, its record names offloaded and archived sections stored as
records under other ids. Refreshing every referenced item's `ttl` would cost
the write path requests it does not have (a put is one request). So the
container's default TTL is -1 (on, but nothing expires by itself:
`cosmos_client`, Bicep) and `sweep` expires whole threads, like Postgres's:

- a thread's last activity is the newest `_ts` (server time of the last
  write) of any item in its partition; it expires when that is more than
  STATE_COLD_TTL_SECONDS before `now`;
- what it deletes: checkpoints (newest first), then every other item, then
  the archive records `<thread>~archive~...` (offloaded and archived sections,
  `state.size`), heads before chunks, and the record last. Case ids are chosen
  by clients: a sweep stopped part-way leaves the record, so the id stays taken
  (a new case under it is refused as any taken id is) and no new case inherits
  what is left of the old one; deletes change no remaining item's `_ts`, so
  the next sweep finds the thread still expired and finishes it. Archive
  records never expire on their own: one whose owner has no item left (an
  offload whose record write failed) goes once it is itself older than the TTL;
- which threads it looks at: the items whose `_ts` falls in a time slice
  between a watermark (a document in partition `WATERMARK_PARTITION`) and the
  cutoff, oldest slice first. A live thread seen there is skipped: its newest
  item falls in a later slice and brings it back. So each tick reads only what
  crossed the cutoff since the last one, not every old item of every thread.
  Threads are looked at in order of their first item in the slice, so a tick
  cut short by `limit` or its deadline moves the watermark up to the first
  write of the thread it stopped at (every thread written before was settled)
  and the next tick goes on from there instead of looking at the same kept
  threads again, never reaching those behind them; an empty slice jumps to the
  next write, so a quiet stretch costs one query. A thread kept
  there because the caller spared it (`spare`) may never be written again: it
  gets a marker in the watermark's partition, as does one kept on the second look
  (`deleting` said no: its flush lock busy past the deadline), and each sweep looks
  first at the marked threads it does not spare (then drops the markers of those it
  deleted, or found written since or held).

`hold` writes one marker item into the thread's partition (`HOLD_ID`, `ttl: -1`);
the sweep spares a thread any of whose items carries `ttl: -1`. `release` removes
the marker's `ttl` (a patch, so a write: inactivity then counts from the
release). A hold is one request and a release two whatever the thread's size,
where patching every item cost a review case about 50 writes. The sweep deletes
the marker with its thread, and a marker left alone (its thread deleted while
held) once it is older than the TTL; a marker is no owner for archive records.
The flush fence a thread deleted under the write-behind flush lock leaves behind
(`cosmos_fences`) is treated as a lone marker is: no owner, deleted uncounted once
older than the TTL.
Only the sweep honours the marker: a container TTL, were one ever set as a
backstop, would expire a held thread's other items. Threads held by earlier
versions carry `ttl: -1` on every item instead; `release` clears those too (one
query when there are none), and the workflow record passes its `ttl` on to its
updates and audit entries (`cosmos_store`), so such a thread stays held whole
until then.

Not safe against a writer that returns to a thread while the sweep deletes it
(Cosmos has no transaction to lock it with): that needs a thread idle for a
whole TTL to resume within the milliseconds of its deletion. A sweep stopped
part-way widens that window for the owner alone, until the next sweep: its case
still reads, without its newest checkpoints (the older ones whole), and a run it
starts meanwhile goes on from the newest one left, which keeps the thread.

The partition is read page by page, keyed on the id (no continuation token is
held across writes), with the thread id in the query text: the local emulator
ignores the partition key option.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from ..size import ARCHIVE_SEPARATOR
from .cosmos_client import CosmosConnection
from .cosmos_fences import FENCE_ID, FlushFences
from .cosmos_io import BULK_PAGE_SIZE, PartitionIO, gather
from .cosmos_layout import CHECKPOINT
from .cosmos_store import WORKFLOW_ID

# Items of a thread held by an earlier version, released a page at a time.
PAGE_SIZE = 100
CONCURRENT_PATCHES = 16
HELD_TTL = -1
# Seconds of item history one sweep query reads at a time: bounds the thread ids
# a tick holds in memory when it catches up (first run, or after a pause).
SLICE_SECONDS = 3600
# Slices one sweep reads at most: a catch-up over a long history of live threads
# spreads over ticks instead of lengthening one.
SLICES_PER_SWEEP = 24
# The sweep's own bookkeeping, in a partition of its own.
WATERMARK_PARTITION = "~retention~sweep"
WATERMARK_ID = "watermark"
WATERMARK_TYPE = "retention_watermark"
# A thread `spare` kept in a slice the watermark then moved past: it may never be written
# again (a case the timer failed to resume, then done with), so its marker has the next
# sweeps look at it again.
SPARED_TYPE = "retention_spared"
# The hold marker, an item of the held thread's own partition.
HOLD_ID = "~retention~hold"
HOLD_TYPE = "retention_hold"
# Items a deleted thread leaves in its partition (the flush fence stays so that a late
# write-behind batch cannot bring the thread back): swept a TTL after their last write.
LEFT_BEHIND = (HOLD_ID, FENCE_ID)

HELD = "c.ttl = -1"
HELD_THE_OLD_WAY = f"{HELD} AND c.id != '{HOLD_ID}'"


class CosmosRetention:
    """`ColdRetention` on the Cosmos container shared through a `CosmosConnection`."""

    name = "cosmos"

    def __init__(self, connection: CosmosConnection, *, ttl_seconds: int) -> None:
        self._io = PartitionIO(connection)
        self._ttl_seconds = ttl_seconds
        self._fences = FlushFences(self._io)

    async def hold(self, thread_id: str) -> None:
        await self._io.upsert(
            {"id": HOLD_ID, "thread_id": thread_id, "type": HOLD_TYPE, "ttl": HELD_TTL}
        )

    async def release(self, thread_id: str) -> None:
        # Conditional: removing an absent `ttl` is an error (400), so an item a
        # concurrent or earlier release got to first fails the condition (412) instead.
        unheld = [{"op": "remove", "path": "/ttl"}]
        await self._io.patch(HOLD_ID, thread_id, unheld, only_if=f"FROM c WHERE {HELD}")
        # Not the marker: a hold taken again since the patch above stays.
        await self._patch_partition(
            thread_id, HELD_THE_OLD_WAY, unheld, only_if=f"FROM c WHERE {HELD}"
        )

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
        if self._ttl_seconds < 0 or limit <= 0:
            return 0
        cutoff = math.floor(time.time() if now is None else now) - self._ttl_seconds
        start = await self._watermark()
        if start is None:
            start = await self._oldest_ts(since=0)
        swept = 0
        # Still expired on the second look, but `deleting` said no (its flush lock busy
        # past the deadline, a backlog): nothing may ever write it again, so it is marked
        # as a thread in `spare` is. Not one found written since: the write brings it back.
        refused: set[str] = set()

        async def refuse(thread_id: str) -> None:
            refused.add(thread_id)
            if spared is not None:
                await spared(thread_id)

        for thread_id in await self._spared_earlier():
            if swept >= limit or (deadline is not None and time.monotonic() >= deadline):
                return swept
            if thread_id in spare:
                continue
            if await self._sweep_thread(thread_id, cutoff, expiring, deleting, spared, refuse):
                swept += 1
            if thread_id not in refused:
                # Kept (written since, or held): a write after the watermark brings it back.
                await self._io.delete(_spared_id(thread_id), WATERMARK_PARTITION)
        for _ in range(SLICES_PER_SWEEP):
            if start is None or start >= cutoff:
                break
            end = min(cutoff, start + SLICE_SECONDS)
            seen = await self._threads_in(start, end)
            kept: list[str] = []
            for thread_id, first in seen.items():
                if swept >= limit or (deadline is not None and time.monotonic() >= deadline):
                    # The rest of the slice next time: from this thread's first write (a
                    # thread first written in the same second as it is looked at again).
                    await gather([self._io.upsert(_spared_marker(t)) for t in kept])
                    await self._set_watermark(first)
                    return swept
                if thread_id in spare:
                    kept.append(thread_id)
                elif await self._sweep_thread(
                    thread_id, cutoff, expiring, deleting, spared, refuse
                ):
                    swept += 1
                if thread_id in refused:
                    kept.append(thread_id)
            await gather([self._io.upsert(_spared_marker(thread_id)) for thread_id in kept])
            # Past a quiet stretch in one step: the next slice starts at the next write.
            start = end if seen else await self._oldest_ts(since=end)
            await self._set_watermark(cutoff if start is None else min(start, cutoff))
        return swept

    # ----------------------------------------------------------------------- sweep steps

    async def _sweep_thread(
        self,
        thread_id: str,
        cutoff: int,
        expiring: Callable[[str], Awaitable[int | None]] | None,
        deleting: Callable[[str], Awaitable[bool]] | None,
        spared: Callable[[str], Awaitable[None]] | None,
        refused: Callable[[str], Awaitable[None]],
    ) -> bool:
        """Delete `thread_id` if it expired (True); archive records only as orphans. Kept on
        the second look, `spared` is told, or `refused` if `deleting` said no."""
        if thread_id == WATERMARK_PARTITION:
            return False
        owner, separator, _ = thread_id.partition(ARCHIVE_SEPARATOR)
        if separator:
            # Expires with its owner; alone only when the owner is gone (a hold marker
            # left behind is no owner).
            if await self._has_items(owner):
                return False
            last = await self._last_write(thread_id)
            if last is None or last >= cutoff:
                return False
            if expiring is not None:
                await expiring(thread_id)  # an archive record has no flush fence to raise
            if deleting is not None and not await deleting(thread_id):
                return await _kept(thread_id, refused)
            await self._io.delete_matching(thread_id, "true", {})
            return True
        last = await self._last_write(thread_id)
        if last is None or last >= cutoff:
            return False
        if not await self._has_items(thread_id):
            # Only the hold marker or the flush fence is left, its thread deleted (held or
            # not): no thread to keep, nor to count as swept.
            await gather([self._io.delete(doc_id, thread_id) for doc_id in LEFT_BEHIND])
            return False
        if await self._held(thread_id):
            return False
        fence = None if expiring is None else await expiring(thread_id)
        if fence is not None:
            await self._fences.move(thread_id, fence, at_least=True)
        # Looked at again now that a flush batch landing later is refused (the fence): a
        # step a run flushed (or wrote) since the first look, while `expiring` waited for
        # the thread's flush lock, spares the thread instead of being deleted once
        # acknowledged. (A write-through put or record write landing from here to the
        # delete is still the known limit.)
        last = await self._last_write(thread_id)
        if last is None:
            return False  # another sweep deleted it since the first look: that one counts it
        if last >= cutoff:
            return await _kept(thread_id, spared)
        if deleting is not None and not await deleting(thread_id):
            return await _kept(thread_id, refused)
        return await self._delete_thread(thread_id)

    async def _delete_thread(self, thread_id: str) -> bool:
        """Whether this call removed any of the thread's items: not when another sweep
        deleted it first (after the second look), which counts it instead."""
        # The record goes last (module docstring): until then the case id stays taken, so a
        # sweep stopped part-way never lets a new case, another caller's, list or resume
        # the checkpoints left. Checkpoints newest first, as delete_thread does: those a
        # stopped sweep leaves still have their parents, blobs and writes (their owner, who
        # let the case idle a TTL, can still read them), and the next sweep deletes them
        # (their `_ts` unchanged); in any other order a reader found a latest checkpoint
        # whose parent was gone.
        removed = bool(
            await self._io.delete_matching(
                thread_id,
                "c.type = @type",
                {"@type": CHECKPOINT},
                order_by="c.checkpoint_id DESC",
            )
        )
        # But the flush fence (`state.checkpoint.flusher`): a write-behind batch from a
        # flusher paused past its lock must not bring the thread back; the sweep a TTL
        # later takes it (see `_sweep_thread`).
        removed |= bool(
            await self._io.delete_matching(
                thread_id, "NOT ARRAY_CONTAINS(@kept, c.id)", {"@kept": [FENCE_ID, WORKFLOW_ID]}
            )
        )
        archives: set[str] = set()
        async for page in self._io.pages(
            "SELECT VALUE c.thread_id FROM c WHERE STARTSWITH(c.thread_id, @prefix)",
            {"@prefix": thread_id + ARCHIVE_SEPARATOR},
            partition=None,
            page_size=BULK_PAGE_SIZE,
        ):
            archives.update(str(found) for found in page)
        # A head `<ref>` is shorter than its chunks `<ref>~<n>`: never half-readable.
        for archive in sorted(archives, key=len):
            await self._io.delete_matching(archive, "true", {})
        return await self._io.delete(WORKFLOW_ID, thread_id) or removed

    async def _threads_in(self, start: int, end: int) -> dict[str, int]:
        """Threads with an item last written in [start, end), each with the `_ts` of its
        first such item, in that order."""
        seen: dict[str, int] = {}
        async for page in self._io.pages(
            "SELECT c.thread_id, c._ts FROM c WHERE c._ts >= @start AND c._ts < @end"
            " ORDER BY c._ts",
            {"@start": start, "@end": end},
            partition=None,
            page_size=BULK_PAGE_SIZE,
        ):
            for item in page:
                seen.setdefault(str(item["thread_id"]), int(item["_ts"]))
        return seen

    async def _last_write(self, thread_id: str) -> int | None:
        """`_ts` of the thread's newest item but its flush fence, or of the fence if that is
        all it has; None if it has nothing. The fence is no activity: a delete writes it
        too, so counting it would keep a thread a sweep stopped half-way through deleting
        (its checkpoints gone, its record not yet) for another TTL."""
        found = await self._io.query_all(
            "SELECT TOP 1 VALUE c._ts FROM c WHERE c.thread_id = @thread AND c.id != @fence"
            " ORDER BY c._ts DESC",
            {"@thread": thread_id, "@fence": FENCE_ID},
            partition=thread_id,
        )
        if not found:
            fence = await self._io.read(FENCE_ID, thread_id)
            return None if fence is None else int(fence["_ts"])
        return int(found[0])

    async def _has_items(self, thread_id: str) -> bool:
        """Whether the thread stores anything besides a hold marker and a flush fence."""
        found = await self._io.query_all(
            "SELECT TOP 1 VALUE c.id FROM c WHERE c.thread_id = @thread"
            " AND NOT ARRAY_CONTAINS(@left, c.id)",
            {"@thread": thread_id, "@left": list(LEFT_BEHIND)},
            partition=thread_id,
        )
        return bool(found)

    async def _held(self, thread_id: str) -> bool:
        found = await self._io.query_all(
            f"SELECT TOP 1 VALUE c.id FROM c WHERE c.thread_id = @thread AND {HELD}",
            {"@thread": thread_id},
            partition=thread_id,
        )
        return bool(found)

    async def _oldest_ts(self, *, since: int) -> int | None:
        """The oldest `_ts` at or after `since` in the whole container."""
        found = [
            ts
            async for page in self._io.pages(
                "SELECT TOP 1 VALUE c._ts FROM c WHERE c._ts >= @since ORDER BY c._ts",
                {"@since": since},
                partition=None,
                page_size=1,
            )
            for ts in page
        ]
        return int(min(found)) if found else None

    async def _watermark(self) -> int | None:
        doc = await self._io.read(WATERMARK_ID, WATERMARK_PARTITION)
        return None if doc is None else int(doc["swept_to"])

    async def _spared_earlier(self) -> list[str]:
        """The threads an earlier sweep spared in a slice it moved past."""
        found = await self._io.query_all(
            "SELECT VALUE c.spared FROM c WHERE c.thread_id = @thread AND c.type = @type",
            {"@thread": WATERMARK_PARTITION, "@type": SPARED_TYPE},
            partition=WATERMARK_PARTITION,
        )
        return [str(thread_id) for thread_id in found]

    async def _set_watermark(self, swept_to: int) -> None:
        # Two sweepers may race: a watermark set back a little only means a slice
        # is read twice, and sweeping is idempotent.
        await self._io.upsert(
            {
                "id": WATERMARK_ID,
                "thread_id": WATERMARK_PARTITION,
                "type": WATERMARK_TYPE,
                "swept_to": swept_to,
            }
        )

    async def _patch_partition(
        self,
        thread_id: str,
        condition: str,
        operations: list[dict[str, Any]],
        *,
        only_if: str | None = None,
    ) -> None:
        after = ""
        # An item deleted meanwhile, or already in the wanted state, is skipped.
        while ids := await self._io.ids_after(thread_id, condition, after, limit=PAGE_SIZE):
            await gather(
                [
                    self._io.patch(item_id, thread_id, operations, only_if=only_if)
                    for item_id in ids
                ],
                limit=CONCURRENT_PATCHES,
            )
            after = ids[-1]


async def _kept(thread_id: str, spared: Callable[[str], Awaitable[None]] | None) -> bool:
    """False (the thread kept), once `spared` was told."""
    if spared is not None:
        await spared(thread_id)
    return False


def _spared_id(thread_id: str) -> str:
    # Hashed: a thread id may hold characters an item id may not.
    return "spared~" + hashlib.sha256(thread_id.encode()).hexdigest()


def _spared_marker(thread_id: str) -> dict[str, Any]:
    return {
        "id": _spared_id(thread_id),
        "thread_id": WATERMARK_PARTITION,
        "type": SPARED_TYPE,
        "spared": thread_id,
    }
