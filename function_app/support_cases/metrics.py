"""OpenTelemetry metrics: what an operator watches (README "Metrics", infra workbook).

Instruments live on one `AppMetrics` per meter. The process-wide one,
`app_metrics`, uses the global MeterProvider that `configure_telemetry` installs
(Azure Monitor exporter in Azure; without a provider every instrument is a no-op).

Most values are read, not pushed: observable instruments call back into sources
the runtime registers once per process (the tiered store's and the checkpoint
cache's hit/miss/error counts, the cold connection's `Counters`), so the hot path
pays nothing. Callbacks run on the exporter's thread: a source must be cheap,
synchronous and safe to read from another thread.

Run slots (CASE_MAX_RUNS): `register_run_slots(slots)`, the service's `RunSlots`
(`taken`, `refused`), read as they stand: this worker's runs in flight and the requests
it refused for want of a slot.

Write-behind backlog: `register_backlog_source(read)` with `read()` returning an
object with `entries`, `threads`, `oldest_age_seconds` (float or None) and
`stuck_threads`, or None when unknown. An async source (`await flusher.backlog()`) goes through a
`BacklogSampler`, which refreshes a snapshot on the event loop:

    sampler = BacklogSampler(backends.flusher.backlog)
    sampler.start()                          # inside the running loop
    register_backlog_source(sampler.latest)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from state import StateError
from state.ports import Counters

if TYPE_CHECKING:
    from state import Backends, TieredStateStore

log = logging.getLogger(__name__)

METER_NAME = "agent_state"
# Instrument names (also used by the workbook queries and the backlog-age alert in infra/).
CACHE_LOOKUPS = "agent_state.cache.lookups"
CACHE_HIT_RATIO = "agent_state.cache.hit_ratio"
HOT_ERRORS = "agent_state.hot.errors"
COLD_REQUESTS = "agent_state.cold.requests"
COLD_REQUEST_CHARGE = "agent_state.cold.request_charge"
STATE_SIZE = "agent_state.state.size"
RUN_DURATION = "agent_state.case.run.duration"
RUNS = "agent_state.case.runs"
RUN_SLOTS_TAKEN = "agent_state.case.run_slots.taken"
RUNS_REFUSED = "agent_state.case.run_slots.refused"
BACKLOG_ENTRIES = "agent_state.write_behind.entries"
BACKLOG_THREADS = "agent_state.write_behind.threads"
BACKLOG_OLDEST_AGE = "agent_state.write_behind.oldest_age_seconds"
BACKLOG_LOSSES = "agent_state.write_behind.losses"
BACKLOG_STUCK_THREADS = "agent_state.write_behind.stuck_threads"


@dataclass(frozen=True)
class CacheReading:
    hits: int
    misses: int
    errors: int
    # Served by the cold tier without asking the hot one (it backs off after a failure).
    bypassed: int = 0

    @property
    def lookups(self) -> int:
        return self.hits + self.misses + self.bypassed


class BacklogLike(Protocol):
    @property
    def entries(self) -> int: ...
    @property
    def threads(self) -> int: ...
    @property
    def oldest_age_seconds(self) -> float | None: ...
    @property
    def stuck_threads(self) -> int: ...


BacklogSource = Callable[[], "BacklogLike | None"]


class RunSlotsLike(Protocol):
    @property
    def taken(self) -> int: ...
    @property
    def refused(self) -> int: ...


@dataclass
class RunMeasure:
    """What `measure_run` records; the caller sets `outcome` for a run no exception ends
    (at rest, or a failure it handled)."""

    outcome: str = "completed"


class AppMetrics:
    """The app's instruments on one meter, and the sources its observable ones read."""

    def __init__(self, meter: Meter) -> None:
        self._caches: dict[str, Callable[[], CacheReading]] = {}
        self._cold: dict[str, Counters] = {}
        self._backlog: BacklogSource | None = None
        self._losses: Callable[[], int] | None = None
        self._run_slots: RunSlotsLike | None = None
        meter.create_observable_counter(
            CACHE_LOOKUPS,
            [self._observe_lookups],
            unit="{lookup}",
            description="Hot-tier lookups by cache and result (hit, miss)",
        )
        meter.create_observable_gauge(
            CACHE_HIT_RATIO,
            [self._observe_hit_ratio],
            unit="1",
            description="Hot-tier hits / lookups since the process started",
        )
        meter.create_observable_counter(
            HOT_ERRORS,
            [self._observe_hot_errors],
            unit="{error}",
            description="Hot-tier calls that failed (served from the cold tier instead)",
        )
        meter.create_observable_counter(
            COLD_REQUESTS,
            [self._observe_cold_requests],
            unit="{request}",
            description="Cold-tier round trips by backend and operation",
        )
        meter.create_observable_counter(
            COLD_REQUEST_CHARGE,
            [self._observe_cold_charge],
            unit="RU",
            description="Cosmos DB request charge by operation (0 on Postgres)",
        )
        meter.create_observable_gauge(
            BACKLOG_ENTRIES,
            [self._observe_backlog("entries")],
            unit="{entry}",
            description="Write-behind entries not yet in the cold tier",
        )
        meter.create_observable_gauge(
            BACKLOG_THREADS,
            [self._observe_backlog("threads")],
            unit="{thread}",
            description="Threads with write-behind entries not yet in the cold tier",
        )
        meter.create_observable_gauge(
            BACKLOG_OLDEST_AGE,
            [self._observe_backlog("oldest_age_seconds")],
            unit="s",
            description="Age of the oldest write-behind entry not yet in the cold tier",
        )
        meter.create_observable_gauge(
            BACKLOG_STUCK_THREADS,
            [self._observe_backlog("stuck_threads")],
            unit="{thread}",
            description="Threads held back by a write-behind entry the cold store refuses for "
            "good (agent-state write-behind stuck)",
        )
        meter.create_observable_counter(
            BACKLOG_LOSSES,
            [self._observe_losses],
            unit="{loss}",
            description="Write-behind checkpoints Redis lost before they reached the cold "
            "tier, as their writers found them (each stops its run, resumed from the cold tier)",
        )
        meter.create_observable_up_down_counter(
            RUN_SLOTS_TAKEN,
            [self._observe_run_slots("taken")],
            unit="{run}",
            description="Case runs this worker drives, with the requests admitted to start one "
            "(at most CASE_MAX_RUNS)",
        )
        meter.create_observable_counter(
            RUNS_REFUSED,
            [self._observe_run_slots("refused")],
            unit="{request}",
            description="Requests this worker refused (503) because it drove CASE_MAX_RUNS "
            "case runs",
        )
        self._state_size = meter.create_histogram(
            STATE_SIZE, unit="By", description="Bytes stored per record create or section write"
        )
        self._run_duration = meter.create_histogram(
            RUN_DURATION, unit="s", description="Duration of case runs by outcome"
        )
        self._runs = meter.create_counter(RUNS, unit="{run}", description="Case runs by outcome")

    # ------------------------------------------------------------------ sources

    def register_cache(self, name: str, read: Callable[[], CacheReading]) -> None:
        """A hot-tier cache's cumulative counts (a later registration of `name` wins)."""
        self._caches[name] = read

    def register_cold(self, backend: str, counters: Counters) -> None:
        self._cold[backend] = counters

    def register_backlog_source(self, read: BacklogSource | None) -> None:
        """The write-behind backlog reader (see the module docstring); None removes it."""
        self._backlog = read

    def register_losses(self, read: Callable[[], int] | None) -> None:
        """How many write-behind losses the saver found (None: no write-behind saver)."""
        self._losses = read

    def register_run_slots(self, slots: RunSlotsLike | None) -> None:
        """This worker's run slots (None removes them)."""
        self._run_slots = slots

    def register_backends(self, backends: Backends, store: TieredStateStore) -> None:
        """Every source an open runtime has: caches, cold counters, stored sizes."""
        stats = store.stats
        self.register_cache(
            "record",
            lambda: CacheReading(stats.hits, stats.misses, stats.hot_errors, stats.bypassed),
        )
        cache_stats = getattr(backends.hot_checkpoints, "stats", None)
        if cache_stats is not None:
            self.register_cache(
                "checkpoint",
                lambda: CacheReading(cache_stats.hits, cache_stats.misses, cache_stats.errors),
            )
        self.register_cold(backends.settings.state_cold_backend.value, backends.cold_counters)
        store.size_listeners.append(self.record_state_size)

    # ------------------------------------------------------------------ pushed values

    def record_state_size(self, operation: str, size: int) -> None:
        self._state_size.record(size, {"operation": operation})

    @contextmanager
    def measure_run(self) -> Iterator[RunMeasure]:
        """Times a case run; an exception escaping it is the outcome (its type name)."""
        measure = RunMeasure()
        started = time.monotonic()
        try:
            yield measure
        except BaseException as error:
            measure.outcome = type(error).__name__
            raise
        finally:
            attributes = {"outcome": measure.outcome}
            self._run_duration.record(time.monotonic() - started, attributes)
            self._runs.add(1, attributes)

    # ------------------------------------------------------------------ callbacks

    def _readings(self) -> Iterable[tuple[str, CacheReading]]:
        for name, read in list(self._caches.items()):
            try:
                yield name, read()
            except Exception:  # a metrics callback must never break the export
                log.exception("cache metrics source %s failed", name)

    def _observe_lookups(self, _: CallbackOptions) -> Iterable[Observation]:
        for name, reading in self._readings():
            yield Observation(reading.hits, {"cache": name, "result": "hit"})
            yield Observation(reading.misses, {"cache": name, "result": "miss"})
            if reading.bypassed:
                yield Observation(reading.bypassed, {"cache": name, "result": "bypassed"})

    def _observe_hit_ratio(self, _: CallbackOptions) -> Iterable[Observation]:
        for name, reading in self._readings():
            if reading.lookups:
                yield Observation(reading.hits / reading.lookups, {"cache": name})

    def _observe_hot_errors(self, _: CallbackOptions) -> Iterable[Observation]:
        for name, reading in self._readings():
            yield Observation(reading.errors, {"cache": name})

    def _observe_losses(self, _: CallbackOptions) -> Iterable[Observation]:
        if self._losses is not None:
            yield Observation(self._losses())

    def _observe_run_slots(
        self, field_name: str
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            slots = self._run_slots
            return [] if slots is None else [Observation(getattr(slots, field_name))]

        return observe

    def _cold_snapshot(self) -> Iterable[tuple[str, str, int, float]]:
        for backend, counters in list(self._cold.items()):
            for operation, (count, charge) in counters.snapshot().items():
                yield backend, operation, count, charge

    def _observe_cold_requests(self, _: CallbackOptions) -> Iterable[Observation]:
        for backend, operation, count, _charge in self._cold_snapshot():
            yield Observation(count, {"backend": backend, "operation": operation})

    def _observe_cold_charge(self, _: CallbackOptions) -> Iterable[Observation]:
        for backend, operation, _count, charge in self._cold_snapshot():
            yield Observation(charge, {"backend": backend, "operation": operation})

    def _observe_backlog(
        self, field_name: str
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            read = self._backlog
            if read is None:
                return []
            try:
                backlog = read()
            except Exception:  # a metrics callback must never break the export
                log.exception("write-behind backlog source failed")
                return []
            value = None if backlog is None else getattr(backlog, field_name)
            return [] if value is None else [Observation(value)]

        return observe


class BacklogSampler:
    """Keeps the latest reading of an async backlog source, refreshed on the event loop.

    Metric callbacks run on the exporter's thread and cannot await; this task can.
    """

    def __init__(
        self, read: Callable[[], Awaitable[BacklogLike]], *, interval_seconds: float = 15.0
    ) -> None:
        self._read = read
        self._interval = interval_seconds
        self._latest: BacklogLike | None = None
        self._task: asyncio.Task[None] | None = None

    def latest(self) -> BacklogLike | None:
        return self._latest

    async def refresh(self) -> BacklogLike | None:
        try:
            self._latest = await self._read()
        except (StateError, OSError):
            # Unknown, not zero: the gauges report nothing rather than an empty backlog.
            log.warning("write-behind backlog unreadable", exc_info=True)
            self._latest = None
        return self._latest

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval)


# The process's instruments, on the global MeterProvider (set by configure_telemetry).
app_metrics = AppMetrics(metrics.get_meter(METER_NAME))


def register_backlog_source(read: BacklogSource | None) -> None:
    """Feed the write-behind backlog gauges of this process (see the module docstring)."""
    app_metrics.register_backlog_source(read)
