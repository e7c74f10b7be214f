"""The support-case use cases: submit, status, history, audit, decide, resume, and the
timer's resume_stale and sweep_expired.

Knows nothing of HTTP. A run is driven in a background task so a caller can
stop waiting after CASE_SYNC_WAIT_SECONDS (and answer 202) while the run goes
on; a run holds the case's lock from the hot tier, and its fencing token goes
with every write (records and checkpoints), so a stale runner cannot overwrite a
newer one. Without a reachable hot tier, a lease in the case's cold record
(claimed by a versioned write that raises the record's fence) keeps a second
runner out instead: two review decisions or resumes racing on one case never
both drive the graph. A run renews its lock or lease RENEWALS_PER_TTL times per
STATE_LOCK_TTL_MS for as long as it lives; a renewal that finds it taken (or that
cannot land before it runs out) stops the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.types import Command, StateSnapshot

from state import (
    FENCING_TOKEN_KEY,
    HEALTH_PROBE_SECONDS,
    BackendUnavailable,
    Caller,
    ColdRetention,
    FlushLockBusy,
    HotStateLost,
    Lock,
    LockLost,
    LockNotAcquired,
    ParentGone,
    StaleFencingToken,
    StateError,
    TieredCheckpointSaver,
    TieredStateStore,
    VersionConflict,
    WorkflowExists,
    WorkflowRecord,
    acting_for,
    taken_or_given_back,
)

from .admission import RunsBusy, RunSlots
from .agents import RunContext
from .deadline import waiting_for_run
from .effects import (
    INCARNATION_FIELD,
    REQUEST_SECTION,
    EffectInProgress,
    SimulatedProvider,
    effects_in,
    effects_since,
)
from .events import CaseEvents
from .graph import CaseGraph
from .metrics import RunMeasure, app_metrics
from .models import (
    AuditEntryView,
    AuditTrailView,
    BacklogView,
    CallerView,
    CaseStatus,
    CaseSubmission,
    CaseView,
    CheckpointPageView,
    CheckpointView,
    EffectView,
    FollowUp,
    FollowUpStrategy,
    HealthView,
    ResumeReport,
    ReviewDecision,
    RunStatus,
    RunsView,
    RunView,
    StuckEntryView,
    TierView,
)
from .records import MAX_ATTEMPTS, UNCHANGED, write_section
from .runs import (
    AT_REST,
    INDEX_IDS,
    INDEX_PREFIX,
    LOCKED_ATTEMPT,
    RETENTION_SECTION,
    RUN_SECTION,
    RUNNER_ID,
    RUNS_SECTION,
    QueueFull,
    RunIndexBusy,
    RunInProgress,
    RunStopped,
    RunTracker,
    current_run,
    new_run_entry,
    new_run_section,
    queued,
    runs_of,
    utcnow,
)
from .settings import BEATS_PER_STALE_PERIOD, RENEWALS_PER_TTL, AppSettings
from .telemetry import traced

log = logging.getLogger(__name__)

API_AGENT_ID = "case-api"
GraphInput = dict[str, Any] | Command | None
T = TypeVar("T")
# Ids of the app's own records, which share the thread-id space with case ids.
RESERVED_ID_PREFIXES = (INDEX_PREFIX, SimulatedProvider.LEDGER_PREFIX)
# A keyed follow-up's run entry: the id of the caller whose Idempotency-Key made it.
KEYED_BY_FIELD = "keyed_by"
# Expired threads the timer deletes per tick: keeps one tick short; the next takes the rest.
SWEEP_LIMIT = 500
# Times a run goes on from the cold tier after Redis lost its unflushed checkpoints (a
# FLUSHALL, a failover; each loss costs the steps since the last boundary) before it is
# left for the timer: a Redis that keeps losing them is an outage, not a blip.
REDOS_AFTER_HOT_STATE_LOST = 3
# Times a run waits out another attempt's claim on a side effect before it is left for the
# timer: each claim's lease ends once nobody renews it, so more means something is wrong.
EFFECT_LEASE_WAITS = 3


class CaseError(Exception):
    """A use case refused a request; the API maps each subclass to a status code."""


class CaseNotFound(CaseError):
    def __init__(self, case_id: str) -> None:
        super().__init__(f"case {case_id!r} not found")


class CaseConflict(CaseError):
    """The case is not in a state that allows the request (maps to 409)."""


class DecisionTakenBack(CaseConflict):
    """A decision that resumed its run, which a rollback then took with the decision."""


class CaseBusy(CaseConflict):
    """Another runner's lease (hot-tier lock or cold-tier lease) keeps the case; maps to 409
    with `Retry-After`. A stalled case's runner is dead: its lease only has to run out."""

    def __init__(self, case_id: str, *, stalled: bool, lease_ends_at: datetime | None) -> None:
        self.case_id = case_id
        self.stalled = stalled
        self.lease_ends_at = lease_ends_at
        left = (lease_ends_at - utcnow()).total_seconds() if lease_ends_at else 0.0
        # Whole seconds, rounded up so a client retrying on time finds the lease gone.
        self.retry_after = max(1, math.ceil(left))
        ends = (
            f"ends at {lease_ends_at.isoformat(timespec='seconds')} (in {self.retry_after} s)"
            if lease_ends_at
            else "is ending"
        )
        if stalled:
            message = (
                f"case {case_id!r} is stalled: its previous runner stopped sending heartbeats, "
                f"and that runner's lease {ends}; resume it then"
            )
        else:
            message = f"case {case_id!r} is being worked on; its runner's lease {ends}"
        super().__init__(message)


class RunUnfinished(CaseConflict):
    """The request's run stopped before coming to rest: another runner took the case over,
    or it was left for the timer (maps to 409). Not 200: the case is not where the request
    took it, and what the run did is for the one that carries it on."""

    def __init__(self, case_id: str) -> None:
        super().__init__(
            f"case {case_id!r}: the run stopped before coming to rest (another runner took "
            "the case over, or left it for the timer's resume); read the case's status"
        )


class IdempotencyMismatch(CaseError):
    """An idempotency key reused with a different request body (maps to 422, as the IETF
    Idempotency-Key draft has it); a case id reused so is a CaseConflict (409)."""


class ReservedCaseId(CaseError):
    """A case id that names one of the app's own records (maps to 422)."""


RUN_LEASE_SECTION = "run_lease"


@dataclass(frozen=True)
class RunGuard:
    """What keeps a second runner of a case out: the hot-tier lock, else a cold-tier lease."""

    lock: Lock | None = None
    lease_token: str | None = None
    # The cold lease's fencing token: the record's fence its claim raised.
    lease_fence: int | None = None
    # time.monotonic() when the claim was sent: the lock or lease is ours until then + TTL.
    taken_at: float = 0.0

    @property
    def fence(self) -> int | None:
        return self.lock.fence if self.lock else self.lease_fence


@dataclass(frozen=True)
class Outcome:
    view: CaseView
    created: bool  # a new case was stored (False: an idempotent replay)
    finished: bool  # the run reached rest before the caller stopped waiting


@dataclass(frozen=True)
class MessageOutcome:
    run: RunView
    replayed: bool  # the same message (idempotency key) was accepted before
    finished: bool  # its run reached rest before the caller stopped waiting


def case_config(
    case_id: str, *, fencing_token: int | None = None, run_id: str | None = None
) -> RunnableConfig:
    """The case's thread; a run passes its fencing token, which its checkpoint writes
    present (a run that lost its lock is refused before the cold tier), and its run id,
    which LangGraph records in each checkpoint's metadata (a rollback deletes by it)."""
    configurable: dict[str, Any] = {"thread_id": case_id}
    if fencing_token is not None:
        configurable[FENCING_TOKEN_KEY] = fencing_token
    config: RunnableConfig = {"configurable": configurable}
    if run_id is not None:
        config["metadata"] = {"run_id": run_id}
    return config


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex}"


def message_run_id(case_id: str, idempotency_key: str | None) -> str:
    """A follow-up's run id: derived from its idempotency key (a retry finds its run), else new."""
    if not idempotency_key:
        return new_run_id()
    digest = hashlib.sha256(f"{case_id}\n{idempotency_key}".encode()).hexdigest()
    return f"run-{digest[:32]}"


def fingerprint(submission: CaseSubmission) -> str:
    payload = submission.model_dump(mode="json", exclude={"case_id", "client_key"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def case_id_for(
    submission: CaseSubmission, idempotency_key: str | None, caller: Caller | None = None
) -> str:
    """The given id; else one derived from the client's key (so a retry finds it); else new.

    A derived id includes the caller: two callers who happen to pick one key get two cases.
    """
    if submission.case_id:
        return submission.case_id
    key = idempotency_key or submission.client_key
    if key:
        scope = f"{caller.id}\n" if caller else ""
        digest = hashlib.sha256(f"{scope}{submission.customer_id}\n{key}".encode()).hexdigest()
        return f"case-{digest[:24]}"
    return f"case-{uuid.uuid4().hex}"


class CaseService:
    def __init__(
        self,
        store: TieredStateStore,
        graph: CaseGraph,
        settings: AppSettings,
        retention: ColdRetention,
        saver: TieredCheckpointSaver | None = None,
        events: CaseEvents | None = None,
    ) -> None:
        self._store = store
        self._graph = graph
        self._events = events or CaseEvents(None)
        self._settings = settings
        self._retention = retention
        # Write-behind mode: a run's checkpoints reach the cold tier at its end, before
        # any answer reports the state it rests in.
        self._saver = saver
        self._flusher = saver.flusher if saver is not None else None
        self._tracker = RunTracker(store, retention, settings)
        self._sync_wait = settings.case_sync_wait_seconds
        self._slots = RunSlots(settings.case_max_runs)
        self._tasks: set[asyncio.Task[None]] = set()
        # Run guards being taken (a cancelled caller's among them: its guard is let go of
        # as the take ends, see `_taken`), then the releases of run guards under way, kept
        # to their end (see `_let_go`): `close` waits for both, or a lease claimed as the
        # process stops would be given back on closed stores and held to its TTL.
        self._claims: set[asyncio.Future[RunGuard]] = set()
        self._releases: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def run_slots(self) -> RunSlots:
        """This worker's bound on case runs (its metrics read it)."""
        return self._slots

    # ------------------------------------------------------------------ use cases

    async def submit(
        self,
        submission: CaseSubmission,
        idempotency_key: str | None,
        caller: Caller | None = None,
    ) -> Outcome:
        """Store and start a case; `caller` (the authenticated submitter) owns it. Refused
        (`RunsBusy`) before anything is written while this worker drives its most runs,
        unless it names a case that exists (a replay, or a conflict), which starts none."""
        with acting_for(caller), self._slots.refusals_counted():
            try:
                with self._slots.admitted():
                    return await self._submit(submission, idempotency_key, caller)
            except RunsBusy:
                # A client retrying a submit whose answer it lost is answered with its case,
                # not sent back for as long as the worker stays busy.
                case_id = case_id_for(submission, idempotency_key, caller)
                named = submission.case_id or idempotency_key or submission.client_key
                if not named or case_id.startswith(RESERVED_ID_PREFIXES):
                    raise
                existing = await self._store.get(case_id)
                if existing is None or REQUEST_SECTION not in existing.sections:
                    raise
                self._same_request(existing, submission, caller)
                if await self._first_run_left(existing):
                    # Its submit could not start it: the retry that starts it comes back
                    # once this worker has room.
                    raise
                return Outcome(await self.status(case_id), created=False, finished=True)

    async def _submit(
        self, submission: CaseSubmission, idempotency_key: str | None, caller: Caller | None
    ) -> Outcome:
        case_id = case_id_for(submission, idempotency_key, caller)
        if case_id.startswith(RESERVED_ID_PREFIXES):
            raise ReservedCaseId(f"case id {case_id!r} is reserved; choose another case id")
        request = {
            **submission.model_dump(mode="json", exclude={"case_id", "client_key"}),
            "fingerprint": fingerprint(submission),
            "idempotency_key": idempotency_key or submission.client_key,
            "submitted_by": caller.to_json() if caller else None,
            # In the effects' idempotency keys: a case id reused after retention swept the
            # old case must not find the old case's refund at a deduplicating provider.
            INCARNATION_FIELD: uuid.uuid4().hex,
        }
        run_id = new_run_id()
        # Indexed before it exists: a crash in between leaves an index entry the
        # timer drops, never a case nobody would resume.
        indexed_at = await self._tracker.register(case_id)
        if submission.case_id or idempotency_key or submission.client_key:
            # A named case may exist (a retry, or a conflict): answered without its run
            # lock, which, taken even for the create that finds the case, refuses a decision
            # or resume meanwhile. `_replay` takes it only to start a run left unstarted.
            existing = await self._existing(case_id)
            if existing is not None:
                return await self._replay(existing, submission, caller)
        # Taken before the case exists and kept until its first run ends (or cannot start):
        # a retry that takes it later knows no submit is on its way to start that run.
        guard = await self._try_lock(case_id)
        creating = asyncio.ensure_future(
            self._store.create(
                case_id,
                # Created as its first run, which starts right away: that run's RUNNING
                # mark would be one more write. Should the run never start (a crash before
                # it does), its heartbeat goes stale like any run's and the timer resumes it;
                # a retry of this submit starts it first (see `_replay`).
                {
                    REQUEST_SECTION: request,
                    RUN_SECTION: {
                        **new_run_section(CaseStatus.RUNNING, attempt=1),
                        "run_id": run_id,
                        # The submit holds the lock from before the case exists.
                        LOCKED_ATTEMPT: 1 if guard is not None else None,
                    },
                    RUNS_SECTION: [new_run_entry(run_id, "intake", RunStatus.RUNNING)],
                    RETENTION_SECTION: {"held": False},
                },
                agent_id=API_AGENT_ID,
            )
        )
        try:
            # Shielded: a caller gone before its case's first run starts (the client left,
            # the server cancelled the handler) would leave the case, created "running",
            # with nobody running it until the timer finds it stalled, and its retry would
            # replay that. The create goes on, and its first run starts all the same.
            await asyncio.shield(creating)
        except asyncio.CancelledError:
            self._spawn(
                case_id,
                self._first_run_once_created(
                    creating, case_id, run_id, request, indexed_at, guard, tell_queued=True
                ),
            )
            raise
        except WorkflowExists:
            if guard is not None:
                await self._let_go_of_case(case_id, guard)
            return await self._replay(await self._record(case_id), submission, caller)
        except BaseException:
            if guard is not None:
                await self._release(case_id, guard)
            raise
        launched = told_queued = handed = let_go = False

        async def initial_input(snapshot: StateSnapshot | None) -> GraphInput:
            nonlocal launched
            if let_go and first_run_unmarked(await self._record(case_id, fresh=True)) != run_id:
                # A retry took the case while this submit did not hold it, and started the run.
                raise CaseConflict(f"case {case_id!r}: its first run was started meanwhile")
            launched = True  # `_launch` spawns the run in this same step
            return self._initial_input(case_id, request)

        try:
            # Told before this submit lets go of the case: a retry that takes it then may
            # start the run, and end it, before this submit would tell it queued.
            await self._events.publish(case_id, "run_queued", run_id=run_id, kind="intake")
            told_queued = True
            if guard is not None and self._may_run_out(guard):
                # A slow create: taken again by `_launch`, which starts the run unless a
                # retry that took the case meanwhile has. In the try: a submit cancelled
                # as it lets go still gets its first run started.
                slow, guard, let_go = guard, None, True
                await self._let_go_of_case(case_id, slow)
            if self._tracker.may_look_abandoned(indexed_at):
                # A tick drops an entry without a record once it is older than the stale
                # period (a dead submit's): one this old (this submit was slow, or found the
                # entry a dead one left) may have gone before the case existed. Indexed
                # again before the case is acknowledged; a busy index answers 503, and the
                # client's retry indexes it first (and starts its run).
                await self._tracker.register(case_id)
            # A case just created has no checkpoint to look at: its first run starts fresh.
            # Not once the submit let go of it: a retry may have run it meanwhile.
            if self._saver is not None and not let_go:
                self._saver.expect_new_thread(case_id)
            handed = True  # `_launch` releases the guard on every path from here
            return await self._launch(
                case_id,
                initial_input,
                created=True,
                wait_seconds=self._sync_wait,
                needs_snapshot=False,
                guard=guard,
            )
        except RunUnfinished:
            # Its first run lost the case to another runner (or was left for the timer):
            # the case exists, and is that runner's.
            return Outcome(await self.status(case_id), created=True, finished=False)
        except CaseBusy:
            # A follow-up (or a retry) took the case's run lock between its creation and
            # here: the case exists, and is being worked on (a 409 would read as "not
            # created"). The holder leaves the first run, marked running, to its runner: this
            # one, once it can (none if a retry started it).
            self._spawn(case_id, self._first_run_when_free(case_id, run_id, request))
            return Outcome(await self.status(case_id), created=True, finished=False)
        except CaseConflict:
            if not let_go:
                raise
            # A retry started the first run (see `initial_input`): the case, as it is.
            return Outcome(await self.status(case_id), created=True, finished=False)
        except asyncio.CancelledError:
            if not launched:  # as above
                self._spawn(
                    case_id,
                    self._first_run_once_created(
                        creating,
                        case_id,
                        run_id,
                        request,
                        indexed_at,
                        None if handed else guard,
                        tell_queued=not told_queued,
                    ),
                )
            raise
        except BaseException:
            if guard is not None and not handed:
                await self._let_go_of_case(case_id, guard)
            raise

    async def _existing(self, case_id: str) -> WorkflowRecord | None:
        """The case if it exists, found with no cold read for a new case: the hot tier's copy
        says it may, the cold tier says it does (a copy may outlive a case retention
        removed). None for one the hot tier holds no copy of (evicted, Redis out of reach):
        its submit finds it as the create fails."""
        if not await self._store.is_cached(case_id):
            return None
        existing = await self._store.get_fresh(case_id)
        if existing is None or REQUEST_SECTION not in existing.sections:
            return None
        return existing

    def _may_run_out(self, guard: RunGuard) -> bool:
        """Whether a run lock held since `guard.taken_at`, unrenewed, could run out before a
        run given it now renews it for the first time."""
        renewal = self._settings.state_lock_ttl_ms / 1000 / RENEWALS_PER_TTL
        return time.monotonic() - guard.taken_at > renewal

    async def _let_go_of_case(self, case_id: str, guard: RunGuard) -> None:
        """Release the run lock a request held, not for a run: a follow-up queued meanwhile
        found the case taken and left its run to the holder, which starts it now. Shielded
        and kept to its end, as a release is: a request cancelled as it lets go would leave
        that run queued for the timer."""
        await asyncio.shield(self._let_go(case_id, guard, queue_left=True))

    async def _replay(
        self, existing: WorkflowRecord, submission: CaseSubmission, caller: Caller | None
    ) -> Outcome:
        """A submit of a case that exists: the case as it is, if it is the same request from
        the same caller (else the conflict, raised from None: called while handling how the
        case was found to exist). A first run its submit could not start (a tier out of
        reach: it answered 503) is started now, not left "running" until the timer finds it
        stalled; so is one an earlier retry started in its place that could not start
        either (a flapping store)."""
        case_id = existing.thread_id
        self._same_request(existing, submission, caller)
        left = intake_run_left(existing)
        if left is not None:
            # Its attempt's starter (the submit, or a retry) held the case's run lock from
            # before the start until the run ended or could not start: taken now, that
            # starter is over, and the run is ours. Busy, the run is on its way (or a
            # follow-up's): answered as it is.
            run_id = left[0]
            guard = await self._try_lock(case_id)
            if guard is not None:

                async def continue_first_run(snapshot: StateSnapshot | None) -> GraphInput:
                    record = await self._record(case_id, fresh=True)
                    return self._continuation(case_id, record, snapshot)

                try:
                    outcome = await self._launch(
                        case_id,
                        continue_first_run,
                        wait_seconds=self._sync_wait,
                        run_id=run_id,
                        fresh=True,
                        still=self._intake_run_still_left(case_id, left),
                        guard=guard,
                        locked=True,
                    )
                except RunUnfinished:
                    # As in `_submit`: the run it got going lost the case to another runner.
                    return Outcome(await self.status(case_id), created=True, finished=False)
                except CaseConflict:
                    pass
                else:
                    # The submit that got this run going: answered as a first submit is.
                    return replace(outcome, created=True)
        return Outcome(await self.status(case_id), created=False, finished=True)

    async def _first_run_left(self, existing: WorkflowRecord) -> bool:
        """Whether `existing`'s intake run is one its submit (or a retry) could not start and
        nobody runs (its run lock free: `_replay` would start it)."""
        if intake_run_left(existing) is None:
            return False
        guard = await self._try_lock(existing.thread_id)
        if guard is None:
            return False
        # A follow-up queued while it was held left its run to this holder: started now.
        await self._let_go_of_case(existing.thread_id, guard)
        return True

    @staticmethod
    def _same_request(
        existing: WorkflowRecord, submission: CaseSubmission, caller: Caller | None
    ) -> None:
        """Nothing if the same caller submitted the same request as `existing`'s (a
        replay); else the conflict."""
        case_id = existing.thread_id
        owner = Caller.from_json(existing.sections[REQUEST_SECTION].get("submitted_by"))
        if caller is not None and (owner is None or owner.id != caller.id):
            # Said without showing the case: it is someone else's.
            raise CaseConflict(
                f"case id {case_id!r} is taken by another caller; choose another case id"
            ) from None
        if existing.sections[REQUEST_SECTION].get("fingerprint") != fingerprint(submission):
            if submission.case_id:
                # The id names a case the body does not describe: a conflict with the
                # resource's state (409), not a key reused for another request.
                raise CaseConflict(
                    f"case {case_id!r} already exists with a different request; "
                    "use a new case id for a new case"
                ) from None
            raise IdempotencyMismatch(
                f"case {case_id!r} already exists with a different request; "
                "use a new idempotency key for a new case"
            ) from None

    async def _first_run_once_created(
        self,
        creating: asyncio.Future[Any],
        case_id: str,
        run_id: str,
        request: dict[str, Any],
        indexed_at: str,
        guard: RunGuard | None,
        *,
        tell_queued: bool,
    ) -> None:
        """The first run of a case whose submit was cancelled before starting it, once
        `creating` has created the case (none if the case existed, or the write failed: the
        timer sees to the case should it have landed). `guard`: the case's run lock the
        submit held, if any, released on every path. `tell_queued`: the submit was
        cancelled before it published the run's `run_queued`. None once `close` began
        either: a submit the stopping server cancels would start a run `close` waits for no
        more, on stores about to close; the case is the timer's, as a stopped worker's."""
        created = exists = False
        try:
            await creating
            exists, created = True, not self._closing
        except WorkflowExists:
            exists = True
        except Exception:
            # Logged here: the request that would have answered with it is gone.
            log.warning("case %s: a cancelled submit's create failed", case_id, exc_info=True)
        try:
            if not created:
                return
            if self._tracker.may_look_abandoned(indexed_at):
                await self._tracker.register(case_id)  # as `_submit` does
            if tell_queued:
                await self._events.publish(case_id, "run_queued", run_id=run_id, kind="intake")
            if guard is not None and self._may_run_out(guard):
                await self._let_go_of_case(case_id, guard)  # as `_submit` does
                guard = None
            handed, guard = guard, None  # released by `_first_run_when_free` from here
        except (CaseError, RunIndexBusy, StateError):
            # Nobody else would hear of it; the case, created "running", is the timer's.
            log.warning(
                "case %s: a cancelled submit's first run did not start", case_id, exc_info=True
            )
            return
        finally:
            if guard is not None:
                if exists:
                    await self._let_go_of_case(case_id, guard)
                else:
                    await self._release(case_id, guard)
        # What the run raises is logged as this task fails (`_forget`), as any background
        # run's failure is; a run that stopped unfinished, where it stopped.
        await self._first_run_when_free(case_id, run_id, request, handed)

    async def _first_run_when_free(
        self, case_id: str, run_id: str, request: dict[str, Any], guard: RunGuard | None = None
    ) -> None:
        """Drive a new case's first run once the case's holder lets go (`guard`: the run
        lock, held already), unless it no longer waits for that (a follow-up stopped it; the
        timer resumed it). Given up after a lock TTL: a holder that long is a runner, which
        takes the run or leaves it to the timer."""
        deadline = time.monotonic() + self._settings.state_lock_ttl_ms / 1000
        pause = 0.02
        while guard is None:
            try:
                guard = await self._acquire(case_id)
            except CaseBusy:
                if time.monotonic() >= deadline:
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)
        try:
            record = await self._record(case_id, fresh=True)
        except BaseException:
            await self._release(case_id, guard)
            raise
        if first_run_unmarked(record) != run_id:
            await self._pump(case_id, guard)  # what is left is the queue's
            return
        await self._drive(
            case_id, self._initial_input(case_id, request), guard, marked=True, run_id=run_id
        )

    async def status(self, case_id: str) -> CaseView:
        record = await self._record(case_id)
        snapshot = await self._graph.aget_state(case_config(case_id))
        return self._view(record, snapshot, lease_ends_at=await self._lease_end(case_id, record))

    async def history(
        self, case_id: str, *, limit: int = 20, before: str | None = None
    ) -> CheckpointPageView:
        await self._record(case_id)
        before_config: RunnableConfig | None = None
        if before:
            before_config = {"configurable": {"thread_id": case_id, "checkpoint_id": before}}
        items: list[CheckpointView] = []
        async for snapshot in self._graph.aget_state_history(
            case_config(case_id), before=before_config, limit=limit + 1
        ):
            items.append(_checkpoint_view(snapshot))
        more = len(items) > limit
        items = items[:limit]
        return CheckpointPageView(
            case_id=case_id,
            checkpoints=items,
            next_before=items[-1].checkpoint_id if more and items else None,
        )

    async def audit(self, case_id: str, *, limit: int = 50) -> AuditTrailView:
        await self._record(case_id)
        entries = await self._store.audit_trail(case_id, limit=limit)
        return AuditTrailView(
            case_id=case_id,
            entries=[
                AuditEntryView(
                    version=entry.version,
                    agent_id=entry.agent_id,
                    caller=CallerView(**entry.caller.to_json()) if entry.caller else None,
                    section=entry.section,
                    before=entry.before,
                    after=entry.after,
                    at=entry.at,
                )
                for entry in entries
            ],
        )

    async def decide(
        self, case_id: str, decision: ReviewDecision, caller: Caller | None = None
    ) -> Outcome:
        """Resume an interrupted case with a decision; `caller` is the reviewer of record."""
        answer = decision.model_dump(mode="json")
        if caller is not None:
            answer.update(reviewer_id=caller.id, reviewer_name=caller.name)
        elif not decision.reviewer_id:
            raise CaseConflict("a review decision needs a reviewer")
        with acting_for(caller), self._slots.refusals_counted():
            try:
                with self._slots.admitted():
                    return await self._decide(case_id, answer)
            except RunsBusy:
                # Said first, as a worker with room says it: a case that cannot take the
                # decision is no reason to come back. From the cold tier: a hot copy may
                # lag what a worker cut off from Redis wrote.
                self._awaiting_review(case_id, await self._record(case_id, fresh=True))
                raise

    def _awaiting_review(self, case_id: str, record: WorkflowRecord) -> dict[str, Any] | None:
        """The run awaiting a decision as the record tells (None if it lists none);
        `CaseConflict` if the case awaits none."""
        runs = runs_of(record)
        paused = current_run(runs)
        run_id = (record.sections.get(RUN_SECTION) or {}).get("run_id")
        # Stopped and ended too: its runner died before the follow-up's run was marked, so
        # the record still says "awaiting review" of a run that no longer awaits anything.
        stopped = (
            paused if paused is not None else next((e for e in runs if e["run_id"] == run_id), None)
        )
        if stopped is not None and stopped.get("stop"):
            raise CaseConflict(
                f"case {case_id!r}: the run awaiting review was stopped by follow-up "
                f"{stopped.get('stopped_by')} ({stopped['stop']}); its run decides anew"
            )
        status = self._status_of(record)
        if status is not CaseStatus.AWAITING_REVIEW:
            raise CaseConflict(f"case {case_id!r} is not awaiting review (status: {status.value})")
        return paused

    async def _decide(self, case_id: str, answer: dict[str, Any]) -> Outcome:
        await self._record(case_id)
        resumed: str | None = None

        async def resume_with_decision(snapshot: StateSnapshot | None) -> GraphInput:
            nonlocal resumed
            # Under the lock, from the cold tier: a hot copy may predate a decision another
            # worker applied while it could not reach Redis.
            record = await self._record(case_id, fresh=True)
            paused = self._awaiting_review(case_id, record)
            # The record alone is not enough: a decision whose run failed after it was
            # recorded leaves it pending in the checkpoint, and LangGraph would apply that
            # one, not this (the case is failed then: resuming it applies the first).
            if snapshot is None or not snapshot.interrupts:
                raise CaseConflict(
                    f"case {case_id!r} is not awaiting review "
                    f"(status: {self._status_of(record).value})"
                )
            resumed = paused["run_id"] if paused is not None else None
            return Command(resume=answer)

        outcome = await self._launch(
            case_id,
            resume_with_decision,
            wait_seconds=self._sync_wait,
            fresh=True,
            still=self._still(case_id, CaseStatus.AWAITING_REVIEW),
        )
        if resumed is not None:
            # A rollback asked while the decision's run went takes the decision with it (the
            # follow-up's own run may still be going).
            ended = next(
                (e for e in runs_of(await self._record(case_id)) if e["run_id"] == resumed), None
            )
            if ended is not None and ended["status"] == RunStatus.ROLLED_BACK:
                raise DecisionTakenBack(
                    f"case {case_id!r}: follow-up {ended.get('stopped_by')} rolled back the "
                    "run this decision resumed, and the decision with it; decide again"
                )
        return outcome

    async def resume(
        self,
        case_id: str,
        *,
        wait_until_rest: bool = False,
        deadline: float | None = None,
        caller: Caller | None = None,
        stalled_only: bool = False,
    ) -> Outcome:
        """Continue a stalled or failed run from its last checkpoint. `deadline` (a
        `time.monotonic()` time): with `wait_until_rest`, stop waiting then (the run goes on).
        `stalled_only`: the timer's resume, which a failed run is not (nobody asked for it)."""
        resumable = (
            (CaseStatus.STALLED,) if stalled_only else (CaseStatus.STALLED, CaseStatus.FAILED)
        )
        if not wait_until_rest:
            wait_seconds: float | None = self._sync_wait
        elif deadline is None:
            wait_seconds = None
        else:
            wait_seconds = max(0.0, deadline - time.monotonic())
        with acting_for(caller), self._slots.refusals_counted():
            try:
                with self._slots.admitted():
                    return await self._resume(case_id, wait_seconds, resumable)
            except RunsBusy:
                # As a decision's: a case with nothing to resume is said so first.
                self._resumable(case_id, await self._record(case_id, fresh=True), resumable)
                raise

    def _resumable(
        self, case_id: str, record: WorkflowRecord, resumable: tuple[CaseStatus, ...]
    ) -> None:
        """`CaseConflict` unless the case's status is one of `resumable`."""
        status = self._status_of(record)
        if status not in resumable:
            raise CaseConflict(
                f"case {case_id!r} has nothing to resume (status: {status.value}); "
                f"only {' or '.join(s.value for s in resumable)} runs are resumed"
            )

    async def _resume(
        self, case_id: str, wait_seconds: float | None, resumable: tuple[CaseStatus, ...]
    ) -> Outcome:
        await self._record(case_id)

        async def continue_run(snapshot: StateSnapshot | None) -> GraphInput:
            record = await self._record(case_id, fresh=True)
            self._resumable(case_id, record, resumable)
            return self._continuation(case_id, record, snapshot)

        return await self._launch(
            case_id,
            continue_run,
            wait_seconds=wait_seconds,
            fresh=True,
            still=self._still(case_id, *resumable),
        )

    def _continuation(
        self, case_id: str, record: WorkflowRecord, snapshot: StateSnapshot | None
    ) -> GraphInput:
        """The input that continues the case's current run from its latest checkpoint."""
        if snapshot is None or snapshot.created_at is None:  # died before the first checkpoint
            return self._initial_input(case_id, record.sections[REQUEST_SECTION])
        run_id = (record.sections.get(RUN_SECTION) or {}).get("run_id")
        entry = next((e for e in runs_of(record) if e["run_id"] == run_id), None)
        # A follow-up's run that died before its message was checkpointed (the latest
        # checkpoint is an earlier run's): its message goes in now, once.
        if (
            entry is not None
            and entry.get("text") is not None
            and (snapshot.metadata or {}).get("run_id") != run_id
        ):
            return self._message_input(case_id, record, entry["text"])
        return None

    async def resume_stale(self, *, deadline: float | None = None) -> ResumeReport:
        """What the timer runs: resume every active case whose heartbeat went stale.

        Each case is isolated: whatever one case raises is logged and reported under
        `failed`, and the other cases are still tried. `deadline` (a `time.monotonic()`
        time): a run still going then is left to go on, and the cases not looked at yet
        are left for the next tick (under `skipped`)."""
        report = ResumeReport(resumed=[])
        with traced("case.resume_stale") as span:
            resting: list[str] = []
            # A shard of the run index that cannot be read is reported as failed: the
            # other shards' cases are still tried.
            indexed = list(
                (
                    await self._tracker.active_cases(unread=report.failed, damaged=report.damaged)
                ).items()
            )
            # From a random start, wrapping round: the budget may run out part-way, and a
            # fixed order would let stalled cases at its front (a steady inflow of them)
            # starve those at its back for good; so each case is the first tried with
            # probability 1/len every tick, whatever comes and goes before it.
            start = random.randrange(len(indexed)) if indexed else 0
            for case_id, indexed_at in indexed[start:] + indexed[:start]:
                if deadline is not None and time.monotonic() >= deadline:
                    report.skipped[case_id] = "left for the next tick: its time budget is spent"
                    continue
                try:
                    # Within this worker's bound on runs, like a request's.
                    with self._slots.admitted():
                        if await self._resume_if_stale(case_id, indexed_at, report, deadline):
                            resting.append(case_id)
                except RunsBusy:
                    report.skipped[case_id] = (
                        "left for the next tick: this worker drives its most runs"
                    )
                except CaseError as refused:
                    report.skipped[case_id] = str(refused)
                # One case's trouble (a tier down, a busy run index, a damaged record)
                # must not cost the others their resume, nor the tick its sweep.
                except Exception as error:
                    log.exception("case %s: the timer could not resume it", case_id)
                    report.failed[case_id] = f"{type(error).__name__}: {error}"
            # Runs that ended since the last tick left their cases here: one write a shard.
            try:
                await self._tracker.forget(resting)
            except (RunIndexBusy, StateError) as error:
                log.warning("run index not trimmed this tick: %s", error)
            span.set_attribute("resumed", len(report.resumed))
            span.set_attribute("failed", len(report.failed))
        return report

    async def _resume_if_stale(
        self, case_id: str, indexed_at: str, report: ResumeReport, deadline: float | None
    ) -> bool:
        """Resume the case if its run stalled; True if it rests, with nothing for the timer
        to do (it leaves the index). `indexed_at`: when the index took the case."""
        # From the cold tier: a hot copy may predate what a worker cut off from Redis wrote
        # (its run may be going, or stalled), and a case at rest leaves the index.
        record = await self._store.get_fresh(case_id)
        run = record.sections.get(RUN_SECTION) if record else None
        runs = runs_of(record) if record is not None else []
        at_rest = run is None or run.get("status") in AT_REST
        stale = run is not None and self._tracker.is_stale(run)
        entry = next((e for e in runs if e["run_id"] == (run or {}).get("run_id")), None)
        if (at_rest and has_queue_work(runs)) or (stale and entry is not None and "stop" in entry):
            # Queued runs whose starter died before starting them, a worker that ended its
            # run and died before the next, a stop asked of a run nobody drives (paused for
            # review, or its worker dead): the queue's runner takes it from here.
            if (task := await self._start_queued(case_id)) is not None:
                # A Functions instance may freeze once the timer returns: wait, within the
                # tick's budget (a run past it goes on; its lease keeps it from the next tick).
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                await asyncio.wait({task}, timeout=left)
                # Failed before its end: counted as failed, as a resume's failure is; not
                # raised, which would log it again (its task's end logged it, `_forget`).
                if task.done() and not task.cancelled() and (error := task.exception()):
                    report.failed[case_id] = f"{type(error).__name__}: {error}"
                    return False
                report.resumed.append(case_id)
            else:
                # Counted, and spared by the tick's sweep, as a stalled case held elsewhere is.
                report.skipped[case_id] = "another runner holds it: it takes the queue"
            return False
        if record is None and not self._tracker.indexed_long_ago(indexed_at):
            # A submit indexes its case before creating it: dropped now, a case created just
            # after (this tick's check of it would predate it) runs where the timer never
            # looks, stalled for good should its worker die.
            report.skipped[case_id] = "not created yet"
            return False
        if record is None or at_rest:
            if queued(runs):
                report.skipped[case_id] = "runs queued behind a review"
                return False
            return True
        if not stale:
            report.skipped[case_id] = "heartbeat is fresh"
            return False
        if not await self._backlog_flushed(case_id, deadline):
            report.skipped[case_id] = "left for the next tick: its flush lock is held elsewhere"
            return False
        # The timer waits for the run (within its budget): a Functions instance may freeze
        # once it returns. Stalled still under the lock: another worker's tick may have
        # resumed the run since this look, and left it failed.
        await self.resume(case_id, wait_until_rest=True, deadline=deadline, stalled_only=True)
        report.resumed.append(case_id)
        return False

    async def _backlog_flushed(self, case_id: str, deadline: float | None) -> bool:
        """Flush the case's write-behind backlog (a dead worker's) before the timer resumes
        it, waiting for its flush lock until `deadline` at most; False if another process
        held the lock that long. The resume's own reads flush it first too, each waiting up
        to LOCK_WAIT_SECONDS (three of them, minutes in all): the tick would overrun its
        budget and the timer's period. Once flushed, they have nothing to wait for."""
        if self._flusher is None or deadline is None:
            return True
        try:
            if await self._flusher.log.pending(case_id):
                await self._flusher.flush_thread(case_id, deadline=deadline)
        except FlushLockBusy:
            return False
        except BackendUnavailable:
            pass  # a tier out of reach: the resume meets it too, and does what it does then
        return True

    async def post_message(
        self,
        case_id: str,
        message: FollowUp,
        idempotency_key: str | None,
        caller: Caller | None = None,
    ) -> MessageOutcome:
        """A follow-up message: queued as a run of the case, handled per its strategy
        (`reject`, `enqueue`, `interrupt`, `rollback`), started here if nobody runs the case.
        Refused (`RunsBusy`) before it is queued while this worker drives its most runs,
        unless it is a replay of one queued before that has started, or it is queued behind
        a run that is going or, a plain one, behind a review (none starts a run here)."""
        with acting_for(caller), self._slots.refusals_counted():
            try:
                with self._slots.admitted():
                    return await self._post_message(case_id, message, idempotency_key, caller)
            except RunsBusy:
                # As a replayed submit: a client retrying a message whose answer it lost is
                # answered with its run, not sent back for as long as the worker stays busy.
                if idempotency_key:
                    run_id = message_run_id(case_id, idempotency_key)
                    stored = next(
                        (e for e in runs_of(await self._record(case_id)) if e["run_id"] == run_id),
                        None,
                    )
                    if stored is not None and stored["status"] != RunStatus.QUEUED.value:
                        return await self._replayed_message(case_id, stored, message, caller)
                # Queued behind a run that is going (a stop, or a plain enqueue), it needs no
                # slot: that run's runner starts it next, in the slot it holds; nor does a
                # plain one behind a review, which the decision's run starts. One still
                # queued, taken so before, is its replay (a stop's started only if its runner
                # is gone). Else it would start a run more, and is refused.
                return await self._post_message(
                    case_id, message, idempotency_key, caller, without_slot=True
                )

    async def _post_message(
        self,
        case_id: str,
        message: FollowUp,
        idempotency_key: str | None,
        caller: Caller | None,
        *,
        without_slot: bool = False,
    ) -> MessageOutcome:
        """`without_slot`: this worker has no run slot for it; only a follow-up queued behind
        a run that is going, or a plain one behind a review, is taken then (`RunsBusy` else,
        nothing queued), and a stop's run is started here only if that run's runner is gone."""
        await self._record(case_id)
        strategy = message.strategy or self._settings.case_default_strategy
        entry = new_run_entry(
            message_run_id(case_id, idempotency_key),
            "message",
            RunStatus.QUEUED,
            text=message.text,
            strategy=strategy,
        )
        if idempotency_key and caller is not None:
            # The key is the caller's: another caller's message under it is not its retry.
            entry[KEYED_BY_FIELD] = caller.id

        async def queued_now() -> None:
            # Before the run index's re-check: a busy shard refuses the request (503)
            # with the run queued, and the client's retry is a replay, which tells
            # nothing.
            await self._events.publish(
                case_id,
                "run_queued",
                run_id=entry["run_id"],
                kind="message",
                strategy=strategy.value,
                text=message.text,
            )

        try:
            stored, replayed = await self._tracker.enqueue(
                case_id,
                entry,
                strategy,
                agent_id=API_AGENT_ID,
                queued_now=queued_now,
                behind_a_run=without_slot,
            )
        except (RunInProgress, QueueFull) as refused:
            raise CaseConflict(str(refused)) from None
        if replayed:
            # Without a slot too: a stop still queued, its runner gone since it was taken,
            # is started here, as below.
            return await self._replayed_message(case_id, stored, message, caller)
        # Without a slot, the run it is queued behind is going (its runner reads the queue
        # once that run rests, after this write, and starts this one), or paused for review
        # (the decision's run starts it). A stop's runner gone (the case free) leaves it to
        # whoever takes the case: here, past the bound, as any queue taken up outside a
        # request, rather than queued until the timer finds the run stalled (a plain one
        # waits for the stalled run's resume).
        task = await self._start_queue_work(case_id)
        if task is not None and not without_slot:
            with waiting_for_run():
                await asyncio.wait({task}, timeout=self._sync_wait)
        view = await self._run_view(case_id, entry["run_id"])
        return MessageOutcome(view, replayed=False, finished=view.status not in BUSY)

    async def _replayed_message(
        self, case_id: str, stored: dict[str, Any], message: FollowUp, caller: Caller | None
    ) -> MessageOutcome:
        """The answer to a message whose Idempotency-Key queued `stored` before; a run still
        queued is started if nobody runs the case."""
        keyed_by = stored.get(KEYED_BY_FIELD)
        if keyed_by is not None and caller is not None and keyed_by != caller.id:
            # The case's submitter and an operator both write to it: one's message under
            # the other's key was answered as a replay of a request it never made.
            raise IdempotencyMismatch(
                f"Idempotency-Key already used on case {case_id!r} by another caller; "
                "use a new key for a new message"
            )
        strategy = message.strategy or self._settings.case_default_strategy
        # The same message is the same text and the same strategy: a retry that asks for
        # another strategy is another request, not a replay.
        if stored.get("text") != message.text or stored.get("strategy") != strategy.value:
            raise IdempotencyMismatch(
                f"Idempotency-Key already used on case {case_id!r} for another "
                "message; use a new key for a new message"
            )
        if stored["status"] == RunStatus.QUEUED.value:
            # The first request may have ended before starting it (a 503, a crash).
            await self._start_queue_work(case_id)
        view = run_view(stored)
        return MessageOutcome(view, replayed=True, finished=view.status not in BUSY)

    async def runs(self, case_id: str) -> RunsView:
        record = await self._record(case_id)
        return RunsView(case_id=case_id, runs=[run_view(entry) for entry in runs_of(record)])

    async def awaiting_review(self, case_id: str) -> bool:
        """Whether the case awaits a review decision now (from its record alone)."""
        return self._status_of(await self._record(case_id)) is CaseStatus.AWAITING_REVIEW

    async def submitter(self, case_id: str) -> Caller | None:
        """Who submitted the case (None: submitted without authentication)."""
        record = await self._record(case_id)
        return Caller.from_json(record.sections[REQUEST_SECTION].get("submitted_by"))

    @property
    def events(self) -> CaseEvents:
        return self._events

    async def _run_view(self, case_id: str, run_id: str) -> RunView:
        record = await self._record(case_id)
        return run_view(next(e for e in runs_of(record) if e["run_id"] == run_id))

    async def _start_queue_work(self, case_id: str) -> asyncio.Task[None] | None:
        """`_start_queued` if the case's queue has work for its runner (`has_queue_work`);
        None else: runs queued behind a run going or paused for review are started by that
        run's runner (the decision's, the timer's resume), and the case taken for nothing
        would hold a run slot meanwhile (past the bound on a full worker)."""
        record = await self._store.get(case_id)
        if record is None or not has_queue_work(runs_of(record)):
            return None
        return await self._start_queued(case_id)

    async def _start_queued(self, case_id: str) -> asyncio.Task[None] | None:
        """Take the case and run its queue in the background; None if another runner holds
        it (that runner starts the queued runs when its own ends)."""
        try:
            guard = await self._acquire(case_id)
        except CaseBusy:
            return None
        return self._spawn_holding(case_id, guard, lambda: self._pump(case_id, guard))

    async def sweep_expired(
        self,
        *,
        limit: int = SWEEP_LIMIT,
        deadline: float | None = None,
        spare: Collection[str] = (),
    ) -> int:
        """The timer's other job: delete up to `limit` threads whose last activity is older
        than the cold TTL, whole (a case held for review never is, nor one in `spare`: the
        tick's cases due to be resumed); returns how many. No more are started after
        `deadline` (a `time.monotonic()` time): the next tick takes the rest."""
        # Nor the run index: a shard no case entered or left for a TTL still lists the cases
        # the timer has to resume.
        spare = {*spare, *INDEX_IDS}
        with traced("case.sweep_expired") as span:
            swept = await self._retention.sweep(limit=limit, spare=spare, deadline=deadline)
            span.set_attribute("swept", swept)
        return swept

    async def health(self) -> HealthView:
        # At once, each bounded: a partitioned Redis costs one probe's wait, not three.
        started = time.monotonic()
        tiers, backlog = await asyncio.gather(self._store.health(), self._backlog())
        cold_name = self._settings.state_cold_backend.value
        cold_up = all(tier.up for tier in tiers if cold_name in tier.name.lower())
        # Within what is left of the probes' bound; not with the cold tier down (reads
        # that would only wait on it too, holding connections).
        left = HEALTH_PROBE_SECONDS - (time.monotonic() - started)
        damaged = await self._damaged_shards(left) if cold_up else []
        status: Literal["ok", "degraded", "down"] = (
            "ok" if all(t.up for t in tiers) else ("degraded" if cold_up else "down")
        )
        if (
            status == "ok"
            and backlog is not None
            and backlog.oldest_age_seconds is not None
            and backlog.oldest_age_seconds > self._settings.state_backlog_degraded_seconds
        ):
            status = "degraded"  # the cold tier is falling behind what Redis acknowledged
        if status == "ok" and backlog is not None and backlog.stuck_threads:
            status = "degraded"  # threads whose later steps can never be made durable
        if status == "ok" and damaged:
            status = "degraded"  # stalled runs there are not resumed, nothing is swept
        return HealthView(
            status=status,
            tiers=[TierView(**vars(tier)) for tier in tiers],
            backlog=backlog,
            damaged_index_shards=damaged,
        )

    async def _damaged_shards(self, seconds: float) -> list[str]:
        """The run index's damaged shards (eight point reads of the cold tier); none known
        when they do not answer within `seconds`."""
        reads = asyncio.ensure_future(self._tracker.damaged_shards())
        await asyncio.wait({reads}, timeout=max(0.0, seconds))
        if not reads.done():
            # Cancelled, not awaited, like the tier probes: psycopg winds a query to a
            # partitioned server down in its own time (~10 s).
            reads.cancel()
            reads.add_done_callback(lambda done: done.cancelled() or done.exception())
            return []
        return reads.result()

    async def _backlog(self) -> BacklogView | None:
        if self._flusher is None:
            return None
        try:
            async with asyncio.timeout(HEALTH_PROBE_SECONDS):
                found = await self._flusher.backlog()
        except (BackendUnavailable, TimeoutError):
            return None  # Redis is down or partitioned: its tier's probe reports it
        stuck = found.oldest_stuck
        return BacklogView(
            entries=found.entries,
            threads=found.threads,
            oldest_age_seconds=found.oldest_age_seconds,
            stuck_threads=found.stuck_threads,
            oldest_stuck=None
            if stuck is None
            else StuckEntryView(
                thread_id=stuck.thread_id,
                entry_id=stuck.entry_id,
                checkpoint_id=stuck.checkpoint_id,
                reason=stuck.reason,
                since=stuck.since,
            ),
        )

    async def drain_backlog(self, *, deadline: float | None = None) -> int:
        """The timer's write-behind pass: flush what dead workers left (entries applied),
        taking no thread after `deadline` (the rest stays in the log for the next tick)."""
        if self._flusher is None:
            return 0
        return await self._flusher.drain_abandoned(deadline=deadline)

    async def close(self) -> None:
        """Stop driving runs (they resume later from their checkpoints)."""
        self._closing = True
        # Until none is left: a release past its check of `_closing` as this began may
        # still start a run (see `_let_go_of_case`), cancelled in the next round.
        while self._tasks or self._claims or self._releases:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            # Each claim's give-back is started as it ends, before this gather's turn.
            await asyncio.gather(*self._claims, return_exceptions=True)
            await asyncio.gather(*self._releases, return_exceptions=True)
        await self._tracker.close()

    async def wait_idle(self) -> None:
        """Wait for runs still going in the background (tests, graceful shutdown)."""
        # Until none is left: a release may start a run as it ends (see `_let_go_of_case`).
        while self._tasks or self._claims or self._releases:
            await asyncio.gather(*self._tasks, *self._claims, return_exceptions=True)
            await asyncio.gather(*self._releases, return_exceptions=True)

    # ------------------------------------------------------------------ running the graph

    async def _launch(
        self,
        case_id: str,
        prepare: Callable[[StateSnapshot | None], Awaitable[GraphInput]],
        *,
        wait_seconds: float | None,
        created: bool = False,
        needs_snapshot: bool = True,
        run_id: str | None = None,
        fresh: bool = False,
        still: Callable[[WorkflowRecord], None] | None = None,
        guard: RunGuard | None = None,
        locked: bool = False,
    ) -> Outcome:
        """Take the case's lock (unless `guard` holds it), check preconditions under it,
        then drive the run.

        `prepare` gets the case's latest state (None if not `needs_snapshot`; with `fresh`,
        read from the cold tier, whatever Redis caches: a worker cut off from Redis may
        have moved the case past it). Waits up to `wait_seconds` (None: until the run rests)
        before reporting. `still`: the
        precondition again, checked on the record the run is marked running on (it raises
        to refuse): a runner that cannot reach Redis guards the case with the cold-tier
        lease, which the Redis run lock knows nothing of, so two runners may both pass
        `prepare`; only the first to mark the case running goes on. `run_id`: the
        run's id if known (else the record's current run). `locked`: `guard` was taken while
        nobody ran the case, and the run holds it to its end (the mark records it so).
        """
        if guard is None:
            guard = await self._acquire(case_id)
        handed_over = False
        try:
            if run_id is None:
                # With `fresh`, from the cold tier too: a run a worker cut off from Redis
                # started (a follow-up's) is not the one Redis's older copy names.
                record = await self._record(case_id, fresh=fresh)
                run_id = (record.sections.get(RUN_SECTION) or {}).get("run_id")
            if needs_snapshot and fresh and self._saver is not None:
                await self._saver.arefresh(case_id)
            snapshot = (
                await self._graph.aget_state(case_config(case_id)) if needs_snapshot else None
            )
            graph_input = await prepare(snapshot)
            if still is not None and not created:
                marking = asyncio.ensure_future(
                    self._tracker.mark(
                        case_id,
                        CaseStatus.RUNNING,
                        fencing_token=guard.fence,
                        still=still,
                        locked=locked,
                    )
                )
                try:
                    await asyncio.shield(marking)
                except asyncio.CancelledError:
                    # The caller is gone, its mark maybe written: the run it stands for (a
                    # decision's) goes on, not left "running" with nobody running it.
                    self._spawn_holding(
                        case_id,
                        guard,
                        lambda: self._drive_once_marked(
                            case_id, marking, graph_input, guard, run_id
                        ),
                    )
                    handed_over = True
                    raise
        except BaseException:
            # Refused, failed or cancelled before its run: a follow-up queued meanwhile found
            # the case taken and left its run to this holder, which starts it as it lets go.
            if not handed_over:
                await self._let_go_of_case(case_id, guard)
            raise
        marked = created or still is not None
        task = self._spawn_holding(
            case_id,
            guard,
            lambda: self._drive(
                case_id, graph_input, guard, marked=marked, run_id=run_id, new_case=created
            ),
        )
        # asyncio.wait never cancels what it waits for: a caller that stops waiting
        # (timeout, client gone) leaves the run going.
        with waiting_for_run():
            await asyncio.wait({task}, timeout=wait_seconds)
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error
        # A run cancelled (the worker shutting down) did not come to rest: the timer
        # resumes it.
        finished = task.done() and not task.cancelled()
        return Outcome(await self.status(case_id), created=created, finished=finished)

    async def _drive_once_marked(
        self,
        case_id: str,
        marking: asyncio.Future[int],
        graph_input: GraphInput,
        guard: RunGuard,
        run_id: str | None,
    ) -> None:
        """Drive the run a cancelled `_launch` was marking running, once the mark is
        written; the guard is released if the mark is refused or fails."""
        try:
            await marking
        except CaseError:
            await self._let_go_of_case(case_id, guard)
            return  # refused: nobody is left to tell
        except BaseException:
            # Logged as its task fails (`_forget`): the request that would have answered
            # with it is gone.
            await self._release(case_id, guard)
            raise
        await self._drive(case_id, graph_input, guard, marked=True, run_id=run_id)

    def _spawn(self, case_id: str, work: Awaitable[None]) -> asyncio.Task[None]:
        """`work` (a run of case `case_id`, and what follows it under its guard) in the
        background, holding one of the worker's run slots to its end."""
        give_back = self._slots.for_run()
        task = asyncio.ensure_future(work)
        task.add_done_callback(lambda _: give_back())
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._forget(case_id, done))
        return task

    def _spawn_holding(
        self, case_id: str, guard: RunGuard, work: Callable[[], Awaitable[None]]
    ) -> asyncio.Task[None]:
        """`work()`, which releases `guard` on every path, in the background. A task
        cancelled before its first step (`close`) never runs it: the guard is let go here,
        not held to its TTL, refusing the case to every other worker meanwhile."""
        started = False

        async def run() -> None:
            nonlocal started
            started = True
            await work()

        task = self._spawn(case_id, run())
        task.add_done_callback(lambda _: started or self._let_go(case_id, guard))
        return task

    def _forget(self, case_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # Logged here, the one place every background failure passes: a queue a follow-up
        # or a release started has nobody waiting for it. What it left (a run marked
        # running, runs queued) is the timer's. Cancelled is `close`, not a failure.
        error = None if task.cancelled() else task.exception()
        # A run that stopped unfinished was logged where it stopped (`_attempt`).
        if error is not None and not isinstance(error, RunUnfinished):
            log.error(
                "case %s: background run failed (%s); left for the timer",
                case_id,
                type(error).__name__,
                exc_info=error,
            )

    async def _drive(
        self,
        case_id: str,
        graph_input: GraphInput,
        guard: RunGuard,
        *,
        marked: bool = False,
        run_id: str | None = None,
        new_case: bool = False,
    ) -> None:
        """Run the graph under `guard`, then the case's queued runs; releases the guard.
        `marked`: the record already says this run is running. `new_case`: this is the
        first run of a case this process has just created. `RunUnfinished` if the run
        stopped before coming to rest (a caller waiting for it must not read it as done)."""
        try:
            going = await self._drive_one(
                case_id, graph_input, guard, marked=marked, run_id=run_id, new_case=new_case
            )
        except BaseException:
            await self._release(case_id, guard)
            raise
        if not going:
            await self._release(case_id, guard)
            raise RunUnfinished(case_id)
        await self._pump(case_id, guard)

    async def _drive_one(
        self,
        case_id: str,
        graph_input: GraphInput,
        guard: RunGuard,
        *,
        marked: bool,
        run_id: str | None,
        new_case: bool = False,
    ) -> bool:
        """One run to rest (see `_attempt`), measured once: a run that went on after a loss
        of its checkpoints or a wait for a claim is one run, with its last attempt's outcome."""
        with app_metrics.measure_run() as run:
            # Told once per run id: an attempt that goes on with the run does not start another.
            await self._events.publish(case_id, "run_started", run_id=run_id)
            return await self._attempt(
                case_id, graph_input, guard, run, marked=marked, run_id=run_id, new_case=new_case
            )

    async def _attempt(
        self,
        case_id: str,
        graph_input: GraphInput,
        guard: RunGuard,
        run: RunMeasure,
        *,
        marked: bool,
        run_id: str | None,
        redone: int = 0,
        waits: int = 0,
        new_case: bool = False,
    ) -> bool:
        """One attempt at a run; False when this runner must stop (it lost the case), True
        when the case's queue may go on (the run rested, failed, or a follow-up stopped it).
        `redone`: how many times this run went on after Redis lost its checkpoints; `waits`:
        after waiting out another attempt's claim on a side effect."""
        fence = guard.fence
        try:
            # A follow-up's stop is what its caller asked for, not a failure of the run.
            with traced("case.run", expected=(RunStopped,), case_id=case_id, fencing_token=fence):
                try:
                    rest = await self._while_held(
                        case_id,
                        guard,
                        self._run(
                            case_id,
                            graph_input,
                            fence,
                            marked=marked,
                            run_id=run_id,
                            # After Redis lost the run's checkpoints it may have lost the lock.
                            new_case_until=(
                                self._held_until(guard) if new_case and not redone else 0.0
                            ),
                        ),
                    )
                except BaseException as error:
                    # The run's outcome unless a later attempt goes on with it.
                    run.outcome = type(error).__name__
                    raise
                run.outcome = rest.value
            return True
        except RunStopped as stopped:
            log.info("case %s: %s", case_id, stopped)
            return True
        except (StaleFencingToken, LockLost, ParentGone) as lost:
            # ParentGone: a rollback deleted this run's checkpoints while it still wrote.
            log.warning("case %s: a newer run took over (%s); this one stops", case_id, lost)
        except EffectInProgress as busy:
            # This run holds the case: the claim is a dead or cut-off attempt's, whose call
            # may still reach the provider until its lease ends. Waited out under the guard,
            # the run goes on; stopped, it would read running with nobody on it until the
            # timer finds it stalled.
            if waits >= EFFECT_LEASE_WAITS:
                log.warning("case %s: %s; run left for the timer", case_id, busy)
                return False
            log.info("case %s: %s; the run waits for its lease to end", case_id, busy)
            try:
                await self._while_held(
                    case_id, guard, asyncio.sleep(max(0.0, busy.lease_until - time.time()))
                )
            except (StaleFencingToken, LockLost) as lost:
                # Why the run stopped, not the claim it waited out (read as the wait limit).
                # A fence: the keeper's heartbeat met a newer runner's (a cold-tier lease).
                run.outcome = type(lost).__name__
                log.warning("case %s: a newer run took over (%s); this one stops", case_id, lost)
                return False
            snapshot = await self._graph.aget_state(case_config(case_id))
            graph_input = self._continuation(case_id, await self._record(case_id), snapshot)
            return await self._attempt(
                case_id,
                graph_input,
                guard,
                run,
                marked=True,
                run_id=run_id,
                redone=redone,
                waits=waits + 1,
            )
        except HotStateLost as lost:
            if redone >= REDOS_AFTER_HOT_STATE_LOST:
                raise  # logged as the run's task fails (`_forget`)
            # Redis lost checkpoints the run wrote (its record sections are in the cold
            # tier): the run goes on from the cold tier's latest at once, as the timer would
            # resume it; the effects ledger keeps its side effects from happening twice.
            log.warning("case %s: %s; the run goes on from the cold tier", case_id, lost)
            # Its steps since the last cold checkpoint start again: the stream says why.
            await self._events.publish(case_id, "run_redone", run_id=run_id, redone=redone + 1)
            snapshot = await self._graph.aget_state(case_config(case_id))
            graph_input = self._continuation(case_id, await self._record(case_id), snapshot)
            return await self._attempt(
                case_id, graph_input, guard, run, marked=True, run_id=run_id, redone=redone + 1
            )
        except BackendUnavailable:
            # Left "running": its heartbeat goes stale and the timer resumes it. Logged as
            # the run's task fails (`_forget`).
            raise
        except Exception as error:
            log.exception("case %s: run failed", case_id)
            try:
                await self._flush(case_id)
                waiting = await self._tracker.mark(
                    case_id,
                    CaseStatus.FAILED,
                    fencing_token=fence,
                    error=f"{type(error).__name__}: {error}",
                )
                await self._events.publish(
                    case_id,
                    "run_failed",
                    run_id=run_id,
                    error=f"{type(error).__name__}: {error}",
                    queued=waiting,
                )
                return True
            except RunStopped as stopped:
                log.info("case %s: %s", case_id, stopped)  # the queue's runner rolls it back
                return True
            except Exception:
                log.exception("case %s: could not record the failure", case_id)
        return False

    async def _pump(self, case_id: str, guard: RunGuard) -> None:
        """Run the case's queued runs under `guard`, then release it. A follow-up queued
        while the guard was held found the case taken and left its run to the holder: after
        releasing, look once more and take the case again for what was left."""
        while True:
            try:
                await self._drain_queue(case_id, guard)
            except (StaleFencingToken, LockLost, ParentGone) as lost:
                # Between its runs (starting or ending one): the queue is the new holder's.
                log.warning("case %s: a newer run took over (%s); this one stops", case_id, lost)
                return
            finally:
                await self._release(case_id, guard)
            record = await self._store.get(case_id)
            if record is None or not has_queue_work(runs_of(record)):
                return
            try:
                guard = await self._acquire(case_id)
            except CaseBusy:
                return  # its holder runs the queue

    async def _take_queue_left(self, case_id: str) -> None:
        """After a refused request let the case go: a follow-up queued while it held the
        case left its run to it, as to any holder."""
        try:
            await self._start_queue_work(case_id)
        except (CaseError, RunIndexBusy, StateError):
            # The refusal is the answer; the timer starts what is left queued.
            log.warning("case %s: queued runs not started", case_id, exc_info=True)

    async def _drain_queue(self, case_id: str, guard: RunGuard) -> None:
        # The checkpoint from the cold tier before the first stop or run this guard acts
        # on: Redis may still hold a copy another worker, cut off from it, moved past (a
        # decision it applied), and a run going on from that copy would undo it.
        refreshed = False

        async def refresh() -> None:
            nonlocal refreshed
            if not refreshed and self._saver is not None:
                await self._saver.arefresh(case_id)
            refreshed = True

        while True:
            record = await self._record(case_id)
            current = current_run(runs_of(record))
            if current is not None:
                if not current.get("stop"):
                    # Paused for review (the queue waits for the decision's run), or left
                    # running by a dead runner (the timer resumes it first).
                    return
                await refresh()
                await self._end_stopped(case_id, guard, current)
                continue
            if queued(runs_of(record)):
                await refresh()
            # On the record just read: a run queued since then found the case held and left
            # it to this holder, which looks again once it lets go (`_pump`).
            entry = await self._tracker.start_next(
                case_id,
                fencing_token=guard.fence,
                sections=await self._after_failure(record),
                current=record,
            )
            if entry is None:
                return
            await refresh()  # the hot copy showed nothing queued; the cold record did
            going = await self._drive_one(
                case_id,
                self._message_input(case_id, record, entry["text"]),
                guard,
                marked=True,
                run_id=entry["run_id"],
            )
            if not going:
                return

    async def _after_failure(self, record: WorkflowRecord) -> dict[str, Any] | None:
        """After a failed run, the agents' sections its state holds: the failed step may have
        written its section (a review decision, say) before LangGraph saved the step, and
        the next run, starting from that state with a new message, drops the step."""
        if (record.sections.get(RUN_SECTION) or {}).get("status") != CaseStatus.FAILED.value:
            return None
        return await self._state_sections(record.thread_id)

    async def _state_sections(self, case_id: str) -> dict[str, Any]:
        state = await self._graph.aget_state(case_config(case_id))
        values = state.values if isinstance(state.values, dict) else {}
        return {name: values.get(name) for name in RESULT_SECTIONS}

    async def _end_stopped(self, case_id: str, guard: RunGuard, run: dict[str, Any]) -> None:
        """Close a run a follow-up stopped: interrupted (its checkpoints stay, the next run
        starts from them) or rolled back (its checkpoints deleted, the next run starts from
        the state before it; the side effects it had done are reported with it). Either way
        the record's agents' sections are set back to what that state holds."""
        strategy = FollowUpStrategy(run["stop"])
        discarded: list[EffectView] = []
        if strategy is FollowUpStrategy.ROLLBACK:
            await self._flush(case_id)
            checkpointer = self._graph.checkpointer
            if isinstance(checkpointer, BaseCheckpointSaver):
                await checkpointer.adelete_for_runs([run["run_id"]])
            discarded = effects_since(await self._record(case_id), run.get("started_at"))
        # A rollback's discarded results go; so does an interrupted run's step that wrote
        # its section but never reached a checkpoint (a parallel step LangGraph cancelled
        # when the other one stopped at its check): the next run starts from the state.
        restored = await self._state_sections(case_id)
        status = (
            RunStatus.ROLLED_BACK
            if strategy is FollowUpStrategy.ROLLBACK
            else RunStatus.INTERRUPTED
        )
        await self._tracker.end_stopped(
            case_id,
            run["run_id"],
            status,
            fencing_token=guard.fence,
            discarded_effects=[view.model_dump(mode="json") for view in discarded],
            sections=restored,
        )
        await self._events.publish(
            case_id,
            f"run_{status.value}",
            run_id=run["run_id"],
            stopped_by=run.get("stopped_by"),
            discarded_effects=[view.model_dump(mode="json") for view in discarded],
        )

    async def _run(
        self,
        case_id: str,
        graph_input: GraphInput,
        fence: int | None,
        *,
        marked: bool = False,
        run_id: str | None = None,
        new_case_until: float = 0.0,
    ) -> CaseStatus:
        """Drive the graph to rest; returns the status the case rests in.

        A new case's first run is `marked` already: no earlier runner exists to fence out,
        and its first section write raises the record's fence to this run's token.
        `new_case_until`: for the first run of a case this process created just before
        taking its lock, the `time.monotonic()` until which that lock is surely held.
        Until then no runner can have raised the new record's fence above the run's: an
        earlier lock's fence is lower (a lock's fences grow with the clock) and a
        cold-tier lease's is the record's fence plus one, so the seed reads no record.
        A run that marked the record itself is not spared the read: a lease claimed
        since its mark is above its token."""
        config = case_config(case_id, fencing_token=fence, run_id=run_id)
        # Write-through: every step durable before the next. Write-behind: steps move at
        # Redis speed and the run's end (and an interrupt) is the boundary.
        durability: Literal["sync", "async"] = "sync" if self._flusher is None else "async"
        if not marked:
            await self._tracker.mark(case_id, CaseStatus.RUNNING, fencing_token=fence)
        if self._saver is not None and fence is not None:
            # Its first checkpoint write then finds the fence in Redis (a new case's always
            # would not) instead of reading the record.
            await self._saver.aseed_fence(
                case_id, fence, record_checked=time.monotonic() < new_case_until
            )
        # Driven to its end; the heartbeat is the guard keeper's meanwhile (`_keep`).
        async for _ in self._graph.astream(
            graph_input,
            config,
            context=RunContext(
                fencing_token=fence,
                observer=RunProgress(
                    self._store,
                    self._events,
                    case_id,
                    run_id,
                    deciding=isinstance(graph_input, Command),
                ),
            ),
            stream_mode="updates",
            durability=durability,
        ):
            pass
        await self._flush(case_id)
        snapshot = await self._graph.aget_state(config)
        rest = CaseStatus.AWAITING_REVIEW if snapshot.interrupts else CaseStatus.COMPLETED
        waiting = await self._tracker.mark(case_id, rest, fencing_token=fence)
        if rest is CaseStatus.AWAITING_REVIEW:
            await self._events.publish(
                case_id,
                "interrupt",
                run_id=run_id,
                awaiting_review=snapshot.interrupts[0].value,
                queued=waiting,
            )
        else:
            await self._events.publish(
                case_id,
                "run_completed",
                run_id=run_id,
                final_response=snapshot.values.get("final_response"),
                queued=waiting,
            )
        return rest

    async def _while_held(self, case_id: str, guard: RunGuard, work: Awaitable[T]) -> T:
        """Await `work` while renewing `guard`; once the guard is lost, cancel the work
        and raise `LockLost` (the run must not keep writing)."""
        working = asyncio.ensure_future(work)
        keeper = asyncio.create_task(self._keep(case_id, guard))
        try:
            await asyncio.wait({working, keeper}, return_when=asyncio.FIRST_COMPLETED)
            if not working.done():
                keeper.result()  # raises what ended the keeper (it never returns)
            return working.result()
        finally:
            for task in (keeper, working):
                task.cancel()
            for task in (keeper, working):
                # Either may have failed too; the outcome above is what is reported.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _held_until(self, guard: RunGuard) -> float:
        """Until when `guard` is surely held without a renewal: its claim was sent at
        `taken_at`, so it cannot have run out before the TTL has passed since."""
        return guard.taken_at + self._settings.state_lock_ttl_ms / 1000

    async def _keep(self, case_id: str, guard: RunGuard) -> None:
        """Renew the run's lock or lease until cancelled, and its heartbeat; raises
        `LockLost` when another runner has it, or when no renewal landed before it could
        have run out.

        The heartbeat goes with the renewals, not with the graph's steps: a step longer
        than the stale period (a slow provider) would read stalled though its runner is
        alive, and a worker cut off from Redis, whose cold-tier lease the run lock knows
        nothing of, would take the run over."""
        ttl = self._settings.state_lock_ttl_ms / 1000
        name = run_lock_name(case_id)
        # From when each successful claim or renewal was sent: never later than the truth.
        held_until = self._held_until(guard)
        # Due a quarter of the stale period after the last one: checked on the clock, so
        # renewals in between cost no read of the record.
        beat_every = self._settings.case_stale_after_seconds / BEATS_PER_STALE_PERIOD
        beat_due = time.monotonic() + beat_every
        while True:
            await asyncio.sleep(ttl / RENEWALS_PER_TTL)
            sent = time.monotonic()
            try:
                renewed = await self._renew(case_id, guard)
            except (BackendUnavailable, VersionConflict) as error:
                if time.monotonic() >= held_until:
                    raise LockLost(name, f"not renewed before it ran out ({error})") from error
                log.warning("case %s: could not renew the run guard yet: %s", case_id, error)
                continue
            if not renewed:
                raise LockLost(name, "taken by another runner, or run out")
            held_until = sent + ttl
            if time.monotonic() >= beat_due:
                try:
                    await self._tracker.heartbeat(case_id, fencing_token=guard.fence)
                except (BackendUnavailable, VersionConflict) as error:
                    # Tried again at the next renewal; the run's own writes meet the tier too.
                    log.warning("case %s: could not refresh the heartbeat yet: %s", case_id, error)
                    continue
                beat_due = time.monotonic() + beat_every

    async def _renew(self, case_id: str, guard: RunGuard) -> bool:
        if guard.lock is not None:
            return await self._store.renew(guard.lock)
        held = True
        ttl_seconds = self._settings.state_lock_ttl_ms / 1000

        def extend(record: WorkflowRecord) -> object:
            nonlocal held
            lease = record.sections.get(RUN_LEASE_SECTION) or {}
            held = lease.get("token") == guard.lease_token
            return {**lease, "until": time.time() + ttl_seconds} if held else UNCHANGED

        await write_section(
            self._store,
            case_id,
            RUN_LEASE_SECTION,
            extend,
            agent_id=RUNNER_ID,
            fencing_token=guard.fence,
        )
        return held

    async def _flush(self, case_id: str) -> None:
        if self._saver is not None:
            await self._saver.aflush(case_id)

    async def _acquire(self, case_id: str) -> RunGuard:
        """The case's run lock, else its cold-tier lease; `CaseBusy` if another holds it."""
        return await self._taken(case_id, self._take_guard(case_id))

    async def _taken(self, case_id: str, take: Awaitable[RunGuard]) -> RunGuard:
        """The run guard `take` takes. Taken for a caller cancelled meanwhile, it is let go
        of as the take ends, with the queue check: a follow-up queued in between found the
        case taken and left its run to this holder (see `_let_go_of_case`)."""
        taking = asyncio.ensure_future(take)
        self._claims.add(taking)
        taking.add_done_callback(self._claims.discard)
        return await taken_or_given_back(
            taking, lambda guard: self._let_go(case_id, guard, queue_left=True)
        )

    async def _take_guard(self, case_id: str) -> RunGuard:
        try:
            return await self._take_lock(case_id)
        except LockNotAcquired:
            record = await self._record(case_id)
            raise CaseBusy(
                case_id,
                stalled=self._tracker.is_stale(record.sections.get(RUN_SECTION)),
                lease_ends_at=await self._lease_end(case_id, record),
            ) from None
        except BackendUnavailable:
            log.warning("case %s: no hot tier for the run lock; using a cold-tier lease", case_id)
            return await self._claim_lease(case_id)

    async def _try_lock(self, case_id: str) -> RunGuard | None:
        """The case's run lock from the hot tier; None if another holds it or Redis is out
        of reach (no cold-tier lease instead: it needs the case's record). Let go of as
        `_acquire`'s is, taken for a caller cancelled meanwhile."""
        try:
            return await self._taken(case_id, self._take_lock(case_id))
        except (LockNotAcquired, BackendUnavailable):
            return None

    async def _take_lock(self, case_id: str) -> RunGuard:
        sent = time.monotonic()
        lock = await self._store.lock(
            run_lock_name(case_id), ttl_ms=self._settings.state_lock_ttl_ms
        )
        return RunGuard(lock=lock, taken_at=sent)

    async def _claim_lease(self, case_id: str) -> RunGuard:
        """Claim the cold-tier lease with a versioned write that also raises the record's
        fence by one: each claim gets a fence higher than every earlier holder's."""
        token = uuid.uuid4().hex
        ttl_seconds = self._settings.state_lock_ttl_ms / 1000
        for attempt in range(MAX_ATTEMPTS):
            sent = time.monotonic()
            record = await self._record(case_id)
            if (held_until := _lease_until(record)) is not None:
                raise CaseBusy(
                    case_id,
                    stalled=self._tracker.is_stale(record.sections.get(RUN_SECTION)),
                    lease_ends_at=held_until,
                )
            fence = record.fence + 1
            try:
                await self._store.update_section(
                    case_id,
                    RUN_LEASE_SECTION,
                    {"token": token, "until": time.time() + ttl_seconds},
                    agent_id=RUNNER_ID,
                    expected_version=record.version,
                    fencing_token=fence,
                )
            except VersionConflict:
                if attempt == MAX_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(random.uniform(0.002, 0.01) * (attempt + 1))
                continue
            return RunGuard(lease_token=token, lease_fence=fence, taken_at=sent)
        raise AssertionError("unreachable")

    async def _release(self, case_id: str, guard: RunGuard) -> None:
        # Shielded: a caller cancelled as it lets go (a refused request whose client left)
        # would leave the case refused to every other request until the guard expires.
        await asyncio.shield(self._let_go(case_id, guard))

    def _let_go(
        self, case_id: str, guard: RunGuard, *, queue_left: bool = False
    ) -> asyncio.Task[None]:
        """The guard's release, started now and kept to its end: not cancelled with its
        caller, nor by `close`, which waits for it. `queue_left`: then the runs queued while
        the guard was held are started (see `_let_go_of_case`)."""
        task = asyncio.ensure_future(
            self._unguard_and_take_queue(case_id, guard)
            if queue_left
            else self._unguard(case_id, guard)
        )
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        # Seen even when nobody awaits it (a cancelled caller): `wait_idle` and `close`
        # gather releases with `return_exceptions`, which would keep a failure unheard.
        task.add_done_callback(lambda done: _log_failed_release(case_id, done))
        return task

    async def _unguard_and_take_queue(self, case_id: str, guard: RunGuard) -> None:
        await self._unguard(case_id, guard)
        if not self._closing:
            await self._take_queue_left(case_id)

    async def _unguard(self, case_id: str, guard: RunGuard) -> None:
        try:
            if guard.lock is not None:
                await self._store.unlock(guard.lock)
            elif guard.lease_token is not None:

                def clear_own(record: WorkflowRecord) -> object:
                    lease = record.sections.get(RUN_LEASE_SECTION) or {}
                    return {} if lease.get("token") == guard.lease_token else UNCHANGED

                await write_section(
                    self._store, case_id, RUN_LEASE_SECTION, clear_own, agent_id=RUNNER_ID
                )
        except Exception:
            # A lock or lease expires on its own; a failed release must not mask the outcome.
            log.warning("case %s: could not release the run guard", case_id, exc_info=True)

    # ------------------------------------------------------------------ reading

    async def _lease_end(self, case_id: str, record: WorkflowRecord) -> datetime | None:
        """When the case's current runner loses its lock or lease; None if nobody holds one."""
        ends = [until] if (until := _lease_until(record)) is not None else []
        remaining = await self._store.lock_expires_in(run_lock_name(case_id))
        if remaining is not None:
            ends.append(utcnow() + timedelta(seconds=remaining))
        return max(ends, default=None)

    async def _record(self, case_id: str, *, fresh: bool = False) -> WorkflowRecord:
        record = await (self._store.get_fresh(case_id) if fresh else self._store.get(case_id))
        if record is None or REQUEST_SECTION not in record.sections:
            raise CaseNotFound(case_id)
        return record

    def _message_input(self, case_id: str, record: WorkflowRecord, text: str) -> dict[str, Any]:
        """A follow-up's graph input: the case as submitted, with the new message as text
        (whole, so a run rolled back to before the first one still has the case)."""
        return {**self._initial_input(case_id, record.sections[REQUEST_SECTION]), "text": text}

    @staticmethod
    def _initial_input(case_id: str, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "case_id": case_id,
            "customer_id": request["customer_id"],
            "text": request["text"],
            "transactions": request["transactions"],
        }

    def _still(self, case_id: str, *allowed: CaseStatus) -> Callable[[WorkflowRecord], None]:
        def check(record: WorkflowRecord) -> None:
            status = self._status_of(record)
            if status not in allowed:
                raise CaseConflict(
                    f"case {case_id!r} was taken by another runner meanwhile "
                    f"(status: {status.value})"
                )

        return check

    def _intake_run_still_left(
        self, case_id: str, left: tuple[str, int]
    ) -> Callable[[WorkflowRecord], None]:
        """A retried submit's precondition for starting the intake run's attempt `left`
        (`intake_run_left`), under the run lock: nobody marked it meanwhile, and no runner
        holds the cold-tier lease (one cut off from Redis, which the lock knows nothing of)."""

        def check(record: WorkflowRecord) -> None:
            if intake_run_left(record) != left:
                raise CaseConflict(f"case {case_id!r}: its first run was started meanwhile")
            if (held_until := _lease_until(record)) is not None:
                raise CaseBusy(case_id, stalled=False, lease_ends_at=held_until)

        return check

    def _status_of(self, record: WorkflowRecord) -> CaseStatus:
        run = record.sections.get(RUN_SECTION, {})
        if self._tracker.is_stale(run):
            return CaseStatus.STALLED
        return CaseStatus(run.get("status", CaseStatus.ACCEPTED.value))

    def _view(
        self,
        record: WorkflowRecord,
        snapshot: StateSnapshot,
        *,
        lease_ends_at: datetime | None = None,
    ) -> CaseView:
        values: dict[str, Any] = snapshot.values if isinstance(snapshot.values, dict) else {}
        sections = record.sections
        run = sections.get(RUN_SECTION, {})
        return CaseView(
            case_id=record.thread_id,
            status=self._status_of(record),
            customer_id=sections[REQUEST_SECTION]["customer_id"],
            submitted_by=_caller_view(sections[REQUEST_SECTION].get("submitted_by")),
            completed_steps=list(values.get("completed_steps", [])),
            billing=sections.get("billing"),
            account=sections.get("account"),
            policy=sections.get("policy"),
            review=sections.get("review"),
            refund=sections.get("refund"),
            final_response=values.get("final_response"),
            awaiting_review=snapshot.interrupts[0].value
            if snapshot.interrupts and self._status_of(record) is CaseStatus.AWAITING_REVIEW
            else None,
            error=run.get("error") or values.get("error"),
            effects=effects_in(record),
            heartbeat_at=run.get("heartbeat_at"),
            lease_ends_at=lease_ends_at.isoformat() if lease_ends_at else None,
            version=record.version,
        )


class RunProgress:
    """A run's `RunObserver`: each agent step as events, and the stop a follow-up asked for
    (checked on the case record, a hot-tier read, as each step starts).

    `deciding`: the run resumes with a review decision, whose step (the first) records it
    whatever stop came meanwhile: the decision got in first, and stands for later runs."""

    def __init__(
        self,
        store: TieredStateStore,
        events: CaseEvents,
        case_id: str,
        run_id: str | None,
        *,
        deciding: bool = False,
    ) -> None:
        self._store = store
        self._events = events
        self._case_id = case_id
        self._run_id = run_id
        self._deciding = deciding

    async def node_started(self, node: str) -> None:
        if self._deciding:
            self._deciding = False
        elif self._run_id is not None:
            record = await self._store.get(self._case_id)
            runs = runs_of(record) if record is not None else []
            entry = next((e for e in runs if e["run_id"] == self._run_id), None)
            if entry is not None and entry.get("stop"):
                raise RunStopped(
                    f"run {self._run_id} stops before {node}: follow-up run "
                    f"{entry.get('stopped_by')} asked to {entry['stop']} it"
                )
        await self._events.publish(self._case_id, "node_started", run_id=self._run_id, node=node)

    async def node_finished(self, node: str, section: str, summary: str | None) -> None:
        await self._events.publish(
            self._case_id,
            "node_finished",
            run_id=self._run_id,
            node=node,
            section=section,
            summary=summary,
        )


BUSY = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})
# The agents' sections that hold the same value in the graph state under their own name.
RESULT_SECTIONS = ("billing", "account", "policy", "review", "refund")


def has_queue_work(runs: list[dict[str, Any]]) -> bool:
    """Whether the queue's runner has something to do: a stop asked of the current run, or
    a queued run with no current one."""
    current = current_run(runs)
    return bool(current.get("stop")) if current is not None else bool(queued(runs))


def run_view(entry: dict[str, Any]) -> RunView:
    duration = None
    if entry.get("started_at") and entry.get("ended_at"):
        started = datetime.fromisoformat(entry["started_at"])
        duration = (datetime.fromisoformat(entry["ended_at"]) - started).total_seconds()
    return RunView(
        run_id=entry["run_id"],
        kind=entry["kind"],
        status=RunStatus(entry["status"]),
        strategy=entry.get("strategy"),
        text=entry.get("text"),
        queued_at=entry["queued_at"],
        started_at=entry.get("started_at"),
        ended_at=entry.get("ended_at"),
        duration_seconds=duration,
        stopped_by=entry.get("stopped_by"),
        discarded_effects=entry.get("discarded_effects") or [],
        error=entry.get("error"),
    )


def _caller_view(stored: Any) -> CallerView | None:
    caller = Caller.from_json(stored)
    return CallerView(**caller.to_json()) if caller else None


def first_run_unmarked(record: WorkflowRecord) -> str | None:
    """The id of the case's first run if it is running and no runner has marked it since
    the case was created (attempt 1: a resume or a retried submit's start counts one), nor
    a follow-up asked it to stop; else None."""
    run = record.sections.get(RUN_SECTION) or {}
    current = current_run(runs_of(record)) or {}
    run_id = run.get("run_id")
    if (
        run_id is not None
        and run.get("status") == CaseStatus.RUNNING.value
        and run.get("attempt") == 1
        and current.get("run_id") == run_id
        and not current.get("stop")
    ):
        return str(run_id)
    return None


def intake_run_left(record: WorkflowRecord) -> tuple[str, int] | None:
    """The id and attempt of the case's intake run if it is the current run, running, not
    asked to stop by a follow-up, and that attempt was started under the case's run lock
    (`LOCKED_ATTEMPT`: its submit's or a retry's start; not a resume, nor a decision's):
    with the lock free, nobody runs it. Else None."""
    run = record.sections.get(RUN_SECTION) or {}
    current = current_run(runs_of(record)) or {}
    run_id, attempt = run.get("run_id"), run.get("attempt")
    if (
        run_id is not None
        and run.get("status") == CaseStatus.RUNNING.value
        and attempt is not None
        and run.get(LOCKED_ATTEMPT) == attempt
        and current.get("run_id") == run_id
        and current.get("kind") == "intake"
        and not current.get("stop")
    ):
        return str(run_id), int(attempt)
    return None


def _log_failed_release(case_id: str, task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("case %s: letting go of the run guard failed", case_id, exc_info=error)


def run_lock_name(case_id: str) -> str:
    return f"case-run-{case_id}"


def _lease_until(record: WorkflowRecord) -> datetime | None:
    """The end of the cold-tier run lease the record holds, if one is held now."""
    lease = record.sections.get(RUN_LEASE_SECTION) or {}
    until = lease.get("until", 0)
    if not lease.get("token") or until <= time.time():
        return None
    return datetime.fromtimestamp(until, UTC)


def _checkpoint_view(snapshot: StateSnapshot) -> CheckpointView:
    configurable = snapshot.config.get("configurable", {})
    parent = (snapshot.parent_config or {}).get("configurable", {})
    metadata = snapshot.metadata or {}
    values = snapshot.values if isinstance(snapshot.values, dict) else {}
    return CheckpointView(
        checkpoint_id=str(configurable.get("checkpoint_id")),
        parent_checkpoint_id=parent.get("checkpoint_id"),
        step=metadata.get("step"),
        source=metadata.get("source"),
        created_at=snapshot.created_at,
        next=list(snapshot.next),
        completed_steps=list(values.get("completed_steps", [])),
        interrupts=[{"id": item.id, "value": item.value} for item in snapshot.interrupts],
    )
