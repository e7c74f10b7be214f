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

import contextlib
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from state import (
    ColdRetention,
    SectionWrite,
    StateTooLarge,
    TieredStateStore,
    VersionConflict,
    WorkflowExists,
    WorkflowNotFound,
    WorkflowRecord,
)

from .models import CaseStatus, PendingSection
from .records import UNCHANGED, write_section, write_sections
from .settings import AppSettings

RUNNER_ID = "case-runner"
RUN_SECTION = "run"
INDEX_PREFIX = "support-cases-active-runs-"
INDEX_SHARDS = 8
# Statuses during which nobody is working on the case and nobody needs to.
AT_REST = frozenset({CaseStatus.AWAITING_REVIEW, CaseStatus.COMPLETED, CaseStatus.FAILED})


class RunIndexBusy(Exception):
    """The app's own run index could not be updated now (contention, size): the server's
    problem, not the client's, so callers answer 503 and the client retries."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_run_section(status: CaseStatus, *, attempt: int = 0) -> dict[str, Any]:
    now = utcnow().isoformat()
    return {"status": status.value, "attempt": attempt, "started_at": now, "heartbeat_at": now}


def shard_of(case_id: str) -> str:
    digest = hashlib.sha256(case_id.encode()).digest()
    return f"{INDEX_PREFIX}{digest[0] % INDEX_SHARDS}"


class RunTracker:
    def __init__(
        self, store: TieredStateStore, retention: ColdRetention, settings: AppSettings
    ) -> None:
        self._store = store
        self._retention = retention
        self._stale_after = timedelta(seconds=settings.case_stale_after_seconds)

    async def mark(
        self,
        case_id: str,
        status: CaseStatus,
        *,
        fencing_token: int | None = None,
        error: str | None = None,
        pending: dict[str, PendingSection] | None = None,
    ) -> None:
        """Record the run's status; `pending`: agents' sections the record does not hold
        yet (write-behind), written with it in one record write."""

        def compute(record: WorkflowRecord) -> object:
            run = dict(record.sections.get(RUN_SECTION) or new_run_section(status))
            if status is CaseStatus.RUNNING:
                run["attempt"] = int(run.get("attempt", 0)) + 1
            run.update(status=status.value, heartbeat_at=utcnow().isoformat(), error=error)
            return run

        def compute_all(record: WorkflowRecord) -> list[SectionWrite]:
            writes = [
                SectionWrite(section, entry["value"], entry["agent_id"])
                for section, entry in (pending or {}).items()
                if record.sections.get(section) != entry["value"]
            ]
            return [*writes, SectionWrite(RUN_SECTION, compute(record), RUNNER_ID)]

        if status is CaseStatus.AWAITING_REVIEW:
            await self._retention.hold(case_id)
        elif status in (CaseStatus.COMPLETED, CaseStatus.FAILED):
            await self._retention.release(case_id)
        if pending:
            await write_sections(self._store, case_id, compute_all, fencing_token=fencing_token)
        else:
            await write_section(
                self._store,
                case_id,
                RUN_SECTION,
                compute,
                agent_id=RUNNER_ID,
                fencing_token=fencing_token,
            )
        await self._index(case_id, present=status not in AT_REST)

    async def heartbeat(self, case_id: str, *, fencing_token: int | None = None) -> None:
        """Refresh the heartbeat, at most every quarter of the stale period (each is a cold write)."""

        def compute(record: WorkflowRecord) -> object:
            run = record.sections.get(RUN_SECTION, {})
            last = run.get("heartbeat_at")
            if last and utcnow() - datetime.fromisoformat(last) < self._stale_after / 4:
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

    def is_stale(self, run: dict[str, Any] | None) -> bool:
        if not run or run.get("status") in AT_REST:
            return False
        beat = datetime.fromisoformat(str(run["heartbeat_at"]))
        return utcnow() - beat > self._stale_after

    async def register(self, case_id: str) -> None:
        await self._index(case_id, present=True)

    async def active_cases(self) -> list[str]:
        cases: list[str] = []
        for shard in range(INDEX_SHARDS):
            record = await self._store.get(f"{INDEX_PREFIX}{shard}")
            if record is not None:
                cases.extend(sorted(record.sections.get("cases", {})))
        return cases

    async def forget(self, case_id: str) -> None:
        await self._index(case_id, present=False)

    async def _index(self, case_id: str, *, present: bool) -> None:
        try:
            await self._update_index(case_id, present=present)
        except (VersionConflict, StateTooLarge) as error:
            raise RunIndexBusy(f"the run index is busy ({type(error).__name__}); retry") from error

    async def _update_index(self, case_id: str, *, present: bool) -> None:
        shard = shard_of(case_id)

        def compute(record: WorkflowRecord) -> object:
            cases = dict(record.sections.get("cases", {}))
            if (case_id in cases) == present:
                return UNCHANGED
            if present:
                cases[case_id] = utcnow().isoformat()
            else:
                cases.pop(case_id)
            return cases

        try:
            await write_section(self._store, shard, "cases", compute, agent_id=RUNNER_ID)
            return
        except WorkflowNotFound:
            # Not created yet, or expired from the cold tier (retention) while a hot
            # copy may still stand for it; `create` drops such a copy.
            if not present:
                return
        with contextlib.suppress(WorkflowExists):
            await self._store.create(shard, {"cases": {}}, agent_id=RUNNER_ID)
        await write_section(self._store, shard, "cases", compute, agent_id=RUNNER_ID)
