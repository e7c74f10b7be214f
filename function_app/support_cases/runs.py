"""Run bookkeeping: each case's `run` section (status + heartbeat) and the index of active runs.

The heartbeat is what the timer trigger looks at: a run still marked running
whose heartbeat is older than CASE_STALE_AFTER_SECONDS belongs to a worker that
died, and is resumed from its last checkpoint. The state library has no
cross-thread query, so active case ids are kept in a few index records
(sharded to spread optimistic-concurrency contention).

Retention follows the status: a case is held (never expires from the cold
tier) before it is marked awaiting review, so a case shown waiting for a human
is never expiring, and released before it is marked completed or failed. A
crash between the two steps leaves a run marked running, which the timer
resumes and which then takes both steps again (each is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from state import (
    ColdRetention,
    ColdStateStore,
    CorruptState,
    SectionWrite,
    StateError,
    StateTooLarge,
    TieredStateStore,
    UnsupportedSchemaVersion,
    VersionConflict,
    WorkflowExists,
    WorkflowNotFound,
    WorkflowRecord,
)

from .admission import RunsBusy
from .models import CaseStatus, FollowUpStrategy, RunStatus
from .records import UNCHANGED, write_section, write_sections
from .settings import BEATS_PER_STALE_PERIOD, AppSettings

log = logging.getLogger(__name__)

RUNNER_ID = "case-runner"
RUN_SECTION = "run"
# In the run section: the attempt of its run that was started under the case's run lock,
# taken while nobody ran the case and held until that attempt ended or could not start
# (a new case's submit, a retry of it: see `CaseService._replay`). While it is the current
# attempt, a free lock means nobody runs it.
LOCKED_ATTEMPT = "locked_attempt"
# The case's runs, oldest first: the intake run, then one per follow-up message.
RUNS_SECTION = "runs"
# Finished runs kept in the record (queued and active ones are always kept).
FINISHED_RUNS_KEPT = 50
# Runs a case may have queued: bounds the record (each holds its message).
MAX_QUEUED_RUNS = 20
# {"held": bool}: whether a review hold keeps the case from retention, so a case that
# never waited for review costs no release (a cold query or statement) when it ends.
# A record without it (written before it existed) may be held.
RETENTION_SECTION = "retention"
RUN_AT_REST = {
    CaseStatus.AWAITING_REVIEW: RunStatus.AWAITING_REVIEW,
    CaseStatus.COMPLETED: RunStatus.COMPLETED,
    CaseStatus.FAILED: RunStatus.FAILED,
    CaseStatus.RUNNING: RunStatus.RUNNING,
}
ACTIVE_RUN = frozenset({RunStatus.RUNNING.value, RunStatus.AWAITING_REVIEW.value})
INDEX_PREFIX = "support-cases-active-runs-"
INDEX_SHARDS = 8
INDEX_IDS = tuple(f"{INDEX_PREFIX}{shard}" for shard in range(INDEX_SHARDS))
STOPPING = frozenset({FollowUpStrategy.INTERRUPT.value, FollowUpStrategy.ROLLBACK.value})
# Statuses during which nobody is working on the case and nobody needs to.
AT_REST = frozenset({CaseStatus.AWAITING_REVIEW, CaseStatus.COMPLETED, CaseStatus.FAILED})
# What reading a record stored unreadably raises: no retry reads it, only a repair
# (`agent-state run-index repair` for a shard of the index).
UNREADABLE = (CorruptState, UnsupportedSchemaVersion)
# How long health reuses what it (or a tick) learnt of damaged shards.
DAMAGED_SHARDS_MAX_AGE_SECONDS = 60.0
REPAIR_HINT = "`agent-state run-index repair` rebuilds it from the case records"


class RunInProgress(Exception):
    """A follow-up with the `reject` strategy while a run is in progress (maps to 409)."""


class QueueFull(Exception):
    """A follow-up to a case with `MAX_QUEUED_RUNS` runs queued already (maps to 409)."""


class RunStopped(Exception):
    """Raised at a step boundary of a run a follow-up asked to stop (interrupt, rollback)."""


class RunIndexBusy(Exception):
    """The app's own run index could not be updated now (contention, size): the server's
    problem, not the client's, so callers answer 503 and the client retries."""


class RunIndexDamaged(RunIndexBusy):
    """The case's shard of the run index is stored unreadably (`UNREADABLE`): nothing that
    needs the case indexed goes on until an operator repairs the shard. A `RunIndexBusy`, so
    every caller refuses such a write as it refuses a busy index (503, nothing half-done)."""

    def __init__(self, shard: str, error: Exception) -> None:
        super().__init__(
            f"the case index ({shard}) is damaged ({type(error).__name__}) and needs an"
            " operator's repair: `agent-state run-index repair`; retry after it"
        )
        self.shard = shard


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_run_section(status: CaseStatus, *, attempt: int = 0) -> dict[str, Any]:
    now = utcnow().isoformat()
    return {"status": status.value, "attempt": attempt, "started_at": now, "heartbeat_at": now}


def new_run_entry(
    run_id: str,
    kind: str,
    status: RunStatus,
    *,
    text: str | None = None,
    strategy: FollowUpStrategy | None = None,
) -> dict[str, Any]:
    now = utcnow().isoformat()
    entry: dict[str, Any] = {"run_id": run_id, "kind": kind, "status": status.value}
    entry.update(queued_at=now, started_at=now if status is RunStatus.RUNNING else None)
    if text is not None:
        entry.update(text=text, strategy=strategy.value if strategy else None)
    return entry


def may_be_held(record: WorkflowRecord) -> bool:
    retention = record.sections.get(RETENTION_SECTION)
    return retention is None or bool(retention.get("held"))


def runs_of(record: WorkflowRecord) -> list[dict[str, Any]]:
    return [dict(entry) for entry in record.sections.get(RUNS_SECTION) or []]


def current_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run the case is in (running, or paused for review); None between runs."""
    return next((entry for entry in runs if entry["status"] in ACTIVE_RUN), None)


def queued(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in runs if entry["status"] == RunStatus.QUEUED.value]


def trimmed(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every queued or active run, and the newest finished ones."""
    finished = [e for e in runs if e["status"] not in ACTIVE_RUN | {RunStatus.QUEUED.value}]
    dropped = {id(entry) for entry in finished[:-FINISHED_RUNS_KEPT]}
    return [entry for entry in runs if id(entry) not in dropped]


def ended(entry: dict[str, Any], status: RunStatus, **fields: Any) -> dict[str, Any]:
    return {**entry, "status": status.value, "ended_at": utcnow().isoformat(), **fields}


def stopped_for_review(runs: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    """The runs once run `run_id` pauses for review: a stopping follow-up still queued (it
    came with another, which stopped the run before) ends the paused run as if it came now
    (the first names the stop, a rollback among them makes it a rollback), rather than wait
    for a decision like an `enqueue`."""
    stopping = [e for e in queued(runs) if e.get("strategy") in STOPPING]
    if not stopping:
        return runs
    rollback = any(e["strategy"] == FollowUpStrategy.ROLLBACK.value for e in stopping)
    stop = FollowUpStrategy.ROLLBACK if rollback else FollowUpStrategy(stopping[0]["strategy"])
    return [
        {**e, "stop": stop.value, "stopped_by": stopping[0]["run_id"]}
        if e["run_id"] == run_id
        else e
        for e in runs
    ]


def shard_of(case_id: str) -> str:
    digest = hashlib.sha256(case_id.encode()).digest()
    return f"{INDEX_PREFIX}{digest[0] % INDEX_SHARDS}"


def listed(record: WorkflowRecord) -> dict[str, str]:
    """The cases a shard's record lists, each with when it was indexed; `CorruptState` for
    a record not of that shape (written by hand, or by a bug): taken for an empty or
    partial list, it would hide cases the timer has to resume."""
    cases = record.sections.get("cases", {}) if isinstance(record.sections, dict) else None
    if not isinstance(cases, dict) or not all(
        isinstance(case_id, str) and isinstance(at, str) for case_id, at in cases.items()
    ):
        raise CorruptState(f"{record.thread_id}: its cases are not a map of case id to time")
    return cases


def has_work(record: WorkflowRecord) -> bool:
    """Whether the case has a run running, stalled, paused or queued (a repair indexes it;
    a tick puts back a case paused for review alone only once a run is queued behind it).
    `CorruptState` for a record whose runs are not of a case's shape (written by hand): a
    caller reports that one case, not an untyped error ending its whole pass."""
    try:
        runs = runs_of(record)
        run = record.sections.get(RUN_SECTION) or {}
        return bool(queued(runs) or current_run(runs) or run.get("status") not in AT_REST)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptState(
            f"{record.thread_id}: its runs are not of a case's shape: {exc!r}"
        ) from exc


@dataclass
class ShardRepair:
    """What `repair_index` did to one shard of the run index."""

    shard: str
    # The error the shard's record raised when read (None: it read fine).
    damaged: str | None = None
    # Cases with work the shard now lists and did not (all of them for a damaged shard).
    indexed: list[str] = field(default_factory=list)
    # A damaged shard read fine on a second look (another repair rebuilt it meanwhile): the
    # cases it missed were merged into it, not written over it.
    merged: bool = False
    # Why the shard was not repaired (None: it was): the other shards are repaired anyway.
    failed: str | None = None
    # Cases of the shard whose record could not be read, each with why: not indexed here.
    unread: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RepairProgress:
    """How far `repair_index` has got through the records, after each one."""

    examined: int
    total: int
    # Cases with work found so far (each indexed once the records are all read), and
    # records that could not be read.
    active: int
    unread: int


class RunTracker:
    def __init__(
        self, store: TieredStateStore, retention: ColdRetention, settings: AppSettings
    ) -> None:
        self._store = store
        self._retention = retention
        self._stale_after = timedelta(seconds=settings.case_stale_after_seconds)
        # Health's answer of which shards are damaged, and when it was had (monotonic).
        self._damaged_known: tuple[float, list[str]] | None = None
        self._damaged_reading: asyncio.Future[list[str]] | None = None

    async def mark(
        self,
        case_id: str,
        status: CaseStatus,
        *,
        fencing_token: int | None = None,
        error: str | None = None,
        still: Callable[[WorkflowRecord], None] | None = None,
        locked: bool = False,
    ) -> int:
        """Record the run's status; returns how many runs are queued after it. `still`
        is called with the record the write goes on (each try): it raises to refuse it.
        `locked`: a run marked running under the case's run lock, taken while nobody ran
        the case, and held until the run ends or cannot start: its attempt is recorded
        (`LOCKED_ATTEMPT`).
        Raises `RunStopped`, writing nothing, for a run to be rolled back that would rest
        completed or failed; `RunIndexBusy` for a run marked running whose index update
        meets a busy shard (before the write, nothing is written; after it, the status is)."""

        def compute(record: WorkflowRecord) -> object:
            run = dict(record.sections.get(RUN_SECTION) or new_run_section(status))
            if status is CaseStatus.RUNNING:
                run["attempt"] = int(run.get("attempt", 0)) + 1
                if locked:
                    run[LOCKED_ATTEMPT] = run["attempt"]
            run.update(status=status.value, heartbeat_at=utcnow().isoformat(), error=error)
            return run

        waiting = 0
        unchanged: WorkflowRecord | None = None

        def compute_all(record: WorkflowRecord) -> list[SectionWrite]:
            nonlocal waiting
            writes: list[SectionWrite] = []
            if still is not None:
                still(record)
            run = compute(record)
            runs = runs_of(record)
            waiting = len(queued(runs))
            run_id = (record.sections.get(RUN_SECTION) or {}).get("run_id")
            entry = next((e for e in runs if e["run_id"] == run_id), None) if run_id else None
            # Only an open run moves (a run a follow-up stopped stays as it ended), or a
            # failed one resumed: listed as running again, a follow-up sees it in progress.
            resumed = status is CaseStatus.RUNNING and (
                entry is not None and entry["status"] == RunStatus.FAILED.value
            )
            # A rollback asked while the run's last step went found no step left to stop
            # at: the run does not rest, its queue's runner rolls it back. Marked completed
            # or failed first, the case would be answered so, then taken back.
            if (
                status in (CaseStatus.COMPLETED, CaseStatus.FAILED)
                and entry is not None
                and entry["status"] in ACTIVE_RUN
                and entry.get("stop") == FollowUpStrategy.ROLLBACK.value
            ):
                raise RunStopped(
                    f"run {run_id} ends rolled back, not {status.value}: follow-up run "
                    f"{entry.get('stopped_by')} asked to roll it back during its last step"
                )
            if entry is not None and (
                resumed
                or (entry["status"] in ACTIVE_RUN and entry["status"] != RUN_AT_REST[status].value)
            ):
                runs[runs.index(entry)] = (
                    {**entry, "status": RunStatus.RUNNING.value, "ended_at": None, "error": None}
                    if status is CaseStatus.RUNNING
                    else ended(entry, RUN_AT_REST[status], error=error)
                )
                if status is CaseStatus.AWAITING_REVIEW and not entry.get("stop"):
                    runs = stopped_for_review(runs, entry["run_id"])
                writes.append(SectionWrite(RUNS_SECTION, trimmed(runs), RUNNER_ID))
            if status in (CaseStatus.COMPLETED, CaseStatus.FAILED) and (
                record.sections.get(RETENTION_SECTION) != {"held": False}
            ):
                writes.append(SectionWrite(RETENTION_SECTION, {"held": False}, RUNNER_ID))
            return [*writes, SectionWrite(RUN_SECTION, run, RUNNER_ID)]

        # The flag says "held" before the hold is taken, the hold is taken before the status
        # says "awaiting review", and the flag says "not held" only after the release: a
        # failure anywhere in between leaves at worst a release that was not needed.
        if status is CaseStatus.AWAITING_REVIEW:
            await write_section(
                self._store,
                case_id,
                RETENTION_SECTION,
                lambda record: UNCHANGED if may_be_held(record) else {"held": True},
                agent_id=RUNNER_ID,
                fencing_token=fencing_token,
            )
            await self._retention.hold(case_id)
        elif status in (CaseStatus.COMPLETED, CaseStatus.FAILED):
            record = await self._store.get(case_id)
            if record is None or may_be_held(record):
                await self._retention.release(case_id)
            else:
                # Nothing happened since this read: the write below goes on it, not on
                # another read of the same record (a newer one conflicts and is re-read).
                unchanged = record
        else:
            # Indexed before it says "running" (a resume or a decision): the timer may have
            # dropped the case while it rested, and a run marked running where the timer
            # never looks stays stalled for good once its worker dies. A busy index refuses
            # the mark (RunIndexBusy) with nothing written.
            await self._index(case_id)
        await write_sections(
            self._store,
            case_id,
            compute_all,
            fencing_token=fencing_token,
            fresh=still is not None,
            current=unchanged,
        )
        # A case with runs queued stays where the timer looks, whatever its status. One at
        # rest stays there too until the timer's next tick drops it with the others of its
        # shard (one index write for them all, off the run's path). A running one is looked
        # up again: a tick that saw it at rest may have dropped it since the index above and
        # checked its record before this write. A busy index raises `RunIndexBusy` then
        # (the status is written): the run is not started nor acknowledged, since a worker
        # dying during it would leave it where the timer never looks; the case reads
        # stalled once its heartbeat is, and a resume indexes it first. At rest, the
        # enqueue that queued the runs indexed the case, and a tick keeps a case with runs
        # queued: a busy index is left to the next mark or tick.
        if status not in AT_REST:
            await self._index(case_id)
        elif waiting > 0:
            try:
                await self._index(case_id)
            except RunIndexBusy as busy:
                log.warning("case %s: run index not updated: %s", case_id, busy)
        return waiting

    async def enqueue(
        self,
        case_id: str,
        entry: dict[str, Any],
        strategy: FollowUpStrategy,
        *,
        agent_id: str,
        queued_now: Callable[[], Awaitable[None]] | None = None,
        behind_a_run: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """Queue a follow-up's run (FIFO; an interrupt or rollback goes before plain queued
        runs and asks the current run to stop). Returns the stored entry and whether it was
        there already (an idempotent replay). Raises `RunIndexBusy` when the run index is
        busy (the run may be queued: a replay indexes the case and starts it).
        `queued_now` is awaited once the run is queued, not on a replay, before the index
        re-check that may raise: the run is queued either way. `behind_a_run`: queue it (or
        replay it still queued) only behind a run that is going, whose runner starts it
        next, or, a plain follow-up, behind a run paused for review that nothing stops,
        whose decision's run starts it next; `RunsBusy` else (in the same write: the run
        cannot rest in between), nothing queued, nor indexed before the write: a case with
        a run going is indexed already, and one paused for review is indexed after it."""
        stored: dict[str, Any] = entry
        replayed = False

        def no_run_going() -> RunsBusy:
            # Between runs, or a stop of a run paused for review: a run would start here.
            return RunsBusy(
                f"this worker drives its most case runs (CASE_MAX_RUNS), and case "
                f"{case_id!r} has no run going to take this follow-up next: it would start "
                f"one; retry in {RunsBusy.retry_after} s"
            )

        def compute(record: WorkflowRecord) -> object:
            nonlocal stored, replayed
            runs = runs_of(record)
            current = current_run(runs)
            going = current is not None and current["status"] == RunStatus.RUNNING.value
            in_review = (
                current is not None
                and current["status"] == RunStatus.AWAITING_REVIEW.value
                and not current.get("stop")
            )

            def taken_next(follow_up: dict[str, Any]) -> bool:
                return going or (in_review and follow_up.get("strategy") not in STOPPING)

            same = next((e for e in runs if e["run_id"] == entry["run_id"]), None)
            if same is not None:
                if (
                    behind_a_run
                    and same["status"] == RunStatus.QUEUED.value
                    and not taken_next(same)
                ):
                    raise no_run_going()  # its replay would start it here
                stored, replayed = same, True
                return UNCHANGED
            stored, replayed = entry, False
            waiting = queued(runs)
            if strategy is FollowUpStrategy.REJECT and (current or waiting):
                busy = current or waiting[0]
                raise RunInProgress(
                    f"case {case_id!r} has a run in progress ({busy['run_id']}, "
                    f"{busy['status']}); send the message again when it ends, or with "
                    "another strategy"
                )
            if len(waiting) >= MAX_QUEUED_RUNS:
                raise QueueFull(
                    f"case {case_id!r} has {len(waiting)} runs queued already; send the "
                    "message again once some have run"
                )
            if behind_a_run and not taken_next(entry):
                raise no_run_going()
            if strategy in (FollowUpStrategy.INTERRUPT, FollowUpStrategy.ROLLBACK):
                if current is not None and (
                    not current.get("stop") or strategy is FollowUpStrategy.ROLLBACK
                ):
                    # The first follow-up to stop the run names it; a rollback also
                    # upgrades an interrupt asked before it (its checkpoints go too).
                    runs[runs.index(current)] = {
                        **current,
                        "stop": strategy.value,
                        "stopped_by": current.get("stopped_by") or entry["run_id"],
                    }
                # Next after the other stopping follow-ups, before plain queued runs.
                ahead = [e for e in waiting if e.get("strategy") in STOPPING]
                at = runs.index(ahead[-1]) + 1 if ahead else len(runs) - len(waiting)
                runs.insert(at, entry)
            else:
                runs.append(entry)
            return trimmed(runs)

        # Indexed first: a queued run is always where the timer looks, even if this request
        # fails after queueing it (a stale entry the timer drops costs nothing).
        if not behind_a_run:
            await self._index(case_id)
        await write_section(self._store, case_id, RUNS_SECTION, compute, agent_id=agent_id)
        if not replayed:
            if queued_now is not None:
                await queued_now()
            # Again: a tick that saw the case at rest may have dropped it since the index
            # above and checked its record before the run was queued (`forget`). A busy index
            # raises `RunIndexBusy` (503) rather than acknowledge a run the timer may never
            # find; the client's retry replays the message, and its first index puts the
            # case back.
            await self._index(case_id)
        return stored, replayed

    async def start_next(
        self,
        case_id: str,
        *,
        fencing_token: int | None,
        sections: dict[str, Any] | None = None,
        current: WorkflowRecord | None = None,
    ) -> dict[str, Any] | None:
        """Start the oldest queued run (one write: the run section and its entry), unless the
        case is in a run (running, or paused for review); the started entry, or None.
        `sections`: agents' sections set back to what the state the run starts from holds,
        in the same write. `current`: the record the caller just read, tried first."""
        started: dict[str, Any] | None = None

        def compute(record: WorkflowRecord) -> list[SectionWrite]:
            nonlocal started
            runs = runs_of(record)
            waiting = queued(runs)
            started = None
            if current_run(runs) is not None or not waiting:
                return []
            at = runs.index(waiting[0])
            started = runs[at] = {
                **waiting[0],
                "status": RunStatus.RUNNING.value,
                "started_at": utcnow().isoformat(),
            }
            run = {**new_run_section(CaseStatus.RUNNING, attempt=1), "run_id": started["run_id"]}
            restored = [
                SectionWrite(name, value, RUNNER_ID)
                for name, value in (sections or {}).items()
                if record.sections.get(name) != value
            ]
            return [
                *restored,
                SectionWrite(RUNS_SECTION, runs, RUNNER_ID),
                SectionWrite(RUN_SECTION, run, RUNNER_ID),
            ]

        await write_sections(
            self._store, case_id, compute, fencing_token=fencing_token, current=current
        )
        return started

    async def end_stopped(
        self,
        case_id: str,
        run_id: str,
        status: RunStatus,
        *,
        fencing_token: int | None,
        discarded_effects: list[dict[str, Any]],
        sections: dict[str, Any] | None = None,
    ) -> None:
        """Record a run a follow-up stopped (interrupted, or rolled back with the effects it
        had done); the case's status is the next run's, which starts right after.
        `sections`: agents' sections set back to what the state before a rolled-back run
        holds, in the same write."""

        def compute(record: WorkflowRecord) -> list[SectionWrite]:
            runs = runs_of(record)
            entry = next((e for e in runs if e["run_id"] == run_id), None)
            if entry is None or entry["status"] not in ACTIVE_RUN:
                return []
            runs[runs.index(entry)] = ended(entry, status, discarded_effects=discarded_effects)
            restored = [
                SectionWrite(name, value, RUNNER_ID)
                for name, value in (sections or {}).items()
                if record.sections.get(name) != value
            ]
            return [*restored, SectionWrite(RUNS_SECTION, runs, RUNNER_ID)]

        await write_sections(self._store, case_id, compute, fencing_token=fencing_token)

    async def heartbeat(self, case_id: str, *, fencing_token: int | None = None) -> None:
        """Refresh the heartbeat, at most every quarter of the stale period (each is a cold write)."""

        def compute(record: WorkflowRecord) -> object:
            run = record.sections.get(RUN_SECTION, {})
            last = run.get("heartbeat_at")
            # At rest (the run's last step marked it so as its keeper beat): nothing to tell.
            if run.get("status") in AT_REST or (
                last
                and utcnow() - datetime.fromisoformat(last)
                < self._stale_after / BEATS_PER_STALE_PERIOD
            ):
                return UNCHANGED
            return {**run, "heartbeat_at": utcnow().isoformat()}

        await write_section(
            self._store,
            case_id,
            RUN_SECTION,
            compute,
            agent_id=RUNNER_ID,
            fencing_token=fencing_token,
        )

    def indexed_long_ago(self, indexed_at: str) -> bool:
        """Whether an index entry is older than the stale period: one without a record is
        then a submit that died before creating its case, not one still creating it."""
        return utcnow() - datetime.fromisoformat(indexed_at) > self._stale_after

    def may_look_abandoned(self, indexed_at: str) -> bool:
        """Whether a tick may have taken the entry for a dead submit's (`indexed_long_ago`)
        by now: half the stale period spares the other workers' clocks."""
        return utcnow() - datetime.fromisoformat(indexed_at) > self._stale_after / 2

    def is_stale(self, run: dict[str, Any] | None) -> bool:
        if not run or run.get("status") in AT_REST:
            return False
        beat = datetime.fromisoformat(str(run["heartbeat_at"]))
        return utcnow() - beat > self._stale_after

    async def register(self, case_id: str) -> str:
        """Index a case about to be created; returns when its entry was indexed (an entry
        a submit that died before creating the case left may be old)."""
        return await self._index(case_id)

    async def active_cases(
        self, *, unread: dict[str, str] | None = None, damaged: list[str] | None = None
    ) -> dict[str, str]:
        """The indexed cases, each with when it was indexed (ISO time), in order. `unread`: a
        shard that cannot be read goes there (its id, the error) and the others are still
        read, so it costs only its own cases; the first error is raised when no shard could
        be read (unless every one is damaged), or at once without `unread`. `damaged`: the
        unread shards whose stored record is unreadable (`UNREADABLE`), which no later read
        will read either."""
        cases: dict[str, str] = {}
        errors: list[StateError] = []
        for shard_id in INDEX_IDS:
            try:
                # From the cold tier: a worker cut off from Redis indexes cases there alone.
                record = await self._store.get_fresh(shard_id)
                if record is not None:
                    cases.update(sorted(listed(record).items()))
            except StateError as error:
                if unread is None:
                    raise
                if isinstance(error, UNREADABLE):
                    log.error(
                        "run index shard %s is damaged (%s: %s): its cases are not resumed "
                        "and retention waits until it is repaired; %s",
                        shard_id,
                        type(error).__name__,
                        error,
                        REPAIR_HINT,
                    )
                    if damaged is not None:
                        damaged.append(shard_id)
                else:
                    log.exception("run index shard %s could not be read", shard_id)
                unread[shard_id] = f"{type(error).__name__}: {error}"
                errors.append(error)
        if len(errors) == INDEX_SHARDS and not all(isinstance(e, UNREADABLE) for e in errors):
            raise errors[0]  # the index, not one shard, is out of reach (a tier down)
        if damaged is not None and len(damaged) == len(errors):
            # Every shard was read or found damaged: what health tells of them is as new as
            # this. One out of reach may be damaged still: it does not read as repaired.
            self._damaged_known = (time.monotonic(), list(damaged))
        return cases

    async def forget(self, case_ids: Collection[str]) -> None:
        """Drop cases at rest from the index, one write per shard, then put back any that
        has work: a run queued (or started) in the meantime, whose own index update found
        the case still there. Every case is checked even when a write fails; the first
        failure (`RunIndexBusy`, or the tier's own error) is raised at the end."""
        by_shard: dict[str, set[str]] = {}
        for case_id in case_ids:
            by_shard.setdefault(shard_of(case_id), set()).add(case_id)
        failed: list[RunIndexBusy | StateError] = []
        for shard, dropped in sorted(by_shard.items()):
            try:
                await self._drop(shard, dropped)
            except (RunIndexBusy, StateError) as error:
                failed.append(error)  # dropped or not: its cases are checked all the same
            for case_id in sorted(dropped):
                try:
                    await self._keep_if_busy(case_id)
                except (RunIndexBusy, StateError) as error:
                    failed.append(error)
        if failed:
            raise failed[0]

    async def damaged_shards(self) -> list[str]:
        """The shards whose stored record is unreadable (`UNREADABLE`), all read at once;
        a shard out of reach for another reason is not one (the tiers' health says so).
        Known for `DAMAGED_SHARDS_MAX_AGE_SECONDS` (a tick's period): health is probed
        often, and eight cold reads a probe would cost more than the news is worth."""
        known = self._damaged_known
        if known is not None and time.monotonic() - known[0] < DAMAGED_SHARDS_MAX_AGE_SECONDS:
            return list(known[1])
        # One set of reads at a time: probes arriving while they are slow (and those whose
        # wait for them ran out) join them rather than piling eight more on the cold tier.
        reading = self._damaged_reading
        if reading is None or reading.done():
            reading = asyncio.ensure_future(self._read_damaged_shards())
            reading.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._damaged_reading = reading
        return list(await asyncio.shield(reading))

    async def close(self) -> None:
        """End the shard reads still under way (a probe gave up on them): they would
        otherwise outlive the stores they read."""
        reading = self._damaged_reading
        if reading is not None and not reading.done():
            reading.cancel()
            await asyncio.wait({reading})

    async def _read_damaged_shards(self) -> list[str]:
        async def damaged(shard_id: str) -> bool | None:
            try:
                record = await self._store.get_fresh(shard_id)
                if record is not None:
                    listed(record)
            except UNREADABLE:
                return True
            except StateError:
                return None  # not known: not kept as "not damaged" either
            return False

        found = await asyncio.gather(*(damaged(shard_id) for shard_id in INDEX_IDS))
        shards = [shard_id for shard_id, bad in zip(INDEX_IDS, found, strict=True) if bad]
        if None not in found:
            self._damaged_known = (time.monotonic(), shards)
        return list(shards)

    async def repair_index(
        self,
        cold: ColdStateStore,
        shards: Collection[str] = INDEX_IDS,
        on_progress: Callable[[RepairProgress], None] | None = None,
    ) -> list[ShardRepair]:
        """Rebuild `shards` from the case records (every case with work, `has_work`), for an
        operator: a damaged shard is overwritten, conditioned on its damaged version (a shard
        repaired meanwhile is merged into instead); a readable one gets the cases it misses,
        by the index's own versioned write, and keeps the others (a submit's entry may
        precede its record). Idempotent, and safe while workers run: none of them can
        write a damaged shard, and every write here is versioned. `cold`: the store below
        `self._store`, which lists every record and gives a damaged shard's version without
        decoding it (`stored_version`).
        A shard that fails (its version unreadable too, as a schema version newer than this
        code; the tier out of reach) and a case whose record cannot be read are reported in
        its `ShardRepair` (`failed`, `unread`), and the others repaired all the same.
        `on_progress` is told after each record: a large store takes a while to read."""
        wanted = set(shards)
        repairs = {shard_id: ShardRepair(shard_id) for shard_id in wanted}
        active: dict[str, list[str]] = {shard_id: [] for shard_id in wanted}
        record_ids = await cold.record_ids()
        found = unread = 0
        for examined, case_id in enumerate(record_ids, start=1):
            shard = shard_of(case_id)
            if shard in wanted and case_id not in INDEX_IDS:
                try:
                    record = await self._store.get_fresh(case_id)
                    # Archive records (`<case>~archive~...`) and other threads hold no `run`.
                    if record is not None and RUN_SECTION in record.sections and has_work(record):
                        active[shard].append(case_id)
                        found += 1
                except StateError as error:
                    # Corrupt, a section offloaded and lost (WorkflowNotFound), out of reach.
                    repairs[shard].unread[case_id] = f"{type(error).__name__}: {error}"
                    unread += 1
            if on_progress is not None:
                on_progress(RepairProgress(examined, len(record_ids), found, unread))
        for shard in sorted(wanted):
            try:
                await self._repair_shard(repairs[shard], sorted(active[shard]), cold)
            except (StateError, RunIndexBusy) as error:
                repairs[shard].failed = f"{type(error).__name__}: {error}"
        return [repairs[shard] for shard in sorted(wanted)]

    async def _repair_shard(
        self, repair: ShardRepair, cases: list[str], cold: ColdStateStore
    ) -> None:
        shard = repair.shard
        while True:
            try:
                record = await self._store.get_fresh(shard)
                present = listed(record) if record is not None else {}
            except UNREADABLE as error:
                repair.damaged = f"{type(error).__name__}: {error}"
                # Its version, then a second look: a shard another repair rebuilt in between
                # reads now, and one still damaged was so at that version or was written
                # since, which the write below, conditioned on the version, refuses.
                version = await cold.stored_version(shard)
                if version is None:
                    continue  # deleted meanwhile: created below, on the next pass
                if await self._reads_as_shard(shard):
                    # Repaired (by another repair) and written since it was read: the write
                    # below would drop what was indexed since.
                    continue
                now = utcnow().isoformat()
                try:
                    # Its sections replaced whole: they may not even be an object.
                    await self._store.replace_damaged(
                        shard,
                        {"cases": dict.fromkeys(cases, now)},
                        agent_id=RUNNER_ID,
                        expected_version=version,
                    )
                except (VersionConflict, WorkflowNotFound):
                    continue  # repaired (or written, or deleted) meanwhile: read it again
                repair.indexed = cases
                return
            repair.merged = repair.damaged is not None
            for case_id in cases:
                if case_id not in present:
                    await self._index(case_id)
                    repair.indexed.append(case_id)
            return

    async def _reads_as_shard(self, shard: str) -> bool:
        """Whether the shard's record reads (or there is none) on the cold tier now."""
        try:
            record = await self._store.get_fresh(shard)
            if record is not None:
                listed(record)
        except UNREADABLE:
            return False
        return True

    async def _keep_if_busy(self, case_id: str) -> None:
        record = await self._store.get_fresh(case_id)
        if record is None or not has_work(record):
            return
        # Not a run paused for review alone: the timer has nothing to do for it and let it
        # go as resting; put back, it would cost its shard a write every tick for as long as
        # the review takes. A run queued behind it, or its decision's run, keeps it here.
        run = record.sections.get(RUN_SECTION) or {}
        if queued(runs_of(record)) or run.get("status") not in AT_REST:
            await self._index(case_id)

    async def _drop(self, shard: str, dropped: set[str]) -> None:
        def compute(record: WorkflowRecord) -> object:
            cases = dict(listed(record))
            if not dropped & cases.keys():
                return UNCHANGED
            return {case_id: at for case_id, at in cases.items() if case_id not in dropped}

        try:
            await write_section(self._store, shard, "cases", compute, agent_id=RUNNER_ID)
        except WorkflowNotFound:
            return  # nothing indexed there (or expired from the cold tier)
        except (VersionConflict, StateTooLarge) as error:
            raise RunIndexBusy(f"the run index is busy ({type(error).__name__}); retry") from error

    async def _index(self, case_id: str) -> str:
        try:
            return await self._add_to_index(case_id)
        except (VersionConflict, StateTooLarge) as error:
            raise RunIndexBusy(f"the run index is busy ({type(error).__name__}); retry") from error
        except UNREADABLE as error:
            raise RunIndexDamaged(shard_of(case_id), error) from error

    async def _add_to_index(self, case_id: str) -> str:
        """Returns when the case's entry was indexed."""
        shard = shard_of(case_id)
        indexed_at = ""

        def compute(record: WorkflowRecord) -> object:
            nonlocal indexed_at
            cases = dict(listed(record))
            if case_id in cases:
                indexed_at = str(cases[case_id])
                return UNCHANGED
            cases[case_id] = indexed_at = utcnow().isoformat()
            return cases

        # Not created yet, or expired from the cold tier (retention) while a hot copy may
        # still stand for it: `create` drops such a copy.
        # "Listed already" confirmed on the cold tier: a hot copy may still list a case a
        # timer cut off from Redis dropped, and it writes nothing a conflict would correct.
        with contextlib.suppress(WorkflowNotFound):
            await write_section(
                self._store, shard, "cases", compute, agent_id=RUNNER_ID, fresh=True
            )
            return indexed_at
        with contextlib.suppress(WorkflowExists):
            await self._store.create(shard, {"cases": {}}, agent_id=RUNNER_ID)
        await write_section(self._store, shard, "cases", compute, agent_id=RUNNER_ID, fresh=True)
        return indexed_at
