"""The case's run queue (`support_cases.runs`) over in-memory fakes of the tiers: the order
follow-ups run in per strategy, what `reject` refuses, what `start_next` starts, what the
record keeps."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from state import JSON, TieredStateStore
from state.ports import ColdRetention
from support_cases.models import CaseStatus, FollowUpStrategy, RunStatus
from support_cases.runs import (
    FINISHED_RUNS_KEPT,
    MAX_QUEUED_RUNS,
    RETENTION_SECTION,
    RUN_SECTION,
    RUNS_SECTION,
    QueueFull,
    RunIndexBusy,
    RunInProgress,
    RunTracker,
    current_run,
    new_run_entry,
    new_run_section,
    queued,
    runs_of,
    shard_of,
    trimmed,
)
from support_cases.settings import AppSettings
from tests.support.fakes import MemoryColdStore, memory_backends

CASE = "case-queue"


@pytest.fixture
async def tracker() -> AsyncIterator[tuple[RunTracker, TieredStateStore]]:
    settings = AppSettings.model_validate({"cosmos_endpoint": "https://localhost:1/"})
    async with memory_backends() as backends:
        store = TieredStateStore.from_backends(backends)
        await store.create(
            CASE,
            {
                RUN_SECTION: {**new_run_section(CaseStatus.RUNNING, attempt=1), "run_id": "r0"},
                RUNS_SECTION: [new_run_entry("r0", "intake", RunStatus.RUNNING)],
            },
            agent_id="test",
        )
        yield RunTracker(store, backends.retention, settings), store


def follow_up(run_id: str, strategy: FollowUpStrategy) -> dict[str, object]:
    return new_run_entry(run_id, "message", RunStatus.QUEUED, text=run_id, strategy=strategy)


async def runs(store: TieredStateStore) -> list[dict[str, object]]:
    record = await store.get(CASE)
    assert record is not None
    return runs_of(record)


async def test_stopping_follow_ups_go_first_in_arrival_order_and_a_rollback_upgrades_the_stop(
    tracker: tuple[RunTracker, TieredStateStore],
) -> None:
    track, store = tracker
    for run_id, strategy in (
        ("e1", FollowUpStrategy.ENQUEUE),
        ("i1", FollowUpStrategy.INTERRUPT),
        ("r1", FollowUpStrategy.ROLLBACK),
        ("e2", FollowUpStrategy.ENQUEUE),
    ):
        stored, replayed = await track.enqueue(
            CASE, follow_up(run_id, strategy), strategy, agent_id="test"
        )
        assert stored["run_id"] == run_id and not replayed
    found = await runs(store)
    assert [entry["run_id"] for entry in queued(found)] == ["i1", "r1", "e1", "e2"]
    current = current_run(found)
    assert current is not None
    # The first follow-up to stop the run names it; the rollback after it discards it too.
    assert (current["stop"], current["stopped_by"]) == ("rollback", "i1")


async def test_a_replayed_run_id_is_not_queued_twice(
    tracker: tuple[RunTracker, TieredStateStore],
) -> None:
    track, store = tracker
    entry = follow_up("e1", FollowUpStrategy.ENQUEUE)
    await track.enqueue(CASE, entry, FollowUpStrategy.ENQUEUE, agent_id="test")
    again, replayed = await track.enqueue(CASE, entry, FollowUpStrategy.ENQUEUE, agent_id="test")
    assert replayed and again["run_id"] == "e1"
    assert [e["run_id"] for e in await runs(store)] == ["r0", "e1"]


async def test_reject_refuses_while_a_run_is_current_or_queued_and_writes_nothing(
    tracker: tuple[RunTracker, TieredStateStore],
) -> None:
    track, store = tracker
    with pytest.raises(RunInProgress, match="r0"):
        await track.enqueue(
            CASE, follow_up("x", FollowUpStrategy.REJECT), FollowUpStrategy.REJECT, agent_id="t"
        )
    await track.mark(CASE, CaseStatus.COMPLETED)
    await track.enqueue(
        CASE, follow_up("e1", FollowUpStrategy.ENQUEUE), FollowUpStrategy.ENQUEUE, agent_id="t"
    )
    with pytest.raises(RunInProgress, match="e1"):
        await track.enqueue(
            CASE, follow_up("x", FollowUpStrategy.REJECT), FollowUpStrategy.REJECT, agent_id="t"
        )
    assert [e["run_id"] for e in await runs(store)] == ["r0", "e1"]


async def test_start_next_waits_for_the_current_run_then_starts_the_oldest(
    tracker: tuple[RunTracker, TieredStateStore],
) -> None:
    track, store = tracker
    for run_id in ("e1", "e2"):
        await track.enqueue(
            CASE,
            follow_up(run_id, FollowUpStrategy.ENQUEUE),
            FollowUpStrategy.ENQUEUE,
            agent_id="t",
        )
    assert await track.start_next(CASE, fencing_token=None) is None  # r0 still running
    assert await track.mark(CASE, CaseStatus.AWAITING_REVIEW) == 2
    assert await track.start_next(CASE, fencing_token=None) is None  # paused for review
    assert await track.mark(CASE, CaseStatus.COMPLETED) == 2
    started = await track.start_next(CASE, fencing_token=None)
    assert started is not None and started["run_id"] == "e1"
    record = await store.get(CASE)
    assert record is not None and record.sections[RUN_SECTION]["run_id"] == "e1"
    assert [(e["run_id"], e["status"]) for e in runs_of(record)] == [
        ("r0", "completed"),
        ("e1", "running"),
        ("e2", "queued"),
    ]
    assert await track.mark(CASE, CaseStatus.COMPLETED) == 1
    assert runs_of(await store.get(CASE) or record)[1]["status"] == "completed"


async def test_a_stopped_run_ends_with_what_it_discarded(
    tracker: tuple[RunTracker, TieredStateStore],
) -> None:
    track, store = tracker
    effect = {"kind": "refund", "idempotency_key": f"{CASE}:refund", "status": "done"}
    await track.end_stopped(
        CASE, "r0", RunStatus.ROLLED_BACK, fencing_token=None, discarded_effects=[effect]
    )
    (entry,) = await runs(store)
    assert entry["status"] == "rolled_back" and entry["discarded_effects"] == [effect]
    assert entry["ended_at"]


def test_the_record_keeps_every_open_run_and_the_newest_finished_ones() -> None:
    finished = [
        {**new_run_entry(f"f{n}", "message", RunStatus.QUEUED), "status": "completed"}
        for n in range(FINISHED_RUNS_KEPT + 10)
    ]
    open_runs = [
        new_run_entry("q", "message", RunStatus.QUEUED),
        new_run_entry("c", "message", RunStatus.RUNNING),
    ]
    kept = trimmed([finished[0], *open_runs, *finished[1:]])
    assert [e["run_id"] for e in kept if e["status"] != "completed"] == ["q", "c"]
    assert [e["run_id"] for e in kept if e["status"] == "completed"] == [
        e["run_id"] for e in finished[-FINISHED_RUNS_KEPT:]
    ]


async def test_a_full_queue_refuses_more_and_writes_nothing(
    tracker: tuple[RunTracker, TieredStateStore],
) -> None:
    track, store = tracker
    for n in range(MAX_QUEUED_RUNS):
        await track.enqueue(
            CASE,
            follow_up(f"e{n}", FollowUpStrategy.ENQUEUE),
            FollowUpStrategy.ENQUEUE,
            agent_id="t",
        )
    with pytest.raises(QueueFull):
        await track.enqueue(
            CASE,
            follow_up("more", FollowUpStrategy.INTERRUPT),
            FollowUpStrategy.INTERRUPT,
            agent_id="t",
        )
    found = await runs(store)
    assert len(queued(found)) == MAX_QUEUED_RUNS
    current = current_run(found)
    assert current is not None and "stop" not in current


class CountingRetention:
    """The fake retention, counting the holds and releases the tracker asks for."""

    def __init__(self, inner: ColdRetention, store: TieredStateStore) -> None:
        self.inner = inner
        self.store = store
        self.calls: list[str] = []

    async def hold(self, thread_id: str) -> None:
        # The record says "held" before the hold is taken: a failure after it can only
        # leave a release that was not needed, never a hold nobody releases.
        record = await self.store.get(thread_id)
        assert record is not None and record.sections[RETENTION_SECTION] == {"held": True}
        self.calls.append("hold")
        await self.inner.hold(thread_id)

    async def release(self, thread_id: str) -> None:
        self.calls.append("release")
        await self.inner.release(thread_id)


@pytest.mark.parametrize("legacy", [False, True], ids=["flagged", "written-before-the-flag"])
async def test_only_a_case_that_may_be_held_is_released(legacy: bool) -> None:
    settings = AppSettings.model_validate({"cosmos_endpoint": "https://localhost:1/"})
    async with memory_backends() as backends:
        store = TieredStateStore.from_backends(backends)
        sections: dict[str, JSON] = {
            RUN_SECTION: {**new_run_section(CaseStatus.RUNNING, attempt=1), "run_id": "r0"},
            RUNS_SECTION: [new_run_entry("r0", "intake", RunStatus.RUNNING)],
        }
        if not legacy:
            sections[RETENTION_SECTION] = {"held": False}
        await store.create(CASE, sections, agent_id="test")
        retention = CountingRetention(backends.retention, store)
        track = RunTracker(store, retention, settings)

        await track.mark(CASE, CaseStatus.COMPLETED)
        # A case that never waited for review ends without a release; one whose record
        # predates the flag may have been held, so it is released (and flagged from then on).
        assert retention.calls == (["release"] if legacy else [])
        retention.calls.clear()
        await track.mark(CASE, CaseStatus.RUNNING)
        await track.mark(CASE, CaseStatus.AWAITING_REVIEW)
        await track.mark(CASE, CaseStatus.RUNNING)
        await track.mark(CASE, CaseStatus.COMPLETED)
        await track.mark(CASE, CaseStatus.COMPLETED)
        assert retention.calls == ["hold", "release"]
        record = await store.get(CASE)
        assert record is not None and record.sections[RETENTION_SECTION] == {"held": False}


async def started_case(store: TieredStateStore, track: RunTracker, case_id: str) -> None:
    """A case as the app creates it, its first run running, in the run index."""
    await store.create(
        case_id,
        {
            RUN_SECTION: {**new_run_section(CaseStatus.RUNNING, attempt=1), "run_id": "r0"},
            RUNS_SECTION: [new_run_entry("r0", "intake", RunStatus.RUNNING)],
            RETENTION_SECTION: {"held": False},
        },
        agent_id="test",
    )
    await track.register(case_id)


async def test_cases_at_rest_leave_the_index_with_the_timer_one_write_a_shard() -> None:
    settings = AppSettings.model_validate({"cosmos_endpoint": "https://localhost:1/"})
    async with memory_backends() as backends:
        store = TieredStateStore.from_backends(backends)
        track = RunTracker(store, backends.retention, settings)
        cold = backends.cold
        assert isinstance(cold, MemoryColdStore)
        # Cases of one shard: the timer drops them together.
        shard = shard_of("case-rest-0")
        cases = [c for c in (f"case-rest-{n}" for n in range(200)) if shard_of(c) == shard][:4]
        for case_id in cases:
            await started_case(store, track, case_id)
        for case_id in cases[:3]:
            await track.mark(case_id, CaseStatus.COMPLETED)
        # A run's end leaves its case indexed: no index write on the run's path.
        assert set(cases) <= set(await track.active_cases())

        before = cold.requests.copy()
        await track.forget(cases[:2])
        assert (cold.requests - before)["update_section"] == 1  # one write for the shard
        left = await track.active_cases()
        assert cases[0] not in left and cases[1] not in left and cases[3] in left

        # A follow-up queued after the timer saw the case at rest: the case is put back.
        await track.enqueue(
            cases[2],
            follow_up("f1", FollowUpStrategy.ENQUEUE),
            FollowUpStrategy.ENQUEUE,
            agent_id="test",
        )
        await track.forget(cases[2:3])
        assert cases[2] in await track.active_cases()


async def test_a_case_paused_for_review_leaves_the_index_with_the_timer_and_stays_out() -> None:
    """The timer lets a paused case go as resting (it has nothing to resume): put back as
    it is dropped, it would cost its shard a write every tick for as long as the review
    takes. A run queued behind the review keeps it there."""
    settings = AppSettings.model_validate({"cosmos_endpoint": "https://localhost:1/"})
    async with memory_backends() as backends:
        store = TieredStateStore.from_backends(backends)
        track = RunTracker(store, backends.retention, settings)
        cold = backends.cold
        assert isinstance(cold, MemoryColdStore)
        paused, waiting = "case-paused-0", "case-paused-1"
        for case_id in (paused, waiting):
            await started_case(store, track, case_id)
            await track.mark(case_id, CaseStatus.AWAITING_REVIEW)
        await track.enqueue(
            waiting,
            follow_up("f1", FollowUpStrategy.ENQUEUE),
            FollowUpStrategy.ENQUEUE,
            agent_id="test",
        )
        await track.forget([paused, waiting])
        left = await track.active_cases()
        assert paused not in left and waiting in left

        before = cold.requests.copy()
        await track.forget([paused])
        assert (cold.requests - before)["update_section"] == 0  # nothing left to drop


async def test_a_busy_shard_does_not_keep_a_case_with_work_out_of_the_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = AppSettings.model_validate({"cosmos_endpoint": "https://localhost:1/"})
    async with memory_backends() as backends:
        store = TieredStateStore.from_backends(backends)
        track = RunTracker(store, backends.retention, settings)
        ids = (f"case-busy-{n}" for n in range(200))
        by_shard: dict[str, str] = {}
        for case_id in ids:
            by_shard.setdefault(shard_of(case_id), case_id)
        (_, working), (busy_shard, resting) = sorted(by_shard.items())[:2]
        for case_id in (resting, working):
            await started_case(store, track, case_id)
            await track.mark(case_id, CaseStatus.COMPLETED)
        # Queued after the timer saw it at rest: it must stay where the timer looks.
        await track.enqueue(
            working,
            follow_up("f1", FollowUpStrategy.ENQUEUE),
            FollowUpStrategy.ENQUEUE,
            agent_id="test",
        )
        drop = track._drop

        async def busy_first(shard: str, dropped: set[str]) -> None:
            if shard == busy_shard:
                raise RunIndexBusy("the run index is busy (VersionConflict); retry")
            await drop(shard, dropped)

        monkeypatch.setattr(track, "_drop", busy_first)
        with pytest.raises(RunIndexBusy):
            await track.forget([resting, working])
        assert {resting, working} <= set(await track.active_cases())
