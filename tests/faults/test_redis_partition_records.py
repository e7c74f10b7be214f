"""Workflow records (`TieredStateStore`) under a partition of one worker from Redis.

Worker A reaches Redis through a proxy the test cuts, worker B directly. A's writes
while cut go to the cold tier alone (no intent can be registered), so Redis keeps the
older copy of the record, which B is served. Once the cut heals, that copy must go
(as the checkpoint cache's does, tests/integration/test_hot_copy_after_partition.py),
not linger until A happens to read again or the hot TTL (a day) runs out.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest

from devstack import RedisServer
from state.errors import BackendUnavailable
from state.factory import backends_for
from state.settings import Settings
from state.tiered import HOT_RETRY_AFTER_SECONDS, TieredStateStore

from .proxy import LoopbackProxy

DROPPED_WITHIN_SECONDS = 5.0


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_a_record_written_while_cut_off_is_not_served_stale_once_redis_answers(
    backend: str,
    settings_for: Callable[..., Settings],
    redis_server: Callable[..., RedisServer],
) -> None:
    server = redis_server()
    proxy = LoopbackProxy(server.port).start()
    try:
        direct = settings_for(backend, redis_url=f"redis://127.0.0.1:{server.port}/0")
        cut_off = settings_for(backend, redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        async with backends_for(cut_off) as a_tiers, backends_for(direct) as b_tiers:
            a = TieredStateStore.from_backends(a_tiers)
            b = TieredStateStore.from_backends(b_tiers)
            try:
                thread_id = f"partition-record-{uuid.uuid4().hex[:10]}"
                created = await a.create(thread_id, {"status": "awaiting_review"}, agent_id="t")
                seen = await b.get(thread_id)  # cached in Redis
                assert seen is not None and seen.version == created.version

                proxy.cut("reset")
                written = await a.update_section(
                    thread_id,
                    "status",
                    "completed",
                    expected_version=created.version,
                    agent_id="t",
                )  # acknowledged: the cold tier has it
                proxy.restore()
                # A stays idle from here (no read of its own that would settle the thread).

                deadline = time.monotonic() + DROPPED_WITHIN_SECONDS
                versions: list[int] = []
                statuses: list[object] = []
                while time.monotonic() < deadline:
                    found = await b.get(thread_id)
                    assert found is not None
                    versions.append(found.version)
                    statuses.append(found.sections["status"])
                    if found.version == written.version:
                        break
                    await asyncio.sleep(0.1)
                assert versions[-1] == written.version, (
                    f"worker B was served version {versions[-1]} (status "
                    f"{statuses[-1]!r}) for {len(versions)} reads over "
                    f"{DROPPED_WITHIN_SECONDS}s after the cut healed; cold has {written.version}"
                )
            finally:
                await a.close()
                await b.close()
    finally:
        proxy.stop()


async def test_reads_while_the_cold_tier_is_out_too_do_not_each_retry_the_unsettled(
    settings_for: Callable[..., Settings],
    redis_server: Callable[..., RedisServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread written while Redis was cut off waits to be settled from cold; with the
    cold tier out of reach as well, a worker's reads of other threads (served from Redis)
    must not each start a pass that retries it: one cold read per read, before."""
    server = redis_server()
    proxy = LoopbackProxy(server.port).start()
    try:
        cut_off = settings_for("postgres", redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        async with backends_for(cut_off) as tiers:
            store = TieredStateStore.from_backends(tiers)
            try:
                prefix = f"settle-backoff-{uuid.uuid4().hex[:10]}"
                served, left = f"{prefix}-served", f"{prefix}-left"
                await store.create(served, {"status": "running"}, agent_id="t")
                created = await store.create(left, {"status": "running"}, agent_id="t")
                proxy.cut("reset")
                await store.update_section(
                    left, "status", "completed", expected_version=created.version, agent_id="t"
                )  # acknowledged by the cold tier; Redis keeps the older copy: unsettled
                cold_reads = 0

                async def cold_out_of_reach(thread_id: str) -> None:
                    nonlocal cold_reads
                    cold_reads += 1
                    raise BackendUnavailable("postgres", "out of reach (test)")

                monkeypatch.setattr(tiers.cold, "get", cold_out_of_reach)
                proxy.restore()
                await asyncio.sleep(HOT_RETRY_AFTER_SECONDS + 0.2)  # Redis used again
                reads = 0
                started = time.monotonic()
                while time.monotonic() - started < 2.0:
                    found = await store.get(served)
                    assert found is not None
                    reads += 1
                    await asyncio.sleep(0.02)
                assert reads >= 50
                # Passes back off from 0.25 s, doubling: a handful in ~3 s, not one a read.
                assert cold_reads <= 8
            finally:
                await store.close()
    finally:
        proxy.stop()
