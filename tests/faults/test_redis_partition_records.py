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
from state.factory import backends_for
from state.settings import Settings
from state.tiered import TieredStateStore

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
