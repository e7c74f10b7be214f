"""Writing one section of a case record through the state library, safely under concurrency.

Billing and account run in parallel and write different sections of the same
record, and the runner's heartbeat writes a third; every writer uses optimistic
concurrency, so a `VersionConflict` only means "someone else wrote first". The
writer re-reads and retries: correct because each section has a single owner
and its new value is recomputed from the record just read.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from state import (
    JSON,
    SectionWrite,
    StateTooLarge,
    TieredStateStore,
    VersionConflict,
    WorkflowNotFound,
    WorkflowRecord,
)

MAX_ATTEMPTS = 25

# `compute` gets the current record and returns the section's new value, or
# UNCHANGED when the record already holds what it should (nothing is written).
UNCHANGED = object()
Compute = Callable[[WorkflowRecord], object]
# Several sections at once: the writes the record still needs (empty: none).
ComputeMany = Callable[[WorkflowRecord], list[SectionWrite]]


async def write_section(
    store: TieredStateStore,
    thread_id: str,
    section: str,
    compute: Compute,
    *,
    agent_id: str,
    fencing_token: int | None = None,
    current: WorkflowRecord | None = None,
) -> WorkflowRecord:
    """Apply `compute` to the latest record and store the result as `section`.

    `current`: a record the caller just got back from its own write, tried first
    instead of reading again (a conflict re-reads as usual).
    Raises `WorkflowNotFound` / `StaleFencingToken` as the store does; gives up
    with the last `VersionConflict` only after MAX_ATTEMPTS contended tries.
    """
    for attempt in range(MAX_ATTEMPTS):
        record = current if attempt == 0 and current is not None else await store.get(thread_id)
        if record is None:
            raise WorkflowNotFound(thread_id)
        value = compute(record)
        if value is UNCHANGED:
            return record
        try:
            return await store.update_section(
                thread_id,
                section,
                value,
                agent_id=agent_id,
                expected_version=record.version,
                fencing_token=fencing_token,
            )
        except VersionConflict:
            if attempt == MAX_ATTEMPTS - 1:
                raise
            # Jittered backoff lets the other writer's hot-tier update land before we re-read.
            await asyncio.sleep(random.uniform(0.002, 0.01) * (attempt + 1))
    raise AssertionError("unreachable")


async def set_section(
    store: TieredStateStore,
    thread_id: str,
    section: str,
    value: JSON,
    *,
    agent_id: str,
    fencing_token: int | None = None,
    current: WorkflowRecord | None = None,
) -> WorkflowRecord:
    """Store `value` as `section`; a re-run that finds the same value writes nothing."""

    def compute(record: WorkflowRecord) -> object:
        return UNCHANGED if record.sections.get(section) == value else value

    return await write_section(
        store,
        thread_id,
        section,
        compute,
        agent_id=agent_id,
        fencing_token=fencing_token,
        current=current,
    )


async def write_sections(
    store: TieredStateStore,
    thread_id: str,
    compute: ComputeMany,
    *,
    fencing_token: int | None = None,
) -> WorkflowRecord:
    """`write_section` for several sections in one record write, each audited under its
    own writer. A record the cold store refuses as too large with all of them
    (`StateTooLarge`) takes them one by one, each offloaded as it needs."""
    for attempt in range(MAX_ATTEMPTS):
        record = await store.get(thread_id)
        if record is None:
            raise WorkflowNotFound(thread_id)
        writes = compute(record)
        if not writes:
            return record
        try:
            return await store.update_sections(
                thread_id, writes, expected_version=record.version, fencing_token=fencing_token
            )
        except StateTooLarge:
            for write in writes:
                record = await set_section(
                    store,
                    thread_id,
                    write.section,
                    write.value,
                    agent_id=write.agent_id,
                    fencing_token=fencing_token,
                )
            return record
        except VersionConflict:
            if attempt == MAX_ATTEMPTS - 1:
                raise
            await asyncio.sleep(random.uniform(0.002, 0.01) * (attempt + 1))
    raise AssertionError("unreachable")
