"""The in-memory `ColdRetention` (tests/support/fakes.py) keeps the contract the real
backends keep for archive records (tests/contract/test_retention.py): an archive record
expires with its owner, or alone by its own age once no thread owns it."""

from __future__ import annotations

import os
import time

from state.size import ColdRecordArchive
from tests.support.fakes import MemoryCheckpointStore, MemoryColdStore, MemoryRetention

TTL = 3600


def archive_over(cold: MemoryColdStore) -> ColdRecordArchive:
    # A small item limit: a value of a few kilobytes is a head and chunk records.
    return ColdRecordArchive(cold, max_item_bytes=8192, compress_threshold_bytes=2048)


async def test_an_orphan_archive_record_expires_alone_and_is_counted_alone() -> None:
    cold = MemoryColdStore()
    retention = MemoryRetention(cold, MemoryCheckpointStore(), ttl_seconds=TTL)
    await archive_over(cold).archive("never-created", "big", os.urandom(10_000).hex())
    archives = set(cold.thread_ids())
    assert len(archives) >= 2
    told: list[str] = []

    async def expiring(thread_id: str) -> None:
        told.append(thread_id)

    swept = await retention.sweep(limit=100, now=time.time() + 2 * TTL, expiring=expiring)
    assert swept == len(archives)
    assert sorted(told) == sorted(archives)
    assert cold.thread_ids() == []


async def test_an_archive_write_does_not_keep_an_idle_owner() -> None:
    """Last activity is the owner's own (its record, its checkpoints), as on Cosmos (its
    partition) and Postgres (its record and checkpoints): a value archived since, whose
    record write never happened, neither keeps it nor survives it."""
    cold = MemoryColdStore()
    retention = MemoryRetention(cold, MemoryCheckpointStore(), ttl_seconds=TTL)
    await cold.create("idle", {"n": 0}, agent_id="a")
    cold.last_write["idle"] = time.time() - 2 * TTL
    await archive_over(cold).archive("idle", "big", os.urandom(10_000).hex())
    assert await retention.sweep(limit=100) == 1
    assert cold.thread_ids() == []
