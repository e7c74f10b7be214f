"""The timer's tick: resume stale runs, drain the write-behind backlog, then sweep
expired state.

No job stops another: a failure of one is logged and the other still
runs, and the first failure is raised only at the end, so the Functions host
records the invocation as failed; but a tick that could not read the whole
run index does not sweep (it cannot tell which cases are due to be resumed).
Each tick logs its counts and adds them to OpenTelemetry counters (exported
wherever the process's meter provider sends metrics; a no-op without one).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from opentelemetry import metrics

from .models import ResumeReport
from .runs import INDEX_IDS, REPAIR_HINT
from .service import CaseService

log = logging.getLogger(__name__)

METER_NAME = "support_cases.timer"
# The counter of stale-run cases, one series per `outcome` attribute value.
CASES_METRIC = "support_cases.timer.cases"
SWEPT_METRIC = "support_cases.timer.swept_threads"
OUTCOMES = ("resumed", "skipped", "failed")
# How long a tick waits for the runs it resumes. The schedule is every minute and the
# host's functionTimeout 10: a run still going then is left to go on (its lease keeps the
# next tick off it), the drain and the sweep still run, and the cases not reached are the
# next tick's.
RESUME_BUDGET_SECONDS = 40.0
# How long the drain and the sweep each start new work (a thread to flush, a batch to
# delete): a large backlog or a slow cold tier must not push the tick past the next one
# (the three fit in the minute); what is left waits for the next tick. Read at each tick.
DRAIN_BUDGET_SECONDS = 10.0
SWEEP_BUDGET_SECONDS = 5.0


class TimerMetrics:
    """The timer's counters on `meter` (default: the global meter provider's)."""

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter(METER_NAME)
        self.cases = meter.create_counter(
            CASES_METRIC,
            unit="{case}",
            description="Active cases the timer looked at, by outcome: resumed, skipped "
            "(refused or heartbeat fresh) or failed (an error, logged)",
        )
        self.swept = meter.create_counter(
            SWEPT_METRIC,
            unit="{thread}",
            description="Expired threads the timer's retention sweep deleted",
        )


# Instruments of the global (proxy) meter bind to whatever provider telemetry installs later.
TIMER_METRICS = TimerMetrics()


@dataclass
class TickReport:
    resumed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    # Run index shards (under `failed` too) whose stored record is unreadable: the sweep
    # waits for their repair (`agent-state run-index repair`), not for a tier to recover.
    damaged: list[str] = field(default_factory=list)
    # None: the sweep failed, or was skipped (the run index not wholly read).
    swept: int | None = None
    # Write-behind entries this tick moved to the cold tier (None: the drain failed).
    flushed: int | None = None


async def run_tick(
    service: CaseService,
    *,
    meters: TimerMetrics = TIMER_METRICS,
    budget_seconds: float = RESUME_BUDGET_SECONDS,
) -> TickReport:
    tick = TickReport()
    errors: list[Exception] = []
    # Each job is guarded whole: a failure of one (the run index unreadable, the cold tier
    # down) must not skip the others. Save the sweep without the whole index: a case the
    # tick could not list is one it did not resume, due to be however long idle, which the
    # sweep cannot tell to spare.
    index_read = False
    try:
        report: ResumeReport = await service.resume_stale(
            deadline=time.monotonic() + budget_seconds
        )
        tick.resumed, tick.skipped, tick.failed = report.resumed, report.skipped, report.failed
        index_read = not any(shard in tick.failed for shard in INDEX_IDS)
        tick.damaged = report.damaged
    except Exception as error:
        log.exception("timer: could not list the active cases")
        errors.append(error)
    try:
        tick.flushed = await service.drain_backlog(deadline=time.monotonic() + DRAIN_BUDGET_SECONDS)
    except Exception as error:
        log.exception("timer: the write-behind drain failed")
        errors.append(error)
    if tick.damaged:
        # No later tick reads these either: retention stays paused until they are repaired.
        log.error(
            "timer: retention sweep skipped: run index shards damaged: %s; %s",
            ", ".join(tick.damaged),
            REPAIR_HINT,
        )
    elif not index_read:
        # Deleting cannot be undone: the sweep waits for a tick that reads the whole index.
        log.warning("timer: retention sweep skipped: the run index was not wholly read")
    else:
        try:
            # The cases this tick did not resume (its budget spent, or their resume failed)
            # are due to be: the sweep must not delete one that is idle past the TTL meanwhile.
            tick.swept = await service.sweep_expired(
                deadline=time.monotonic() + SWEEP_BUDGET_SECONDS,
                spare={*tick.skipped, *tick.failed},
            )
        except Exception as error:
            log.exception("timer: the retention sweep failed")
            errors.append(error)

    counts = {
        "resumed": len(tick.resumed),
        "skipped": len(tick.skipped),
        "failed": len(tick.failed),
    }
    for outcome in OUTCOMES:
        meters.cases.add(counts[outcome], {"outcome": outcome})
    if tick.swept is not None:
        meters.swept.add(tick.swept)
    log.info(
        "timer: stale runs resumed %d, skipped %d, failed %d; write-behind entries flushed: "
        "%s; expired threads deleted: %s",
        counts["resumed"],
        counts["skipped"],
        counts["failed"],
        "drain failed" if tick.flushed is None else tick.flushed,
        "sweep failed or skipped" if tick.swept is None else tick.swept,
    )
    for case_id, why in tick.failed.items():
        log.warning("timer: case %s failed: %s", case_id, why)
    if errors:
        raise errors[0]
    return tick
