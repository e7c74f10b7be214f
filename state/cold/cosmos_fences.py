"""Flush fences on Cosmos: a write-behind batch from a flusher paused past its lock is refused.

One document per thread (`FENCE_ID`, in the thread's partition) holds the highest
flush-lock fencing token the thread was flushed or deleted under
(`state.checkpoint.flusher`). A fenced flush puts a replace of that document, with
If-Match on the ETag this process last saw and the batch's token, first in each of its
transactional batches: a batch whose token is older than the document's is refused before
anything is applied, and one racing another writer of the fence fails its If-Match and is
retried against the document as it now is. A thread whose fence this process has not
seen is tried with a create instead (a thread new to the cold tier, the common case,
so costs no read), which a document already there refuses the same way.
`delete_thread` under the lock raises the fence before it deletes and leaves the
document in place, so a late batch cannot bring a deleted thread back.

A step too large for a batch has its blocks and chunks written first, in unfenced
batches of their own (nothing reaches them until a document names them), and its own
documents (a checkpoint) in a fenced batch. Only a step whose own documents do not fit one (a checkpoint document
over the batch's size), or a task's writes, created or merged into a document already
stored, is fenced by a request of its own just before, which narrows the window without
closing it: such a late write can land after a delete, as an orphan no checkpoint names
(retention takes it with the partition). A refused batch leaves nothing behind but
blocks nothing reaches.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from azure.cosmos.exceptions import (
    CosmosAccessConditionFailedError,
    CosmosResourceExistsError,
    CosmosResourceNotFoundError,
)

from ..errors import StaleFencingToken, VersionConflict
from .cosmos_io import BatchOperation, BatchRefused, Doc, PartitionIO

FENCE_ID = "checkpoint-flush-fence"
FENCE_TYPE = "checkpoint_flush_fence"
# Fence ETags remembered (one per thread this process flushed lately).
REMEMBERED_FENCES = 10_000
# Reads of a fence another writer keeps moving, before giving up.
FENCE_ATTEMPTS = 5


class FlushFences:
    def __init__(self, io: PartitionIO) -> None:
        self._io = io
        # thread -> (token, ETag) of its fence document as this process last saw it.
        self._known: OrderedDict[str, tuple[int, str]] = OrderedDict()

    async def operation(self, thread_id: str, token: int, *, read: bool) -> BatchOperation:
        """The batch operation that moves the thread's fence to `token`, first in a
        fenced batch; raises `StaleFencingToken` if the fence is past `token` already.
        A fence this process has not seen is created unless `read` (a thread new to the
        cold tier, the common case, costs no request); one that exists refuses that."""
        current = await self._current(thread_id, read=read)
        if current is None:
            return ("create", (_fence_doc(thread_id, token),))
        fence, etag = current
        if fence > token:
            raise StaleFencingToken(thread_id, token, fence)
        return ("replace", (FENCE_ID, _fence_doc(thread_id, token)), {"if_match_etag": etag})

    async def batch(self, thread_id: str, token: int, operations: Sequence[BatchOperation]) -> bool:
        """`operations` as one transactional batch behind the fence's move to `token`;
        False if the service refused one of them (nothing applied)."""
        for attempt in range(FENCE_ATTEMPTS):
            fence = await self.operation(thread_id, token, read=attempt > 0)
            try:
                results = await self._io.batch(thread_id, [fence, *operations])
            except BatchRefused as refused:
                if refused.index != 0:
                    return False
                self._known.pop(thread_id, None)  # moved by another writer: read it
                continue
            self._remember(thread_id, results[0])
            return True
        raise VersionConflict(thread_id, None, None)

    async def move(self, thread_id: str, token: int, *, at_least: bool = False) -> None:
        """Move the fence to `token` in a request of its own. `at_least`: a fence already
        past it stays (a delete under the lock); otherwise that is `StaleFencingToken`."""
        for attempt in range(FENCE_ATTEMPTS):
            current = await self._current(thread_id, read=attempt > 0)
            doc = _fence_doc(thread_id, token)
            try:
                if current is None:
                    stored = await self._io.create(doc)
                else:
                    fence, etag = current
                    if fence > token:
                        if at_least:
                            return
                        raise StaleFencingToken(thread_id, token, fence)
                    stored = await self._io.replace(FENCE_ID, doc, etag=etag)
            except (
                CosmosResourceExistsError,
                CosmosAccessConditionFailedError,
                CosmosResourceNotFoundError,
            ):
                self._known.pop(thread_id, None)
                continue
            self._remember(thread_id, stored)
            return
        raise VersionConflict(thread_id, None, None)

    async def _current(self, thread_id: str, *, read: bool) -> tuple[int, str] | None:
        """(token, ETag) of the thread's fence as last seen here; unseen: read if `read`,
        else None (taken as absent)."""
        known = self._known.get(thread_id)
        if known is not None or not read:
            return known
        stored = await self._io.read(FENCE_ID, thread_id)
        return None if stored is None else self._remember(thread_id, stored)

    def _remember(self, thread_id: str, doc: Doc) -> tuple[int, str]:
        known = (int(doc["token"]), str(doc["_etag"]))
        self._known[thread_id] = known
        self._known.move_to_end(thread_id)
        while len(self._known) > REMEMBERED_FENCES:
            self._known.popitem(last=False)
        return known


def _fence_doc(thread_id: str, token: int) -> dict[str, Any]:
    return {"id": FENCE_ID, "thread_id": thread_id, "type": FENCE_TYPE, "token": token}
