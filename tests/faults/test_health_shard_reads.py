"""Health's look at the run index's shards is one set of reads per process at a time:
probes arriving while those reads are slow (a cold tier answering late) wait on them
rather than each starting eight more, which would pile connections onto a tier already
struggling."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from support_cases.runs import INDEX_IDS

from .test_run_index_repair import opened, own_store  # noqa: F401 (a fixture)


@pytest.mark.parametrize("own_store", ["postgres"], indirect=True)
async def test_probes_during_slow_shard_reads_share_them(
    own_store: dict[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with opened(own_store) as runtime:
        store = runtime.service._tracker._store
        real_get_fresh = store.get_fresh
        reads: list[str] = []
        answer = asyncio.Event()

        async def slow(thread_id: str, **kwargs: Any) -> Any:
            if thread_id in INDEX_IDS:
                reads.append(thread_id)
                await answer.wait()
            return await real_get_fresh(thread_id, **kwargs)

        monkeypatch.setattr(store, "get_fresh", slow)
        first = await asyncio.gather(*(runtime.service.health() for _ in range(3)))
        later = await runtime.service.health()
        # Not known within the probes' bound, and one read of each shard all the same.
        assert [view.damaged_index_shards for view in [*first, later]] == [[], [], [], []]
        assert sorted(reads) == sorted(INDEX_IDS)

        answer.set()
        # Joined, not read again: the reads in flight answer this call too, and are kept.
        assert await runtime.service._tracker.damaged_shards() == []
        assert (await runtime.service.health()).damaged_index_shards == []
        assert sorted(reads) == sorted(INDEX_IDS)


@pytest.mark.parametrize("own_store", ["postgres"], indirect=True)
async def test_shard_reads_still_under_way_end_with_the_service(
    own_store: dict[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reads a probe gave up on do not outlive the service that started them (pending as its
    stores close, or as the event loop ends)."""
    async with opened(own_store) as runtime:
        store = runtime.service._tracker._store
        started = asyncio.Event()

        async def unanswered(thread_id: str, **kwargs: Any) -> Any:
            started.set()
            await asyncio.Event().wait()

        monkeypatch.setattr(store, "get_fresh", unanswered)
        reading = asyncio.ensure_future(runtime.service._tracker.damaged_shards())
        await started.wait()
        reading.cancel()  # the probe's wait ran out
        await runtime.service.close()
        shared = runtime.service._tracker._damaged_reading
        assert shared is not None and shared.done()
