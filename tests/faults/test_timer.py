"""One failing case never stops the timer: each case is isolated, the tick finishes, and its
counts are logged and exported as OpenTelemetry metrics.

The app runs on a Postgres database of this test's own (the timer resumes every
stale case of its store, so the shared one would hand it other tests' cases),
with Redis in front. Three stale cases: one resumes for real, one holds a
damaged `run` section (its heartbeat is not a time), and one whose resume finds
the cold tier unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from langgraph.checkpoint.base import empty_checkpoint
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from state.checkpoint import flusher as flusher_module
from state.cold import postgres_retention
from state.errors import BackendUnavailable, FlushLockBusy
from state.settings import Settings
from state.size import COMPRESSED_KEY
from support_cases import maintenance
from support_cases.effects import REQUEST_SECTION
from support_cases.maintenance import CASES_METRIC, SWEPT_METRIC, TimerMetrics, run_tick
from support_cases.models import CaseStatus
from support_cases.runs import (
    INDEX_IDS,
    RUN_SECTION,
    RunTracker,
    new_run_section,
    shard_of,
    utcnow,
)
from support_cases.runtime import Runtime
from support_cases.service import CaseService, Outcome, fingerprint

from .apps import submission
from .proxy import LoopbackProxy


@pytest.fixture
async def runtime(
    settings_for: Callable[..., Settings], fresh_postgres_url: str
) -> AsyncIterator[Runtime]:
    settings = settings_for(
        "postgres", postgres_url=fresh_postgres_url, case_stale_after_seconds=60
    )
    opened = await Runtime.open(settings)
    try:
        yield opened
    finally:
        await opened.service.wait_idle()
        await opened.close()


async def stale_case(runtime: Runtime, case_id: str, *, heartbeat_at: str | None = None) -> None:
    """A case as a dead worker leaves it: accepted, marked running, heartbeat long ago."""
    body = submission(case_id)
    request = {
        **body.model_dump(mode="json", exclude={"case_id", "client_key"}),
        "fingerprint": fingerprint(body),
        "idempotency_key": None,
    }
    run = new_run_section(CaseStatus.RUNNING)
    run["heartbeat_at"] = heartbeat_at or (utcnow() - timedelta(hours=1)).isoformat()
    tracker = RunTracker(runtime.store, runtime.backends.retention, runtime.settings)
    await tracker.register(case_id)
    await runtime.store.create(
        case_id, {REQUEST_SECTION: request, RUN_SECTION: run}, agent_id="test"
    )


def cut_cold_tier_for(service: CaseService, case_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """This one case's resume finds the cold tier unavailable (the others' do not)."""
    real_resume = service.resume

    async def resume(case: str, **options: Any) -> Outcome:
        if case == case_id:
            raise BackendUnavailable("postgres", "connection refused (injected)")
        return await real_resume(case, **options)

    # resume_stale calls `self.resume`: the instance attribute takes its place.
    monkeypatch.setattr(service, "resume", resume)


async def test_one_failing_case_does_not_stop_the_others(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    damaged, unavailable, healthy = (f"timer-{n}-{uuid.uuid4().hex[:8]}" for n in range(3))
    await stale_case(runtime, damaged, heartbeat_at="not a time")
    await stale_case(runtime, unavailable)
    await stale_case(runtime, healthy)
    cut_cold_tier_for(runtime.service, unavailable, monkeypatch)

    report = await runtime.service.resume_stale()

    assert report.resumed == [healthy]
    assert set(report.failed) == {damaged, unavailable}
    assert report.failed[damaged].startswith("ValueError")
    assert report.failed[unavailable].startswith("BackendUnavailable")
    assert (await runtime.service.status(healthy)).status is CaseStatus.COMPLETED


async def test_the_tick_finishes_logs_and_exports_its_counts(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    damaged, healthy = (f"timer-{n}-{uuid.uuid4().hex[:8]}" for n in range(2))
    await stale_case(runtime, damaged, heartbeat_at="not a time")
    await stale_case(runtime, healthy)
    reader = InMemoryMetricReader()
    meters = TimerMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"))

    with caplog.at_level(logging.INFO, logger="support_cases.maintenance"):
        tick = await run_tick(runtime.service, meters=meters)

    assert tick.resumed == [healthy] and set(tick.failed) == {damaged}
    assert tick.swept == 0  # the sweep ran (nothing has expired: retention is off)
    assert "stale runs resumed 1, skipped 0, failed 1" in caplog.text
    assert damaged in caplog.text
    assert exported(reader) == {
        (CASES_METRIC, "resumed"): 1,
        (CASES_METRIC, "skipped"): 0,
        (CASES_METRIC, "failed"): 1,
        (SWEPT_METRIC, None): 0,
    }


async def test_the_tick_skips_the_sweep_when_the_run_index_cannot_be_read(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tick still drains and ends, reporting the error; its sweep waits for a tick that
    can tell which cases are due to be resumed
    (`test_a_stale_case_whose_index_shard_went_unread_is_not_swept_by_the_tick`)."""

    async def unreadable(**options: Any) -> list[str]:
        raise BackendUnavailable("postgres", "connection refused (injected)")

    monkeypatch.setattr(runtime.service._tracker, "active_cases", unreadable)
    swept: list[int] = []
    drained: list[int] = []
    real_sweep, real_drain = runtime.service.sweep_expired, runtime.service.drain_backlog

    async def sweep(**options: Any) -> int:
        swept.append(await real_sweep(**options))
        return swept[-1]

    async def drain(**options: Any) -> int:
        drained.append(await real_drain(**options))
        return drained[-1]

    monkeypatch.setattr(runtime.service, "sweep_expired", sweep)
    monkeypatch.setattr(runtime.service, "drain_backlog", drain)
    with pytest.raises(BackendUnavailable):  # reported to the host, after the drain
        await run_tick(runtime.service, meters=TimerMetrics(MeterProvider().get_meter("test")))
    assert swept == [] and drained == [0]


async def test_a_run_that_outlasts_the_ticks_budget_leaves_the_tick_its_other_jobs(
    settings_for: Callable[..., Settings], fresh_postgres_url: str
) -> None:
    """A resumed run that hangs (a step that never ends) is left going when the tick's budget
    is spent: the tick still drains and sweeps, returns well before the Functions timeout,
    and the next tick resumes the case the first one had no time for."""
    hold = asyncio.Event()
    held: list[str] = []

    async def first_step_hangs(step: str) -> None:
        if not held:
            held.append(step)
            await hold.wait()

    settings = settings_for(
        "postgres", postgres_url=fresh_postgres_url, case_stale_after_seconds=60
    )
    runtime = await Runtime.open(settings, after_step=first_step_hangs)
    try:
        cases = [f"timer-budget-{n}-{uuid.uuid4().hex[:8]}" for n in range(2)]
        for case_id in cases:
            await stale_case(runtime, case_id)
        meters = TimerMetrics(MeterProvider().get_meter("test"))

        started = time.monotonic()
        async with asyncio.timeout(30):  # the tick must not wait for the hung run
            first = await run_tick(runtime.service, meters=meters, budget_seconds=2)
        assert time.monotonic() - started < 10
        assert first.flushed is not None and first.swept is not None  # both jobs ran
        assert first.failed == {}
        hung = first.resumed[0]
        (waiting,) = set(cases) - {hung}
        assert "budget" in first.skipped[waiting]

        second = await run_tick(runtime.service, meters=meters, budget_seconds=10)
        assert second.resumed == [waiting]  # the hung run keeps its lease: skipped
        assert hung in second.skipped
        assert (await runtime.service.status(waiting)).status is CaseStatus.COMPLETED
    finally:
        hold.set()
        await runtime.service.wait_idle()
        await runtime.close()
    assert held


def case_in_shard(prefix: str, shard: str) -> str:
    """A case id the run index lists in `shard`."""
    while shard_of(case_id := f"{prefix}-{uuid.uuid4().hex[:8]}") != shard:
        pass
    return case_id


async def test_stalled_cases_at_the_back_of_the_index_are_not_starved(
    settings_for: Callable[..., Settings], fresh_postgres_url: str
) -> None:
    """Every resumed run hangs, so each tick's budget goes to the first stalled case it
    tries, and before each tick a newly stalled case enters the index's first shard: a tick
    that always began at the front would never reach the case in the last shard."""
    hold = asyncio.Event()

    async def every_step_hangs(step: str) -> None:
        await hold.wait()

    settings = settings_for(
        "postgres", postgres_url=fresh_postgres_url, case_stale_after_seconds=60
    )
    runtime = await Runtime.open(settings, after_step=every_step_hangs)
    try:
        back = case_in_shard("timer-back", INDEX_IDS[-1])
        await stale_case(runtime, back)
        # Each newly stalled case sorts first in its shard, the ones hung before it after:
        # a tick reaches the back one unless it begins at the newest, with probability
        # 1/2 at worst, so missing it 20 ticks running is a one in a million.
        for tick in range(20):
            await stale_case(runtime, case_in_shard(f"timer-front-{99 - tick}", INDEX_IDS[0]))
            report = await runtime.service.resume_stale(deadline=time.monotonic() + 0.5)
            assert len(report.resumed) == 1 and report.failed == {}
            if back in report.resumed:
                break
        else:
            pytest.fail(f"not resumed in 20 ticks: {report.skipped[back]}")
    finally:
        hold.set()
        await runtime.service.wait_idle()
        await runtime.close()


async def test_a_flush_lock_held_elsewhere_does_not_keep_the_tick_past_its_budget(
    settings_for: Callable[..., Settings], fresh_postgres_url: str
) -> None:
    """A stalled case whose dead worker left a write-behind backlog, which another process
    is flushing (it holds the thread's flush lock, renewed, for longer than the tick has):
    the resume waits for the lock within the tick's budget, not for LOCK_WAIT_SECONDS (the
    whole timer period), and a later tick resumes the case once the lock is free."""
    runtime = await Runtime.open(
        settings_for(
            "postgres",
            postgres_url=fresh_postgres_url,
            case_stale_after_seconds=60,
            state_write_mode="write-behind",
        )
    )
    renewing: asyncio.Task[None] | None = None
    try:
        flusher = runtime.backends.flusher
        assert flusher is not None
        await flusher.stop()  # the backlog stays in the log
        case_id = f"timer-locked-{uuid.uuid4().hex[:8]}"
        await stale_case(runtime, case_id)
        config = {"configurable": {"thread_id": case_id, "checkpoint_ns": ""}}
        await runtime.saver.aput(config, empty_checkpoint(), {"step": -1}, {})
        token = await flusher.log.lock_thread(case_id, ttl_ms=5_000)
        assert token is not None

        async def hold_the_lock(token: str) -> None:
            """Renewed as its holder's lease does, for as long as its flush lasts."""
            while True:
                await asyncio.sleep(1)
                assert await flusher.log.renew_thread_lock(case_id, token, ttl_ms=5_000)

        renewing = asyncio.create_task(hold_the_lock(token))
        started = time.monotonic()
        async with asyncio.timeout(30):
            report = await runtime.service.resume_stale(deadline=started + 1)
        elapsed = time.monotonic() - started
        assert elapsed < 5, f"the tick waited {elapsed:.1f} s for the flush lock"
        assert "flush lock" in report.skipped[case_id] and report.failed == {}

        renewing.cancel()
        await flusher.log.unlock_thread(case_id, token)
        assert (await runtime.service.resume_stale()).resumed == [case_id]
    finally:
        if renewing is not None:
            renewing.cancel()
        await runtime.service.wait_idle()
        await runtime.close()


async def test_a_resume_past_a_flush_lock_held_elsewhere_fails_rather_than_fork_the_case(
    settings_for: Callable[..., Settings],
    fresh_postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resume asked of a stalled case (not the timer's, which waits within its budget)
    while another process holds the case's flush lock past the wait: the case's newest
    checkpoint is in the write-behind log, not in the cold tier, so the resume fails with
    `FlushLockBusy` (a 503 at the API) and writes nothing; going on from the cold tier's
    older checkpoint, its run would fork the case's history."""
    runtime = await Runtime.open(
        settings_for(
            "postgres",
            postgres_url=fresh_postgres_url,
            case_stale_after_seconds=60,
            state_write_mode="write-behind",
        )
    )
    try:
        flusher = runtime.backends.flusher
        assert flusher is not None
        await flusher.stop()  # the backlog stays in the log
        case_id = f"resume-locked-{uuid.uuid4().hex[:8]}"
        await stale_case(runtime, case_id)
        config = {"configurable": {"thread_id": case_id, "checkpoint_ns": ""}}
        older = await runtime.saver.aput(config, empty_checkpoint(), {"step": -1}, {})
        await runtime.saver.aflush(case_id)
        newest = await runtime.saver.aput(older, empty_checkpoint(), {"step": 0}, {})
        logged = len(await flusher.log.read(case_id, count=1000))
        monkeypatch.setattr(flusher_module, "LOCK_WAIT_SECONDS", 0.3, raising=True)

        elsewhere = flusher_module.Flusher(flusher.log, flusher.store, lock_ttl_ms=2_000)
        async with elsewhere.holding(case_id):
            with pytest.raises(FlushLockBusy):
                await runtime.service.resume(case_id)
        # Nothing of a run went into the log, nor any step onto the older checkpoint.
        assert len(await flusher.log.read(case_id, count=1000)) == logged
        await runtime.saver.aflush(case_id)
        children: dict[str | None, list[str]] = {}
        async for stored in flusher.store.list_checkpoints(
            thread_id=case_id, checkpoint_ns=None, before=None, limit=None, metadata_filter=None
        ):
            children.setdefault(stored.parent_checkpoint_id, []).append(stored.checkpoint_id)
        assert children == {
            None: [older["configurable"]["checkpoint_id"]],
            older["configurable"]["checkpoint_id"]: [newest["configurable"]["checkpoint_id"]],
        }
    finally:
        await runtime.service.wait_idle()
        await runtime.close()


async def test_a_run_index_shard_that_fails_to_decode_costs_only_its_own_cases(
    runtime: Runtime,
) -> None:
    """The run index is sharded: one shard's record that no longer decodes (a compressed
    section whose data is damaged) must not hide the other shards' stale cases."""
    cases = [f"timer-shard-{n}-{uuid.uuid4().hex[:8]}" for n in range(12)]
    for case_id in cases:
        await stale_case(runtime, case_id)
    damaged = shard_of(cases[0])
    record = await runtime.backends.cold.get(damaged)
    assert record is not None
    await runtime.backends.cold.update_section(
        damaged,
        "cases",
        {COMPRESSED_KEY: {"codec": "zlib", "bytes": 10, "data": "bm90IHpsaWI="}},
        expected_version=record.version,
        agent_id="test",
    )

    report = await runtime.service.resume_stale()

    hidden = {case_id for case_id in cases if shard_of(case_id) == damaged}
    assert set(report.resumed) == set(cases) - hidden
    assert damaged in report.failed and "CorruptState" in report.failed[damaged]


def exported(reader: InMemoryMetricReader) -> dict[tuple[str, str | None], int]:
    data = reader.get_metrics_data()
    assert data is not None
    values: dict[tuple[str, str | None], int] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:  # type: ignore[union-attr]
                    outcome = point.attributes.get("outcome") if point.attributes else None
                    values[(metric.name, None if outcome is None else str(outcome))] = int(
                        point.value  # type: ignore[union-attr]
                    )
    return values


COLD_TTL = 3600


@pytest.fixture
def slow_postgres(fresh_postgres_url: str) -> Iterator[tuple[str, LoopbackProxy]]:
    """The test's database behind a proxy whose latency the test sets (a slow cold tier)."""
    target = int(str(conninfo_to_dict(fresh_postgres_url)["port"]))
    with LoopbackProxy(target) as proxy:
        yield make_conninfo(fresh_postgres_url, host="127.0.0.1", port=str(proxy.port)), proxy


async def backdate(url: str, seconds: int) -> None:
    """Every thread's last activity `seconds` into the past (the sweep reads the server's clock)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for table, column in (("workflow_records", "updated_at"), ("cp_checkpoints", "created_at")):
            await conn.execute(
                f"UPDATE {table} SET {column} = {column} - make_interval(secs => %s)",
                (seconds,),
            )


def quiet_meters() -> TimerMetrics:
    return TimerMetrics(MeterProvider().get_meter("test"))


async def test_the_drain_stops_taking_threads_once_its_budget_is_spent(
    settings_for: Callable[..., Settings],
    slow_postgres: tuple[str, LoopbackProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Write-behind backlogs dead workers left, more than a slow cold tier takes in one tick:
    the tick stops taking threads once its drain budget is spent (returning long before the
    next tick is due), leaves the rest in the log, and later ticks flush all of it."""
    url, proxy = slow_postgres
    monkeypatch.setattr(flusher_module, "ADOPT_AFTER_SECONDS", 0.5)
    monkeypatch.setattr(maintenance, "DRAIN_BUDGET_SECONDS", 1.0)
    runtime = await Runtime.open(
        settings_for("postgres", postgres_url=url, state_write_mode="write-behind")
    )
    try:
        flusher = runtime.backends.flusher
        assert flusher is not None
        await flusher.stop()  # the dead workers': nobody flushes their backlog but the timer
        threads = [f"timer-drain-{n}-{uuid.uuid4().hex[:8]}" for n in range(400)]
        for thread_id in threads:
            config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
            await runtime.saver.aput(config, empty_checkpoint(), {"step": -1}, {})
        await asyncio.sleep(0.6)  # left behind
        proxy.latency_seconds = 0.05

        started = time.monotonic()
        first = await run_tick(runtime.service, meters=quiet_meters())
        elapsed = time.monotonic() - started
        assert elapsed < 5, f"one tick drained for {elapsed:.1f} s: {first.flushed} threads"
        assert first.flushed is not None and 0 < first.flushed < len(threads)

        proxy.latency_seconds = 0.0
        for _ in range(20):
            if not await flusher.log.dirty_threads(limit=1):
                break
            await run_tick(runtime.service, meters=quiet_meters())
        for thread_id in threads:  # nothing the first tick left was lost
            assert await runtime.backends.checkpoints.get_checkpoint(thread_id, "", None)
    finally:
        proxy.latency_seconds = 0.0
        await runtime.service.wait_idle()
        await runtime.close()


async def test_the_sweep_stops_once_its_budget_is_spent(
    settings_for: Callable[..., Settings],
    slow_postgres: tuple[str, LoopbackProxy],
    fresh_postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More expired threads than a slow cold tier deletes in one tick: the tick's sweep stops
    once its budget is spent and the next ticks delete the rest."""
    url, proxy = slow_postgres
    monkeypatch.setattr(maintenance, "SWEEP_BUDGET_SECONDS", 1.0)
    # Batches small enough that one takes about the budget at this latency.
    monkeypatch.setattr(postgres_retention, "SWEEP_BATCH", 25)
    runtime = await Runtime.open(
        settings_for("postgres", postgres_url=url, state_cold_ttl_seconds=COLD_TTL)
    )
    try:
        threads = [f"timer-sweep-{n}-{uuid.uuid4().hex[:8]}" for n in range(300)]
        for thread_id in threads:
            await runtime.backends.cold.create(thread_id, {"n": 0}, agent_id="test")
        await backdate(fresh_postgres_url, 2 * COLD_TTL)
        proxy.latency_seconds = 0.02

        started = time.monotonic()
        first = await run_tick(runtime.service, meters=quiet_meters())
        elapsed = time.monotonic() - started
        assert elapsed < 5, f"one tick swept for {elapsed:.1f} s: {first.swept} threads"
        assert first.swept is not None and 0 < first.swept < len(threads)

        proxy.latency_seconds = 0.0
        swept = first.swept
        for _ in range(20):
            tick = await run_tick(runtime.service, meters=quiet_meters())
            assert tick.swept is not None
            swept += tick.swept
            if not tick.swept:
                break
        assert swept == len(threads)
    finally:
        proxy.latency_seconds = 0.0
        await runtime.service.wait_idle()
        await runtime.close()


async def open_short_lived(settings_for: Callable[..., Settings], postgres_url: str) -> Runtime:
    """A runtime on Postgres whose cases go stale after a minute and expire after COLD_TTL."""
    return await Runtime.open(
        settings_for(
            "postgres",
            postgres_url=postgres_url,
            case_stale_after_seconds=60,
            state_cold_ttl_seconds=COLD_TTL,
        )
    )


@pytest.mark.parametrize("why", ["budget", "failure"])
async def test_a_stale_case_the_tick_did_not_resume_is_not_swept_by_it(
    why: str,
    settings_for: Callable[..., Settings],
    fresh_postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A case whose worker died long enough ago that it is idle past the cold TTL is due to be
    resumed: a tick that did not resume it (its budget spent, or its resume failed) must not
    delete its state in its own sweep, and a later tick resumes it."""
    runtime = await open_short_lived(settings_for, fresh_postgres_url)
    try:
        case_id = f"timer-due-{why}-{uuid.uuid4().hex[:8]}"
        await stale_case(runtime, case_id)
        await backdate(fresh_postgres_url, 2 * COLD_TTL)
        if why == "failure":
            cut_cold_tier_for(runtime.service, case_id, monkeypatch)

        first = await run_tick(
            runtime.service, meters=quiet_meters(), budget_seconds=0 if why == "budget" else 40
        )
        assert case_id in (first.skipped if why == "budget" else first.failed)
        assert await runtime.backends.cold.get(case_id) is not None, "swept before its resume"
        # The index shard listing it, idle as long (nothing else in it changed), too.
        assert await runtime.backends.cold.get(shard_of(case_id)) is not None, "index swept"

        monkeypatch.undo()
        second = await run_tick(runtime.service, meters=quiet_meters())
        assert second.resumed == [case_id]
        await runtime.service.wait_idle()
        assert (await runtime.service.status(case_id)).status is CaseStatus.COMPLETED
    finally:
        await runtime.service.wait_idle()
        await runtime.close()


@pytest.mark.parametrize("unread", ["shard", "index"])
async def test_a_stale_case_whose_index_shard_went_unread_is_not_swept_by_the_tick(
    unread: str,
    settings_for: Callable[..., Settings],
    fresh_postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A case idle past the cold TTL whose run index shard the tick could not read (damaged,
    or the whole index out of reach) is one the tick did not resume: it is due to be, so the
    tick's sweep must not delete it, and a tick that reads the index again resumes it."""
    runtime = await open_short_lived(settings_for, fresh_postgres_url)
    try:
        case_id = f"timer-unread-{unread}-{uuid.uuid4().hex[:8]}"
        await stale_case(runtime, case_id)
        await backdate(fresh_postgres_url, 2 * COLD_TTL)
        shard = shard_of(case_id)
        listed = await runtime.backends.cold.get(shard)
        assert listed is not None
        if unread == "shard":
            # Damaged as in the test above: its record no longer decodes.
            await runtime.backends.cold.update_section(
                shard,
                "cases",
                {COMPRESSED_KEY: {"codec": "zlib", "bytes": 10, "data": "bm90IHpsaWI="}},
                expected_version=listed.version,
                agent_id="test",
            )
        else:

            async def unreadable(**options: Any) -> dict[str, str]:
                raise BackendUnavailable("postgres", "connection refused (injected)")

            monkeypatch.setattr(runtime.service._tracker, "active_cases", unreadable)

        with contextlib.suppress(BackendUnavailable):  # the whole index: reported to the host
            first = await run_tick(runtime.service, meters=quiet_meters())
            assert shard_of(case_id) in first.failed and case_id not in first.resumed
        assert await runtime.backends.cold.get(case_id) is not None, "swept before its resume"

        if unread == "shard":  # repaired
            await runtime.backends.cold.update_section(
                shard,
                "cases",
                listed.sections["cases"],
                expected_version=listed.version + 1,
                agent_id="test",
            )
        monkeypatch.undo()
        second = await run_tick(runtime.service, meters=quiet_meters())
        assert second.resumed == [case_id]
        await runtime.service.wait_idle()
        assert (await runtime.service.status(case_id)).status is CaseStatus.COMPLETED
    finally:
        await runtime.service.wait_idle()
        await runtime.close()
