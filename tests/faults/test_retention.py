"""Retention per tier: Redis TTL, a per-thread sweep of the cold tier; review cases never expire.

The hot tier's TTL is observed directly (the copy expires, the record does
not, and the next read refills it). The cold tier expires whole threads in
the timer's sweep on both backends, judged against a clock the test
controls: Postgres rows are backdated; Cosmos items carry the server's `_ts`,
so the sweep is given a `now` past them (and the container's own TTL must
expire nothing: the local emulator would not show it if it did).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence

import psycopg
import pytest

from devstack import RedisServer
from state.cold import cosmos_io
from state.cold.cosmos_client import CosmosConnection
from state.cold.cosmos_fences import FENCE_ID
from state.cold.cosmos_io import PartitionIO
from state.cold.cosmos_layout import CHECKPOINT
from state.cold.cosmos_store import WORKFLOW_ID
from state.errors import BackendUnavailable
from state.factory import backends_for
from state.hot.redis_client import create_redis_client
from state.hot.redis_store import RedisHotStore
from state.ports import Caller
from state.settings import Settings
from state.tiered import TieredStateStore
from support_cases.models import CaseStatus
from support_cases.service import CaseConflict
from tests.support.cosmos import drop_container, next_second, partition_of

from .apps import open_runtime, review_case, submission
from .conftest import Recorder

HOT_TTL = 2
COLD_TTL = 3600


@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_hot_tier_ttl(
    backend: str, settings_for: Callable[..., Settings], reliability: Recorder
) -> None:
    settings = settings_for(backend, state_hot_ttl_seconds=HOT_TTL)
    lost = 0
    async with backends_for(settings) as backends:
        store = TieredStateStore.from_backends(backends)
        hot = backends.hot
        assert isinstance(hot, RedisHotStore)
        raw = create_redis_client(settings)
        thread_id = f"ttl-{backend}-{uuid.uuid4().hex[:8]}"
        await store.create(thread_id, {"n": 0}, agent_id="ttl")
        after_create = await raw.ttl(hot.key(thread_id))
        await store.update_section(thread_id, "n", 1, agent_id="ttl")
        after_update = await raw.ttl(hot.key(thread_id))
        await asyncio.sleep(HOT_TTL + 1)
        expired = await hot.get(thread_id) is None
        record = await store.get(thread_id)  # served from cold, then cached again
        if record is None or record.sections != {"n": 1}:
            lost += 1
        refilled = await raw.ttl(hot.key(thread_id))
        await raw.aclose()
        await backends.cold.delete(thread_id)

    reliability.record(
        f"Retention: Redis TTL ({backend})",
        injected=f"STATE_HOT_TTL_SECONDS={HOT_TTL}; waited past it",
        runs=1,
        lost_writes=lost,
        silent_overwrites=0,
        observed=f"TTL {after_create} s on install, {after_update} s after a section update; "
        f"hot copy {'expired' if expired else 'still there'}; cold record intact and "
        f"re-cached with TTL {refilled} s",
    )
    assert 0 < after_create <= HOT_TTL and 0 < after_update <= HOT_TTL
    assert expired and lost == 0 and 0 < refilled <= HOT_TTL


async def last_write(settings: Settings, *thread_ids: str) -> int:
    """The newest `_ts` (server seconds) among the threads' items."""
    stamps = [item["_ts"] for t in thread_ids for item in await partition_of(settings, t)]
    return int(max(stamps))


async def test_cosmos_sweep_spares_cases_awaiting_review(
    settings_for: Callable[..., Settings],
    redis_server: Callable[..., RedisServer],
    reliability: Recorder,
) -> None:
    container_name = f"retention-{uuid.uuid4().hex[:8]}"
    # A container of its own (the sweep reads all of it) and so a Redis of its own:
    # hot-tier keys name only the thread, and other containers hold the same ids.
    settings = settings_for(
        "cosmos",
        state_cold_ttl_seconds=COLD_TTL,
        cosmos_container=container_name,
        redis_url=redis_server().url,
    )
    suffix = uuid.uuid4().hex[:8]
    waiting, done, idle = f"ret-review-{suffix}", f"ret-done-{suffix}", f"ret-idle-{suffix}"
    try:
        async with open_runtime(settings) as app:
            service, backends = app.runtime.service, app.runtime.backends
            await review_case(app, waiting)
            await service.submit(submission(done), None)
            await service.wait_idle()
            waiting_items = len(await partition_of(settings, waiting))
            done_items = len(await partition_of(settings, done))
            # A TTL past both cases' last write: by their age, both have expired.
            first = await last_write(settings, waiting, done)
            swept = await backends.retention.sweep(limit=100, now=first + COLD_TTL + 1)
            waiting_left = len(await partition_of(settings, waiting))
            kept = await backends.checkpoints.get_checkpoint(waiting, "", None) is not None
            done_left = await items_but_fence(settings, done)
            # A thread last written a second before the review's writes (and past the
            # first sweep's cutoff): the sweep at the case's TTL takes it and keeps the
            # case. The app's own threads the review writes (run index shards) land in
            # whichever seconds the run takes, so the sweep's count alone says nothing.
            await next_second(first)
            await backends.cold.create(idle, {}, agent_id="retention-test")
            await next_second(await last_write(settings, idle))
            # Kept means usable: the review resumes the case, which ends the hold.
            decided = await app.decide(waiting, "approve", "retention-reviewer")
            await service.wait_idle()
            final = (await service.status(waiting)).status
            last = await last_write(settings, waiting)
            decided_items = await items_but_fence(settings, waiting)
            swept_early = await backends.retention.sweep(limit=100, now=last + COLD_TTL)
            kept_early = await items_but_fence(settings, waiting)
            idle_left = await items_but_fence(settings, idle)
            swept_after = await backends.retention.sweep(limit=100, now=last + COLD_TTL + 1)
            decided_left = await items_but_fence(settings, waiting)
        connection = CosmosConnection(settings.cosmos)
        try:
            container = await connection.container()
            default_ttl = (await container.read()).get("defaultTtl")
        finally:
            await connection.close()
        reliability.record(
            "Retention: Cosmos sweep, case awaiting review exempt",
            injected=f"STATE_COLD_TTL_SECONDS={COLD_TTL}; one completed case, one awaiting "
            f"review; the sweep run {COLD_TTL + 1} s after their last write, then again "
            "after the review approved the waiting one",
            runs=2,
            lost_writes=0 if kept and waiting_left == waiting_items else 1,
            silent_overwrites=0,
            observed=f"container defaultTtl {default_ttl} (nothing expires by itself); sweep "
            f"deleted {swept} threads (the app's own among them): waiting case {waiting_left}/{waiting_items} items "
            f"kept, completed case {done_left}/{done_items} left (but its flush fence, which "
            "goes a TTL later); after the review "
            f"({final.value}) kept at its TTL ({kept_early}/{decided_items} items; "
            f"{swept_early} swept, a thread idle 1 s longer among them, {idle_left} of its "
            f"items left), deleted 1 s later ({swept_after} swept with the app's threads, "
            f"{decided_left} items left)",
        )
        assert default_ttl == -1
        # Besides the completed case: the app's own threads (run index shards, provider
        # ledgers) written as long ago.
        assert swept >= 1 and done_left == 0
        assert kept and waiting_left == waiting_items
        assert decided.accepted and final is CaseStatus.COMPLETED
        assert kept_early == decided_items > 0 and swept_early >= 1 and idle_left == 0
        assert swept_after >= 1 and decided_left == 0
    finally:
        await drop_container(settings)


@pytest.mark.parametrize("stop", ["amid-checkpoints", "amid-other-items", "at-the-last-item"])
async def test_cosmos_a_sweep_stopped_part_way_leaves_no_case_to_another_caller(
    stop: str,
    settings_for: Callable[..., Settings],
    redis_server: Callable[..., RedisServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Case ids are the client's: a sweep that stops part-way through an expired case (a
    delete refused, the worker gone) must not let another caller's new case under that id
    list or resume what is left of the old one (the record used to go first, so the id
    was free while the old checkpoints stayed, and the new case's history showed them).
    The id stays taken instead, and the next sweep deletes the rest."""
    monkeypatch.setattr(cosmos_io, "DELETE_BATCH", 1)  # an item per delete: a stop anywhere
    settings = settings_for(
        "cosmos",
        state_cold_ttl_seconds=COLD_TTL,
        cosmos_container=f"retention-{uuid.uuid4().hex[:8]}",
        redis_url=redis_server().url,
    )
    case_id = f"ret-stopped-{uuid.uuid4().hex[:8]}"
    owner, other = Caller("owner-id", "Owner"), Caller("other-id", "Other")
    try:
        async with open_runtime(settings) as app:
            service, backends = app.runtime.service, app.runtime.backends
            await service.submit(submission(case_id), None, owner)
            await service.wait_idle()
            items = await partition_of(settings, case_id)
            # The case's items but its flush fence (which a deleted thread keeps).
            kinds = {item["id"]: item.get("type") for item in items if item["id"] != FENCE_ID}
            old_checkpoints = {
                item["checkpoint_id"] for item in items if item.get("type") == CHECKPOINT
            }
            checkpoint_items = sum(kind == CHECKPOINT for kind in kinds.values())
            assert len(old_checkpoints) > 2
            now = await last_write(settings, case_id) + COLD_TTL + 1
            deleted: list[str] = []
            delete_ids, delete = PartitionIO.delete_ids, PartitionIO.delete

            def stopping(doc_id: str) -> None:
                """Refuses the delete where the sweep is to stop (other threads go on)."""
                if doc_id in deleted:
                    return  # `delete_ids` deleting it one request at a time (no batches here)
                checkpoints = sum(kinds.get(gone) == CHECKPOINT for gone in deleted)
                if (
                    (stop == "amid-checkpoints" and checkpoints == 2)
                    or (
                        stop == "amid-other-items"
                        and checkpoints == checkpoint_items
                        and len([gone for gone in deleted if gone != WORKFLOW_ID])
                        == checkpoints + 1
                    )
                    or (stop == "at-the-last-item" and len(deleted) == len(kinds) - 1)
                ):
                    raise BackendUnavailable("cosmos", "refused (injected)")
                deleted.append(doc_id)

            async def failing_ids(io: PartitionIO, partition: str, ids: Sequence[str]) -> None:
                if partition == case_id:
                    for doc_id in ids:
                        stopping(doc_id)
                await delete_ids(io, partition, ids)

            async def failing_delete(io: PartitionIO, doc_id: str, partition: str) -> bool:
                if partition == case_id:
                    stopping(doc_id)
                return await delete(io, doc_id, partition)

            monkeypatch.setattr(PartitionIO, "delete_ids", failing_ids)
            monkeypatch.setattr(PartitionIO, "delete", failing_delete)
            with pytest.raises(BackendUnavailable):
                await backends.retention.sweep(limit=100, now=now)
            monkeypatch.setattr(PartitionIO, "delete_ids", delete_ids)
            monkeypatch.setattr(PartitionIO, "delete", delete)
            assert deleted, "the sweep stopped before deleting anything of the case"
            try:
                await service.submit(submission(case_id), None, other)
            except CaseConflict:
                refused = True
            else:
                await service.wait_idle()
                refused = False
            if not refused:
                seen = {
                    view.checkpoint_id
                    for view in (await service.history(case_id, limit=1000)).checkpoints
                }
                assert not seen & old_checkpoints, (
                    f"another caller's new case lists {len(seen & old_checkpoints)} "
                    "checkpoints of the old one"
                )
            assert refused, "the new case took the id, so the next sweep cannot finish the old"
            # The owner meanwhile still reads its case (what the sweep left of it).
            assert (await service.status(case_id)).submitted_by is not None
            assert await backends.retention.sweep(limit=100, now=now) >= 1
            assert await items_but_fence(settings, case_id) == 0
    finally:
        await drop_container(settings)


async def items_but_fence(settings: Settings, thread_id: str) -> int:
    """The thread's items but its flush fence: a deleted thread keeps that for a TTL, so a
    late write-behind batch cannot bring it back (`state.retention`)."""
    return sum(item["id"] != FENCE_ID for item in await partition_of(settings, thread_id))


async def backdate_postgres(url: str, seconds: int) -> None:
    """Every thread's activity `seconds` into the past: the sweep reads the server's clock."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE workflow_records SET updated_at = updated_at - make_interval(secs => %s)",
            (seconds,),
        )
        await conn.execute(
            "UPDATE cp_checkpoints SET created_at = created_at - make_interval(secs => %s)",
            (seconds,),
        )


async def test_postgres_sweep_spares_cases_awaiting_review(
    settings_for: Callable[..., Settings], fresh_postgres_url: str, reliability: Recorder
) -> None:
    # A database of its own: the sweep deletes every expired thread it finds.
    settings = settings_for(
        "postgres", state_cold_ttl_seconds=COLD_TTL, postgres_url=fresh_postgres_url
    )
    suffix = uuid.uuid4().hex[:8]
    waiting, done = f"ret-review-{suffix}", f"ret-done-{suffix}"
    async with open_runtime(settings) as app:
        service = app.runtime.service
        await review_case(app, waiting)
        await service.submit(submission(done), None)
        await service.wait_idle()
        await backdate_postgres(fresh_postgres_url, 2 * COLD_TTL)
        swept = await service.sweep_expired()
        cold = app.runtime.backends
        kept = await cold.cold.get(waiting) is not None
        kept_checkpoint = await cold.checkpoints.get_checkpoint(waiting, "", None) is not None
        removed = await cold.cold.get(done) is None
        removed_checkpoint = await cold.checkpoints.get_checkpoint(done, "", None) is None
        # Kept means usable: the held case still resumes from what the sweep left.
        decided = await app.decide(waiting, "approve", "retention-reviewer")
        await service.wait_idle()
        final = (await service.status(waiting)).status
    reliability.record(
        "Retention: Postgres sweep, case awaiting review exempt",
        injected=f"STATE_COLD_TTL_SECONDS={COLD_TTL}; one completed case, one awaiting review; "
        f"every row backdated {2 * COLD_TTL} s, then the timer's sweep",
        runs=2,
        lost_writes=0 if kept and kept_checkpoint else 1,
        silent_overwrites=0,
        observed=f"sweep deleted {swept} threads; waiting case "
        f"{'kept' if kept and kept_checkpoint else 'EXPIRED'} and {final.value} after the "
        f"review; completed case {'removed' if removed and removed_checkpoint else 'kept'}",
    )
    assert kept and kept_checkpoint and removed and removed_checkpoint
    assert decided.accepted and final is CaseStatus.COMPLETED
