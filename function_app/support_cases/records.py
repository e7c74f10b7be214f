"""Writing one section of a case record through the state library, safely under concurrency.

Billing and account run in parallel and write different sections of the same
record, and the runner's heartbeat writes a third; every writer uses optimistic
concurrency, so a `VersionConflict` only means "someone else wrote first". The
writer re-reads and retries: correct because each section has a single owner
and its new value is recomputed from the record just read.

Writers of one record in one process take turns (`_turn`): read, compute and write
under a per-record lock, so the parallel agents of a run never conflict with each
other. A conflict costs a refused cold write and fresh reads from the cold tier (the
hot copy is not trusted past a refused write); waiting for the other writer's few
milliseconds costs nothing. Writers in other processes still meet optimistic
concurrency as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import weakref
from collections.abc import AsyncIterator, Callable

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

# Per (event loop, record): an asyncio lock serves one loop. Kept only while a writer
# is inside `_turn` or waiting for it.
_turns: weakref.WeakValueDictionary[tuple[int, str], asyncio.Lock] = weakref.WeakValueDictionary()


@contextlib.asynccontextmanager
async def _turn(thread_id: str) -> AsyncIterator[None]:
    key = (id(asyncio.get_running_loop()), thread_id)
    lock = _turns.get(key)
    if lock is None:
        lock = _turns[key] = asyncio.Lock()
    async with lock:
        yield


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
    fresh: bool = False,
) -> WorkflowRecord:
    """Apply `compute` to the latest record and store the result as `section`.

    `current`: a record the caller just got back from its own write, tried first
    instead of reading again (a conflict re-reads as usual). `fresh`: an `UNCHANGED`
    computed on a hot copy is computed again on the cold tier's record, for a compute
    whose `UNCHANGED` must be true of the record itself (a stale copy writes nothing, so
    no conflict would correct it); a change is written as usual (a stale copy conflicts).
    Raises `WorkflowNotFound` / `StaleFencingToken` as the store does; gives up
    with the last `VersionConflict` only after MAX_ATTEMPTS contended tries.
    """
    for attempt in range(MAX_ATTEMPTS):
        try:
            async with _turn(thread_id):
                if attempt == 0 and current is not None:
                    record = current
                else:
                    found = await store.get(thread_id)
                    if found is None:
                        raise WorkflowNotFound(thread_id)
                    record = found
                value = compute(record)
                if value is UNCHANGED and fresh:
                    found = await store.get_fresh(thread_id)
                    if found is None:
                        raise WorkflowNotFound(thread_id)
                    record = found
                    value = compute(record)
                if value is UNCHANGED:
                    return record
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
    fresh: bool = False,
    current: WorkflowRecord | None = None,
) -> WorkflowRecord:
    """`write_section` for several sections in one record write, each audited under its
    own writer. A record the cold store refuses as too large with all of them
    (`StateTooLarge`) is written again in one write, computed anew, with those sections
    offloaded (and the record's largest other ones, if it is still refused). `fresh`:
    compute on the cold tier's record, never a hot copy (a compute that refuses by
    raising). `current`: a record the caller just read, tried first instead of reading
    again, as for `write_section` (not with `fresh`)."""
    offload = False
    for attempt in range(MAX_ATTEMPTS):
        try:
            async with _turn(thread_id):
                if attempt == 0 and current is not None and not fresh:
                    found: WorkflowRecord | None = current
                else:
                    found = await (store.get_fresh(thread_id) if fresh else store.get(thread_id))
                if found is None:
                    raise WorkflowNotFound(thread_id)
                writes = compute(found)
                if not writes:
                    return found
                return await store.update_sections(
                    thread_id,
                    writes,
                    expected_version=found.version,
                    fencing_token=fencing_token,
                    offloaded=offload,
                    make_room=offload,
                )
        except StateTooLarge:
            if offload:
                raise  # even with the record's other sections moved out
            # Still one write, computed again on the record it goes on (what another writer
            # stored meanwhile stays, a compute that refuses still refuses), with the
            # sections it writes offloaded.
            offload = True
        except VersionConflict:
            if attempt == MAX_ATTEMPTS - 1:
                raise
            await asyncio.sleep(random.uniform(0.002, 0.01) * (attempt + 1))
    raise AssertionError("unreachable")
