"""Retention in the Cosmos container (`ColdRetention`): the service expires, a hold exempts.

Every item without a `ttl` of its own expires STATE_COLD_TTL_SECONDS after its
last write: that is the container's default TTL (Bicep sets it in Azure,
`create_if_missing` locally). So there is nothing to sweep. `hold` patches
`ttl: -1` (never expires) onto every item of the thread's partition; `release`
removes it again, and since a patch is a write, the default TTL then counts
from the release.

Items written while a thread is held: the workflow record keeps its `ttl`
across updates and every audit entry takes the record's (`cosmos_store`), so
the record and its ledger stay exempt. Checkpoint documents are not: callers
hold a thread once its writer has stopped (the app holds a case as its run
stops for review, after the run's last checkpoint), and a run that starts
again afterwards ends by holding again or by releasing.

The partition is read page by page, keyed on the id (no continuation token is
held across writes), with the thread id in the query text: the local emulator
ignores the partition key option.
"""

from __future__ import annotations

from typing import Any

from .cosmos_client import CosmosConnection
from .cosmos_io import PartitionIO, gather

PAGE_SIZE = 100
CONCURRENT_PATCHES = 16
HELD_TTL = -1

# `ttl` undefined compares as undefined, not as "not -1": hence the IS_DEFINED test.
NOT_HELD = "NOT IS_DEFINED(c.ttl) OR c.ttl != -1"
HELD = "c.ttl = -1"


class CosmosRetention:
    """`ColdRetention` on the Cosmos container shared through a `CosmosConnection`."""

    name = "cosmos"

    def __init__(self, connection: CosmosConnection) -> None:
        self._io = PartitionIO(connection)

    async def hold(self, thread_id: str) -> None:
        await self._patch_partition(
            thread_id, NOT_HELD, [{"op": "set", "path": "/ttl", "value": HELD_TTL}]
        )

    async def release(self, thread_id: str) -> None:
        # Conditional: removing an absent `ttl` is an error (400), so an item a
        # concurrent or earlier release got to first fails the condition (412) instead.
        await self._patch_partition(
            thread_id, HELD, [{"op": "remove", "path": "/ttl"}], only_if=f"FROM c WHERE {HELD}"
        )

    async def sweep(self, *, limit: int) -> int:
        """Nothing to do: Cosmos deletes expired items itself."""
        return 0

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
