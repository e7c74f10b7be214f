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

import asyncio
from typing import Any

from azure.cosmos.aio import ContainerProxy
from azure.cosmos.exceptions import CosmosAccessConditionFailedError, CosmosResourceNotFoundError

from .cosmos_client import CosmosConnection, cosmos_errors

PAGE_SIZE = 100
CONCURRENT_PATCHES = 16
HELD_TTL = -1

_PAGE = (
    "SELECT TOP @n VALUE c.id FROM c WHERE c.thread_id = @thread_id AND c.id > @after"
    " AND ({condition}) ORDER BY c.id"
)
# `ttl` undefined compares as undefined, not as "not -1": hence the IS_DEFINED test.
NOT_HELD = "NOT IS_DEFINED(c.ttl) OR c.ttl != -1"
HELD = "c.ttl = -1"


class CosmosRetention:
    """`ColdRetention` on the Cosmos container shared through a `CosmosConnection`."""

    name = "cosmos"

    def __init__(self, connection: CosmosConnection) -> None:
        self._connection = connection

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
        container = await self._connection.container()
        limit = asyncio.Semaphore(CONCURRENT_PATCHES)

        async def patch(item_id: str) -> None:
            async with limit:
                try:
                    with cosmos_errors():
                        await container.patch_item(
                            item_id,
                            partition_key=thread_id,
                            patch_operations=operations,
                            filter_predicate=only_if,
                            no_response=True,
                            response_hook=self._connection.response_hook,
                        )
                except (CosmosResourceNotFoundError, CosmosAccessConditionFailedError):
                    pass  # deleted meanwhile, or already in the wanted state

        after = ""
        while ids := await self._page(container, thread_id, condition, after):
            await asyncio.gather(*(patch(item_id) for item_id in ids))
            after = ids[-1]

    async def _page(
        self, container: ContainerProxy, thread_id: str, condition: str, after: str
    ) -> list[str]:
        with cosmos_errors():
            return [
                str(item_id)  # a VALUE query yields the ids themselves
                async for item_id in container.query_items(
                    _PAGE.format(condition=condition),
                    parameters=[
                        {"name": "@n", "value": PAGE_SIZE},
                        {"name": "@thread_id", "value": thread_id},
                        {"name": "@after", "value": after},
                    ],
                    partition_key=thread_id,
                    response_hook=self._connection.response_hook,
                )
            ]
