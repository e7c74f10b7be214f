"""Retention per tier: Redis TTL, Cosmos per-item TTL, a Postgres sweep; review cases never expire.

The hot tier's TTL is observed directly (the copy expires, the record does
not, and the next read refills it). Cosmos TTL is enforced by the service, not
by the local emulator, so what the container and each item carry is
inspected instead: a case interrupted for human review must be exempt (item
`ttl` -1) from the container's default TTL. Postgres expires nothing itself:
the timer's sweep does, and rows are backdated so the test controls the clock.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from devstack import RedisServer
from state.cold.cosmos_client import CosmosConnection
from state.factory import backends_for
from state.hot.redis_client import create_redis_client
from state.hot.redis_store import RedisHotStore
from state.settings import Settings
from state.tiered import TieredStateStore
from support_cases.models import CaseStatus

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


async def cosmos_items(settings: Settings, thread_id: str) -> list[dict[str, Any]]:
    connection = CosmosConnection(settings)
    try:
        container = await connection.container()
        return [
            item
            async for item in container.query_items(
                "SELECT * FROM c WHERE c.thread_id = @t",
                parameters=[{"name": "@t", "value": thread_id}],
                partition_key=thread_id,
            )
        ]
    finally:
        await connection.close()


async def test_cosmos_item_ttl_spares_cases_awaiting_review(
    settings_for: Callable[..., Settings],
    redis_server: Callable[..., RedisServer],
    reliability: Recorder,
) -> None:
    container_name = f"retention-{uuid.uuid4().hex[:8]}"
    # A container of its own (created with the default TTL) and so a Redis of its own:
    # hot-tier keys name only the thread, and other containers hold the same ids.
    settings = settings_for(
        "cosmos",
        state_cold_ttl_seconds=COLD_TTL,
        cosmos_container=container_name,
        redis_url=redis_server().url,
    )
    suffix = uuid.uuid4().hex[:8]
    waiting, done = f"ret-review-{suffix}", f"ret-done-{suffix}"
    try:
        async with open_runtime(settings) as app:
            await review_case(app, waiting)
            await app.runtime.service.submit(submission(done), None)
            await app.runtime.service.wait_idle()
            waiting_items = await cosmos_items(settings, waiting)
            done_items = await cosmos_items(settings, done)
            # The review ends the hold: the case completes and its items expire again.
            decided = await app.decide(waiting, "approve", "retention-reviewer")
            await app.runtime.service.wait_idle()
            final = (await app.runtime.service.status(waiting)).status
            decided_items = await cosmos_items(settings, waiting)
        connection = CosmosConnection(settings)
        try:
            container = await connection.container()
            default_ttl = (await container.read()).get("defaultTtl")
        finally:
            await connection.close()
        exempt = [item for item in waiting_items if item.get("ttl") == -1]
        # An item without its own `ttl` follows the container's default.
        expiring_done = [item for item in done_items if (item.get("ttl", default_ttl) or -1) > 0]
        still_exempt = [item for item in decided_items if "ttl" in item]
        reliability.record(
            "Retention: Cosmos per-item TTL, case awaiting review exempt",
            injected=f"container default TTL {COLD_TTL} s; one completed case, one awaiting "
            "review, then approved",
            runs=2,
            # Nothing is lost yet (the emulator does not expire items): the risk is reported.
            lost_writes=0,
            silent_overwrites=0,
            observed=f"container defaultTtl {default_ttl}; {len(exempt)}/{len(waiting_items)} "
            f"items of the waiting case exempt (ttl -1); {len(expiring_done)}/{len(done_items)} "
            f"items of the completed case expire; after the review ({final.value}) "
            f"{len(still_exempt)}/{len(decided_items)} items of that case keep an own ttl",
        )
        assert default_ttl == COLD_TTL
        assert waiting_items and len(exempt) == len(waiting_items)
        assert done_items and len(expiring_done) == len(done_items)
        assert decided.accepted and final is CaseStatus.COMPLETED
        assert len(decided_items) > len(waiting_items) and still_exempt == []
    finally:
        connection = CosmosConnection(settings)
        try:
            container = await connection.container()
            database = connection._client.get_database_client(settings.cosmos_database)  # type: ignore[union-attr]
            await database.delete_container(container)
        finally:
            await connection.close()


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
