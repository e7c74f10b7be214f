"""The app's OpenTelemetry metrics, read back with the SDK's InMemoryMetricReader."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from state.errors import BackendUnavailable, StaleFencingToken
from state.ports import Counters, attributed, cold_operation
from support_cases import metrics
from support_cases.metrics import AppMetrics, BacklogSampler, CacheReading


@dataclass(frozen=True)
class Backlog:
    entries: int
    threads: int
    oldest_age_seconds: float | None
    stuck_threads: int = 0


class Reader:
    """An AppMetrics on its own provider, and what one collection of it shows."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.metrics = AppMetrics(self.provider.get_meter("test"))

    def points(self, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        """{sorted attributes: value (sum, gauge value or histogram point)} of `name`."""
        data = self.reader.get_metrics_data()
        found: dict[tuple[tuple[str, Any], ...], Any] = {}
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        key = tuple(sorted((point.attributes or {}).items()))
                        found[key] = getattr(point, "value", point)
        return found


@pytest.fixture
def reader() -> Iterator[Reader]:
    here = Reader()
    yield here
    here.provider.shutdown()


def test_cache_lookups_hit_ratio_and_hot_errors(reader: Reader) -> None:
    counts = {"hits": 3, "misses": 1, "errors": 0}
    reader.metrics.register_cache("record", lambda: CacheReading(**counts))
    assert reader.points(metrics.CACHE_LOOKUPS) == {
        (("cache", "record"), ("result", "hit")): 3,
        (("cache", "record"), ("result", "miss")): 1,
    }
    assert reader.points(metrics.CACHE_HIT_RATIO) == {(("cache", "record"),): 0.75}
    counts.update(hits=4, misses=4, errors=2)
    assert reader.points(metrics.CACHE_HIT_RATIO) == {(("cache", "record"),): 0.5}
    assert reader.points(metrics.HOT_ERRORS) == {(("cache", "record"),): 2}


def test_write_behind_losses_are_counted_while_a_saver_is_registered(reader: Reader) -> None:
    found = [0]
    reader.metrics.register_losses(lambda: found[0])
    assert reader.points(metrics.BACKLOG_LOSSES) == {(): 0}
    found[0] = 2
    assert reader.points(metrics.BACKLOG_LOSSES) == {(): 2}
    reader.metrics.register_losses(None)
    assert reader.points(metrics.BACKLOG_LOSSES) == {}


def test_no_lookups_yet_reports_no_ratio_rather_than_zero(reader: Reader) -> None:
    reader.metrics.register_cache("checkpoint", lambda: CacheReading(0, 0, 0))
    assert reader.points(metrics.CACHE_HIT_RATIO) == {}


def test_cold_requests_and_charge_per_operation(reader: Reader) -> None:
    counters = Counters()
    reader.metrics.register_cold("cosmos", counters)
    counters.count("state.get", 1.5)
    counters.count("state.get", 2.0)
    counters.count("state.update_section", 7.25)
    assert reader.points(metrics.COLD_REQUESTS) == {
        (("backend", "cosmos"), ("operation", "state.get")): 2,
        (("backend", "cosmos"), ("operation", "state.update_section")): 1,
    }
    assert reader.points(metrics.COLD_REQUEST_CHARGE) == {
        (("backend", "cosmos"), ("operation", "state.get")): 3.5,
        (("backend", "cosmos"), ("operation", "state.update_section")): 7.25,
    }


def test_attributed_names_the_operation_only_inside() -> None:
    assert cold_operation.get() is None
    with attributed("state.create"):
        assert cold_operation.get() == "state.create"
        with attributed("state.get"):
            assert cold_operation.get() == "state.get"
        assert cold_operation.get() == "state.create"
    assert cold_operation.get() is None


def test_backlog_gauges_follow_the_registered_source(reader: Reader) -> None:
    assert reader.points(metrics.BACKLOG_ENTRIES) == {}  # nothing registered: no data
    current: dict[str, Backlog | None] = {"value": Backlog(12, 3, 4.5)}
    reader.metrics.register_backlog_source(lambda: current["value"])
    assert reader.points(metrics.BACKLOG_ENTRIES) == {(): 12}
    assert reader.points(metrics.BACKLOG_THREADS) == {(): 3}
    assert reader.points(metrics.BACKLOG_OLDEST_AGE) == {(): 4.5}
    assert reader.points(metrics.BACKLOG_STUCK_THREADS) == {(): 0}
    current["value"] = Backlog(12, 3, 4.5, stuck_threads=2)
    assert reader.points(metrics.BACKLOG_STUCK_THREADS) == {(): 2}
    current["value"] = Backlog(0, 0, None)  # empty backlog: no oldest entry
    assert reader.points(metrics.BACKLOG_ENTRIES) == {(): 0}
    assert reader.points(metrics.BACKLOG_OLDEST_AGE) == {}
    current["value"] = None  # unknown
    assert reader.points(metrics.BACKLOG_ENTRIES) == {}


def test_a_failing_source_costs_its_points_not_the_export(reader: Reader) -> None:
    def broken() -> Backlog:
        raise BackendUnavailable("redis", "connection refused")

    reader.metrics.register_backlog_source(broken)
    reader.metrics.register_cache("record", lambda: CacheReading(1, 1, 0))
    assert reader.points(metrics.BACKLOG_ENTRIES) == {}
    assert reader.points(metrics.CACHE_HIT_RATIO) == {(("cache", "record"),): 0.5}


def test_run_duration_and_outcome(reader: Reader) -> None:
    with reader.metrics.measure_run() as run:
        run.outcome = "completed"
    with reader.metrics.measure_run():
        pass  # default outcome
    with pytest.raises(StaleFencingToken), reader.metrics.measure_run():
        raise StaleFencingToken("case_1", 3, 4)
    assert reader.points(metrics.RUNS) == {
        (("outcome", "completed"),): 2,
        (("outcome", "StaleFencingToken"),): 1,
    }
    durations = reader.points(metrics.RUN_DURATION)
    assert durations[(("outcome", "completed"),)].count == 2
    assert durations[(("outcome", "StaleFencingToken"),)].count == 1


def test_state_size_histogram(reader: Reader) -> None:
    reader.metrics.record_state_size("create", 1000)
    reader.metrics.record_state_size("create", 3000)
    point = reader.points(metrics.STATE_SIZE)[(("operation", "create"),)]
    assert (point.count, point.sum, point.max) == (2, 4000, 3000)


async def test_backlog_sampler_reads_on_the_loop_and_serves_the_exporter_thread(
    reader: Reader,
) -> None:
    calls = 0
    refreshed_twice = asyncio.Event()

    async def backlog() -> Backlog:
        nonlocal calls
        calls += 1
        if calls >= 2:
            refreshed_twice.set()
        return Backlog(calls, 1, 0.25)

    sampler = BacklogSampler(backlog, interval_seconds=0.01)
    reader.metrics.register_backlog_source(sampler.latest)
    assert sampler.latest() is None
    sampler.start()
    try:
        await asyncio.wait_for(refreshed_twice.wait(), timeout=5)
        # Collected on another thread, as the periodic exporter does.
        points = await asyncio.to_thread(reader.points, metrics.BACKLOG_ENTRIES)
        assert points[()] >= 1
    finally:
        await sampler.stop()


async def test_backlog_sampler_reports_unknown_when_the_source_fails() -> None:
    async def broken() -> Backlog:
        raise BackendUnavailable("redis", "down")

    sampler = BacklogSampler(broken)
    assert await sampler.refresh() is None
    assert sampler.latest() is None


def test_module_level_registration_reaches_the_process_instruments() -> None:
    source = lambda: Backlog(1, 1, 1.0)  # noqa: E731
    metrics.register_backlog_source(source)
    try:
        assert metrics.app_metrics._backlog is source
    finally:
        metrics.register_backlog_source(None)
