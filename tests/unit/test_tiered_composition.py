"""`TieredStateStore`'s cache-aside and write-intent protocol over the in-memory fakes of the
ports: every race of the state.tiered docstring staged step by step, in milliseconds.

The fakes keep the ports' contracts (tests/contract runs the same cases on them and on
the real servers), so what these tests prove is the composition's own logic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from state import tiered
from state.errors import (
    BackendUnavailable,
    LockNotAcquired,
    StaleFencingToken,
    VersionConflict,
    WorkflowNotFound,
)
from state.ports import JSON, WorkflowRecord
from state.tiered import TieredStateStore
from tests.support.fakes import MemoryColdStore, MemoryHotStore, memory_settings, unreachable

THREAD = "case_8842"
# A write intent's deadline: short, so a dead writer's intent expires within a test, and
# long enough that a live one outlasts a loaded machine's stall (at 50 ms, a reader 60 ms
# late found a held writer's intent expired and cleared it).
LOCK_TTL_MS = 500


class GatedColdStore(MemoryColdStore):
    """A cold store whose next `get` or `update_section` can be held at a gate: the call
    does its work, then waits (a reply in flight), or raises after committing (`die`)."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, asyncio.Event] = {}
        self.reached: dict[str, asyncio.Event] = {}
        self.die_after: set[str] = set()

    def hold(self, operation: str) -> asyncio.Event:
        self.gates[operation] = asyncio.Event()
        self.reached[operation] = asyncio.Event()
        return self.gates[operation]

    async def _pass(self, operation: str) -> None:
        if operation in self.die_after:
            self.die_after.discard(operation)
            raise asyncio.CancelledError  # the writer's process is gone
        gate = self.gates.pop(operation, None)
        if gate is not None:
            self.reached.pop(operation).set()
            await gate.wait()

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        found = await super().get(thread_id)
        await self._pass("get")
        return found

    async def update_section(self, thread_id: str, section: str, value: JSON, **kw: Any) -> Any:
        written = await super().update_section(thread_id, section, value, **kw)
        await self._pass("update_section")
        return written


@pytest.fixture
def cold() -> GatedColdStore:
    return GatedColdStore()


@pytest.fixture
def hot() -> MemoryHotStore:
    return MemoryHotStore()


@pytest.fixture
async def store(cold: GatedColdStore, hot: MemoryHotStore) -> AsyncIterator[TieredStateStore]:
    composed = TieredStateStore(cold, hot, memory_settings(state_lock_ttl_ms=LOCK_TTL_MS))
    yield composed
    await composed.close()


@pytest.fixture
def no_hot_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hot tier is tried again on the next call after a failure."""
    monkeypatch.setattr(tiered, "HOT_RETRY_AFTER_SECONDS", 0.0)


async def test_a_miss_reads_cold_and_installs_so_the_next_read_is_a_hit(
    store: TieredStateStore, cold: GatedColdStore, hot: MemoryHotStore
) -> None:
    await cold.create(THREAD, {"intake": "charged twice"}, agent_id="intake")
    first = await store.get(THREAD)
    reads = cold.requests["get"]
    assert await store.get(THREAD) == first
    assert cold.requests["get"] == reads  # served by the hot tier
    assert (store.stats.misses, store.stats.hits) == (1, 1)
    assert await hot.get(THREAD) == first


async def test_a_write_goes_to_cold_first_then_replaces_the_hot_copy(
    store: TieredStateStore, cold: GatedColdStore, hot: MemoryHotStore
) -> None:
    await store.create(THREAD, {"billing": None}, agent_id="intake")
    written = await store.update_section(THREAD, "billing", {"refund": 640}, agent_id="billing")
    assert written.version == 2
    assert await cold.get(THREAD) == written
    assert await hot.get(THREAD) == written
    assert await store.get(THREAD) == written


async def test_a_reader_never_installs_what_it_read_before_a_newer_write(
    store: TieredStateStore, cold: GatedColdStore, hot: MemoryHotStore
) -> None:
    await cold.create(THREAD, {"s": "v1"}, agent_id="a")
    gate = cold.hold("get")
    reader = asyncio.create_task(store.get(THREAD))  # misses, reads v1 from cold, waits
    await cold.reached["get"].wait()
    newer = await store.update_section(THREAD, "s", "v2", agent_id="a", expected_version=1)
    gate.set()
    stale = await reader
    assert stale is not None and stale.sections == {"s": "v1"}  # what it read, as is
    assert store.stats.installs_rejected == 1  # ...but never installed over v2
    assert await hot.get(THREAD) == newer
    assert await store.get(THREAD) == newer


async def test_a_write_in_flight_hides_the_hot_copy_from_readers(
    store: TieredStateStore, cold: GatedColdStore, hot: MemoryHotStore
) -> None:
    await store.create(THREAD, {"s": "v1"}, agent_id="a")
    gate = cold.hold("update_section")
    writer = asyncio.create_task(store.update_section(THREAD, "s", "v2", agent_id="a"))
    await cold.reached["update_section"].wait()  # committed in cold, reply not back yet
    # The hot copy (v1) is hidden: readers go to cold, which already has v2.
    seen = await store.get(THREAD)
    assert seen is not None and seen.sections == {"s": "v2"}
    assert store.stats.pending == 1
    assert (await hot.read(THREAD)).pending  # a reader's install keeps a live intent
    gate.set()
    await writer
    assert (await hot.get(THREAD)) == await cold.get(THREAD)


async def test_a_writer_dead_after_its_commit_is_served_from_cold_then_healed(
    store: TieredStateStore, cold: GatedColdStore, hot: MemoryHotStore
) -> None:
    await store.create(THREAD, {"s": "v1"}, agent_id="a")
    cold.die_after.add("update_section")
    with pytest.raises(asyncio.CancelledError):
        await store.update_section(THREAD, "s", "v2", agent_id="a")
    # Its intent outlives it: the stale v1 copy is never served.
    early = await store.get(THREAD)
    assert early is not None and early.sections == {"s": "v2"}
    assert (await hot.read(THREAD)).pending
    await asyncio.sleep(2 * LOCK_TTL_MS / 1000)
    # Past the deadline a reader clears the dead intent with what cold holds.
    assert await store.get(THREAD) == early
    assert await hot.get(THREAD) == early


async def test_a_conflict_refreshes_the_hot_copy_so_a_retry_reads_cold(
    store: TieredStateStore, cold: GatedColdStore, hot: MemoryHotStore
) -> None:
    await store.create(THREAD, {"s": "v1"}, agent_id="a")
    # Another process wrote cold and died before installing: hot still holds v1.
    behind_our_back = await cold.update_section(THREAD, "s", "v2", expected_version=1, agent_id="b")
    with pytest.raises(VersionConflict):
        await store.update_section(THREAD, "s", "v3", agent_id="a", expected_version=1)
    assert await hot.get(THREAD) == behind_our_back
    retried = await store.update_section(THREAD, "s", "v3", agent_id="a")
    assert retried.version == 3


@pytest.mark.parametrize("refusal", ["stale-fence", "gone"])
async def test_a_write_refused_before_writing_leaves_no_hidden_entry(
    store: TieredStateStore, cold: GatedColdStore, hot: MemoryHotStore, refusal: str
) -> None:
    record = await store.create(THREAD, {"s": "v1"}, agent_id="a")
    if refusal == "stale-fence":
        record = await store.update_section(THREAD, "s", "v2", agent_id="a", fencing_token=9)
        with pytest.raises(StaleFencingToken):
            await store.update_section(THREAD, "s", "zombie", agent_id="z", fencing_token=3)
        assert await hot.get(THREAD) == record  # intent gone, copy servable at once
    else:
        await cold.delete(THREAD)
        with pytest.raises(WorkflowNotFound):
            await store.update_section(THREAD, "s", "v2", agent_id="a", expected_version=1)
        hot_read = await hot.read(THREAD)
        assert (hot_read.record, hot_read.pending) == (None, False)  # no copy outlives cold
        assert await store.get(THREAD) is None


async def test_a_new_record_under_an_old_thread_id_is_not_hidden_by_the_old_copy(
    store: TieredStateStore, cold: GatedColdStore, hot: MemoryHotStore
) -> None:
    await store.create(THREAD, {"s": "old"}, agent_id="a")
    for version in (1, 2):
        await store.update_section(THREAD, "s", f"old-{version}", agent_id="a")
    await cold.delete(THREAD)  # retention, say: the hot copy (v3) is still there
    fresh = await store.create(THREAD, {"s": "new"}, agent_id="b")
    assert fresh.version == 1
    assert await store.get(THREAD) == fresh


async def test_with_the_hot_tier_down_calls_are_served_from_cold_and_nothing_stale_returns(
    store: TieredStateStore, cold: GatedColdStore, hot: MemoryHotStore, no_hot_backoff: None
) -> None:
    await store.create(THREAD, {"s": "v1"}, agent_id="a")
    with unreachable(hot.outage):
        # Redis may be up but out of our reach: its v1 copy stays there.
        during = await store.update_section(THREAD, "s", "v2", agent_id="a")
        assert await store.get(THREAD) == during
        assert store.stats.hot_errors >= 2
        assert [tier.up for tier in await store.health()] == [True, False]
    # Back: the thread written meanwhile is re-installed from cold before hot serves it.
    assert await store.get(THREAD) == during
    await store.settled()
    assert await hot.get(THREAD) == during
    assert await store.get(THREAD) == during
    assert [tier.up for tier in await store.health()] == [True, True]


async def test_without_a_hot_tier_everything_is_cold(cold: GatedColdStore) -> None:
    store = TieredStateStore(cold, None, memory_settings())
    created = await store.create(THREAD, {"s": 1}, agent_id="a")
    assert await store.get(THREAD) == created
    with pytest.raises(BackendUnavailable):
        await store.lock(THREAD)
    assert [tier.name for tier in await store.health()] == ["memory"]


async def test_locks_are_exclusive_fenced_renewed_and_released_by_their_holder(
    store: TieredStateStore,
) -> None:
    first = await store.lock(THREAD, ttl_ms=10_000)
    with pytest.raises(LockNotAcquired):
        await store.lock(THREAD)
    assert await store.renew(first)
    remaining = await store.lock_expires_in(THREAD)
    assert remaining is not None and 9 < remaining <= 10
    assert await store.unlock(first)
    assert not await store.unlock(first)
    assert await store.lock_expires_in(THREAD) is None
    second = await store.lock(THREAD)
    assert second.fence > first.fence


async def test_settling_backs_off_while_the_cold_tier_cannot_answer_either(
    store: TieredStateStore,
    cold: GatedColdStore,
    hot: MemoryHotStore,
    no_hot_backoff: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread written while Redis was out of reach is settled in the background once it
    answers; with the cold tier down as well, the tries space out (not one cold read per
    thread every RESETTLE_RETRY_SECONDS), and settling still happens once cold is back."""
    monkeypatch.setattr(tiered, "RESETTLE_RETRY_SECONDS", 0.05)
    monkeypatch.setattr(tiered, "RESETTLE_MAX_SECONDS", 0.4)
    await store.create(THREAD, {"s": "v1"}, agent_id="a")
    with unreachable(hot.outage):
        during = await store.update_section(THREAD, "s", "v2", agent_id="a")
    tried = 0
    get = cold.get

    async def counted_get(thread_id: str) -> WorkflowRecord | None:
        nonlocal tried
        tried += 1
        return await get(thread_id)

    monkeypatch.setattr(cold, "get", counted_get)
    with unreachable(cold.outage):
        await asyncio.sleep(1.5)
    # 0.05 s apart: about 30 tries; doubling to 0.4 s: 0.05, 0.15, 0.35, 0.75, 1.15, 1.55.
    assert 2 <= tried <= 7, tried
    for _ in range(20):
        if await hot.get(THREAD) == during:
            break
        await asyncio.sleep(0.1)
    assert await hot.get(THREAD) == during


async def test_a_backoff_another_pass_set_delays_settling_by_no_more_than_the_max(
    store: TieredStateStore,
    cold: GatedColdStore,
    hot: MemoryHotStore,
    no_hot_backoff: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The background retry wakes while the pass a read started (which settled nothing)
    backs off: it tries again when that backoff ends, not a whole retry later (up to
    twice RESETTLE_MAX_SECONDS after the cold tier answers again, with no reads)."""
    monkeypatch.setattr(tiered, "RESETTLE_RETRY_SECONDS", 0.05)
    monkeypatch.setattr(tiered, "RESETTLE_MAX_SECONDS", 0.8)
    cache = store.cache
    await store.create(THREAD, {"s": "v1"}, agent_id="a")
    with unreachable(hot.outage):
        during = await store.update_section(THREAD, "s", "v2", agent_id="a")
    loop = asyncio.get_running_loop()
    wakes: list[float] = []
    start_settling = cache._start_settling

    def recorded() -> None:
        if asyncio.current_task() is cache._resettler:
            wakes.append(loop.time())
        start_settling()

    monkeypatch.setattr(cache, "_start_settling", recorded)
    with unreachable(cold.outage):
        await asyncio.sleep(1.7)  # retries 0.05, 0.1, 0.2, 0.4, 0.8 s apart: at the max
        # 0.2 s before the retry's next wake, a read's pass settles nothing: its backoff
        # (0.6 s here) ends after that wake.
        woke = len(wakes)
        await asyncio.sleep(max(0.0, wakes[-1] + 0.6 - loop.time()))
        assert len(wakes) == woke
        cache._settle_not_before = time.monotonic() + 0.6
    back = loop.time()
    while await hot.get(THREAD) != during:
        assert loop.time() - back < 2.0
        await asyncio.sleep(0.01)
    assert loop.time() - back < 0.6 + 0.15
