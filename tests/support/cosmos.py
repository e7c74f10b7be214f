"""What the Cosmos adapters stored, read straight from the container (any suite's tests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from azure.core.pipeline.transport import AsyncHttpTransport

from state.cold.cosmos_checkpoints import CosmosCheckpointStore
from state.cold.cosmos_client import CosmosConnection
from state.cold.cosmos_store import CosmosStateStore
from state.settings import Settings


async def partition(connection: CosmosConnection, thread_id: str) -> list[dict[str, Any]]:
    """Every item of the thread's logical partition, as stored."""
    container = await connection.container()
    return [
        item
        async for item in container.query_items(
            "SELECT * FROM c WHERE c.thread_id = @t",
            parameters=[{"name": "@t", "value": thread_id}],
            partition_key=thread_id,
        )
    ]


async def partition_of(settings: Settings, thread_id: str) -> list[dict[str, Any]]:
    """`partition` over a connection of its own (closed before returning)."""
    connection = CosmosConnection(settings.cosmos)
    try:
        return await partition(connection, thread_id)
    finally:
        await connection.close()


async def next_second(ts: int) -> None:
    """Wait until the server's `_ts` of a new write is past `ts` (it counts whole seconds)."""
    await asyncio.sleep(max(0.0, ts + 1.05 - time.time()))


async def drop_container(settings: Settings) -> None:
    """Delete the settings' container (one a test created for itself)."""
    connection = CosmosConnection(settings.cosmos)
    try:
        container = await connection.container()
        database = connection._client.get_database_client(settings.cosmos_database)  # type: ignore[union-attr]
        await database.delete_container(container)
    finally:
        await connection.close()


@asynccontextmanager
async def stores_over(
    settings: Settings, transport: AsyncHttpTransport
) -> AsyncIterator[tuple[CosmosConnection, CosmosStateStore, CosmosCheckpointStore]]:
    """The record and checkpoint stores of `settings`, set up, on one connection whose
    requests go through `transport` (a test's faulty or limit-enforcing one)."""
    connection = CosmosConnection(settings.cosmos, transport=transport)
    cold = CosmosStateStore(connection, max_item_bytes=settings.state_max_item_bytes)
    checkpoints = CosmosCheckpointStore(
        connection,
        max_item_bytes=settings.state_max_item_bytes,
        compress_threshold_bytes=settings.state_compress_threshold_bytes,
    )
    try:
        await cold.setup()
        await checkpoints.setup()
        yield connection, cold, checkpoints
    finally:
        await connection.close()


async def rewrite_record(settings: Settings, thread_id: str, **fields: Any) -> None:
    """Set `fields` of the thread's workflow record as stored (damage written by hand),
    over a connection of its own."""
    connection = CosmosConnection(settings.cosmos)
    try:
        container = await connection.container()
        record = await container.read_item("wf", partition_key=thread_id)
        await container.replace_item("wf", {**record, **fields})
    finally:
        await connection.close()
