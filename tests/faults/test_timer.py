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
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from state.errors import BackendUnavailable
from state.settings import Settings
from state.size import COMPRESSED_KEY
from support_cases.maintenance import CASES_METRIC, SWEPT_METRIC, TimerMetrics, run_tick
from support_cases.models import CaseStatus
from support_cases.runs import RUN_SECTION, RunTracker, new_run_section, shard_of, utcnow
from support_cases.runtime import Runtime
from support_cases.service import REQUEST_SECTION, CaseService, Outcome, fingerprint

from .apps import submission


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


async def test_the_sweep_runs_even_when_the_run_index_cannot_be_read(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unreadable(**options: Any) -> list[str]:
        raise BackendUnavailable("postgres", "connection refused (injected)")

    monkeypatch.setattr(runtime.service._tracker, "active_cases", unreadable)
    swept: list[int] = []
    real_sweep = runtime.service.sweep_expired

    async def sweep(**options: Any) -> int:
        swept.append(await real_sweep(**options))
        return swept[-1]

    monkeypatch.setattr(runtime.service, "sweep_expired", sweep)
    with pytest.raises(BackendUnavailable):  # reported to the host, after the sweep
        await run_tick(runtime.service, meters=TimerMetrics(MeterProvider().get_meter("test")))
    assert swept == [0]


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
