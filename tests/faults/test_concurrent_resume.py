"""Two workers resume the same case at once: one commits, the other gets a typed conflict.

Store level: two workers (separate connections) write the same record at the
same expected version, many times. App level: two app instances (separate
runtimes) send opposite review decisions for the same interrupted case at the
same moment, and two runtimes resume the same stalled case at once (or one
resumes it while the other runs the timer's `resume_stale`), each with the hot
tier's run lock and without any hot tier (Redis down or not configured: the
service then guards the case with a lease in its cold record).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from state.errors import VersionConflict
from state.factory import backends_for
from state.settings import Settings
from state.tiered import TieredStateStore
from support_cases.models import CaseStatus
from support_cases.runs import RUN_SECTION
from support_cases.service import CaseConflict, Outcome
from tests.step_pause import pause_after
from tests.support.cosmos import drop_container
from tests.support.effects import provider_calls
from tests.support.stale import stalling_quickly

from .apps import EFFECT_KEYS, App, open_runtime, review_case, submission
from .conftest import Deadline, Recorder

STORE_TRIES = 60
CASE_TRIES = 6

BACKENDS = ["cosmos", "postgres"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_two_writers_same_version(
    backend: str, settings_for: Callable[..., Settings], reliability: Recorder
) -> None:
    settings = settings_for(backend)
    won = conflicts = silent = lost = 0
    async with backends_for(settings) as first, backends_for(settings) as second:
        stores = [TieredStateStore.from_backends(first), TieredStateStore.from_backends(second)]
        thread_id = f"race-{backend}-{uuid.uuid4().hex[:10]}"
        await stores[0].create(thread_id, {"owner": None}, agent_id="race")
        for attempt in range(STORE_TRIES):
            current = await stores[attempt % 2].get(thread_id)
            assert current is not None

            async def write(
                index: int, version: int = current.version, attempt: int = attempt
            ) -> Any:
                return await stores[index].update_section(
                    thread_id,
                    "owner",
                    {"worker": index, "attempt": attempt},
                    agent_id=f"worker-{index}",
                    expected_version=version,
                )

            results = await asyncio.gather(write(0), write(1), return_exceptions=True)
            winners = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
            typed = [r for r in results if isinstance(r, VersionConflict)]
            others = [r for r in results if isinstance(r, BaseException) and r not in typed]
            assert not others, others
            final = await stores[0].get(thread_id)
            assert final is not None
            if len(winners) == 1:
                won += 1
                conflicts += len(typed)
                if final.sections["owner"] != {"worker": winners[0], "attempt": attempt}:
                    lost += 1
            elif len(winners) == 2:
                silent += 1
            else:
                lost += 1
            # Both tiers agree with the cold store after the race.
            cold = await first.cold.get(thread_id)
            assert cold is not None and cold.version == final.version
        trail = await stores[0].audit_trail(thread_id, limit=STORE_TRIES + 10)
        # One audit entry per accepted write, never one for a refused one.
        assert len([e for e in trail if e.section == "owner"]) == won
        await first.cold.delete(thread_id)

    reliability.record(
        f"Two workers write one record at the same version ({backend})",
        injected="two connections update the same section with the same expected "
        "version at once (asyncio.gather)",
        runs=STORE_TRIES,
        lost_writes=lost,
        silent_overwrites=silent,
        observed=f"{won} races had one winner; {conflicts} losers got VersionConflict",
    )
    assert silent == 0 and lost == 0 and conflicts == STORE_TRIES


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "hot",
    [True, False],
    ids=["with-redis-lock", "cold-only"],
)
async def test_two_workers_decide_the_same_review(
    backend: str, hot: bool, settings_for: Callable[..., Settings], reliability: Recorder
) -> None:
    overrides: dict[str, object] = {} if hot else {"redis_url": None}
    settings = settings_for(backend, **overrides)
    one_winner = conflicts = silent = lost = duplicate_refunds = 0
    async with open_runtime(settings) as left, open_runtime(settings) as right:
        for attempt in range(CASE_TRIES):
            case_id = f"race-{backend}-{attempt}-{uuid.uuid4().hex[:8]}"
            await review_case(left, case_id)
            outcomes = await asyncio.gather(
                left.decide(case_id, "approve", "reviewer-left"),
                right.decide(case_id, "reject", "reviewer-right"),
            )
            await left.runtime.service.wait_idle()
            await right.runtime.service.wait_idle()
            accepted = [o for o in outcomes if o.accepted]
            conflicts += sum(1 for o in outcomes if o.conflict)
            assert all(o.accepted or o.conflict for o in outcomes), outcomes
            record = await left.runtime.store.get(case_id)
            assert record is not None
            review = record.sections.get("review") or {}
            refund = record.sections.get("refund") or {}
            performed = await provider_calls(left.runtime, case_id, "refund")
            duplicate_refunds += max(0, len(performed) - 1)
            if len(accepted) == 1:
                one_winner += 1
                expected = accepted[0].decision
                status = "issued" if expected == "approve" else "refused"
                if review.get("decision") != expected or refund.get("status") != status:
                    silent += 1
            elif len(accepted) == 2:
                # Both were told they won: whichever decision is on record silently
                # replaced the other's.
                silent += 1
            else:
                lost += 1

    tier = "with the Redis run lock" if hot else "cold store only"
    reliability.record(
        f"Two workers decide the same review at once ({backend}, {tier})",
        injected="two app runtimes send approve / reject for one interrupted case at once",
        runs=CASE_TRIES,
        lost_writes=lost,
        silent_overwrites=silent,
        observed=f"{one_winner} cases had one winner, {conflicts} typed CaseConflict, "
        f"{duplicate_refunds} duplicate refunds",
    )
    assert silent == 0 and lost == 0 and duplicate_refunds == 0
    assert one_winner == CASE_TRIES


RESUME_CASES = 4
# Where the dying worker stops: after policy, so the refund is still to be paid and
# whichever worker resumes pays it (two drivers would be two chances to pay twice).
STALL_AFTER_STEP = "policy"


@asynccontextmanager
async def isolated_settings(
    backend: str,
    hot: bool,
    settings_for: Callable[..., Settings],
    request: pytest.FixtureRequest,
) -> AsyncIterator[Settings]:
    """Settings on a cold store of this test's own (a Cosmos container / a Postgres database).

    The timer resumes every stale case of its store: on the shared one it would
    also pick up cases other tests left running, and they would skew the counts.
    """
    overrides: dict[str, object] = {}
    if not hot:
        overrides["redis_url"] = None
    if backend == "postgres":
        overrides["postgres_url"] = request.getfixturevalue("fresh_postgres_url")
        yield stalling_quickly(settings_for(backend, **overrides))
        return
    overrides["cosmos_container"] = f"resume-{uuid.uuid4().hex[:8]}"
    settings = stalling_quickly(settings_for(backend, **overrides))
    try:
        yield settings
    finally:
        await drop_container(settings)


async def stall(settings: Settings, case_ids: list[str], deadline: Deadline) -> None:
    """Leave each case as a dead worker does: marked running, its heartbeat going stale.

    A runtime runs the cases up to a pause after STALL_AFTER_STEP and is closed
    there, which cancels its runs mid-step: their `run` section still says
    running, nothing marks them done, and the step is not checkpointed.
    """
    dying = settings.model_copy(update={"case_sync_wait_seconds": 0.0})
    pause = pause_after(f"{STALL_AFTER_STEP}=120")
    paused = 0

    async def count_then_pause(step: str) -> None:
        # Counted by the hook: in write-behind mode the step's section is not in the
        # record yet (the run's boundary writes it), so the record cannot tell.
        nonlocal paused
        if step == STALL_AFTER_STEP:
            paused += 1
        await pause(step)

    async with open_runtime(dying, after_step=count_then_pause) as worker:
        for case_id in case_ids:
            await worker.runtime.service.submit(submission(case_id), None)
        while paused < len(case_ids):
            deadline.check("cases reaching the stall point")
            await asyncio.sleep(0.05)


async def wait_stalled(app: App, case_ids: list[str], deadline: Deadline) -> None:
    while True:
        statuses = [(await app.runtime.service.status(c)).status for c in case_ids]
        if all(status is CaseStatus.STALLED for status in statuses):
            return
        deadline.check(f"cases going stale (now {statuses})")
        await asyncio.sleep(0.2)


async def resumed(app: App, case_id: str) -> bool:
    """True: this runtime resumed the case; False: it was told no (a typed CaseConflict)."""
    try:
        await app.runtime.service.resume(case_id)
    except CaseConflict:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hot", [True, False], ids=["with-redis-lock", "cold-only"])
@pytest.mark.parametrize("rival", ["resume", "timer"])
async def test_two_workers_resume_the_same_stalled_case(
    backend: str,
    hot: bool,
    rival: str,
    settings_for: Callable[..., Settings],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    reliability: Recorder,
) -> None:
    deadline = Deadline(120)
    case_ids = [f"resume-{backend}-{n}-{uuid.uuid4().hex[:8]}" for n in range(RESUME_CASES)]
    one_winner = conflicts = nothing_to_do = silent = lost = duplicate_effects = 0
    async with isolated_settings(backend, hot, settings_for, request) as settings:
        await stall(settings, case_ids, deadline)
        async with open_runtime(settings) as left, open_runtime(settings) as right:
            await wait_stalled(left, case_ids, deadline)
            if rival == "resume":
                races = await asyncio.gather(
                    *(
                        asyncio.gather(resumed(left, case_id), resumed(right, case_id))
                        for case_id in case_ids
                    )
                )
                wins = {case_id: list(race) for case_id, race in zip(case_ids, races, strict=True)}
                conflicts = sum(race.count(False) for race in wins.values())
            else:
                rivals: dict[str, bool] = {}
                timer_resume: Callable[..., Awaitable[Outcome]] = right.runtime.service.resume

                async def resume_against_a_rival(case_id: str, **options: Any) -> Outcome:
                    # The rival starts the moment the timer has found the case stale and
                    # resumes it, so both pass the staleness check: a race on the run
                    # guard itself, not one the status check settles.
                    timer_side = asyncio.ensure_future(timer_resume(case_id, **options))
                    rival_side = asyncio.ensure_future(resumed(left, case_id))
                    await asyncio.wait({timer_side, rival_side})
                    rivals[case_id] = rival_side.result()
                    # A CaseConflict here is what resume_stale reports as skipped.
                    return timer_side.result()

                # resume_stale calls `self.resume`: the instance attribute takes its place.
                monkeypatch.setattr(right.runtime.service, "resume", resume_against_a_rival)
                timer = await right.runtime.service.resume_stale()
                wins = {c: [c in timer.resumed, rivals.get(c, False)] for c in case_ids}
                conflicts = list(rivals.values()).count(False) + sum(
                    1 for c in case_ids if c in timer.skipped
                )
                # Cases the timer never tried (none expected: each was stale when it ran).
                nothing_to_do = sum(1 for c in case_ids if c not in rivals)
            await left.runtime.service.wait_idle()
            await right.runtime.service.wait_idle()
            for case_id, race in wins.items():
                record = await left.runtime.store.get(case_id)
                assert record is not None
                status = (await left.runtime.service.status(case_id)).status
                # Each RUNNING mark counts one attempt: the dead worker's and one resume.
                attempts = int(record.sections[RUN_SECTION].get("attempt", 0))
                performed = {
                    kind: await provider_calls(left.runtime, case_id, kind) for kind in EFFECT_KEYS
                }
                duplicate_effects += sum(max(0, len(p) - 1) for p in performed.values())
                paid = performed["refund"][-1]["reference"] if performed["refund"] else None
                told = (record.sections.get("refund") or {}).get("reference")
                if race.count(True) == 1 and attempts == 2:
                    one_winner += 1
                elif race.count(True) == 2 or attempts > 2:
                    # Both drove the case while each was told it alone did.
                    silent += 1
                if status is not CaseStatus.COMPLETED or not all(performed.values()):
                    lost += 1
                elif told != paid:
                    # The customer is told about a refund other than the one paid.
                    silent += 1

    tier = "with the Redis run lock" if hot else "cold store only"
    untried = f", {nothing_to_do} never tried by the timer" if rival == "timer" else ""
    against = "resume vs resume" if rival == "resume" else "resume vs the timer's resume_stale"
    reliability.record(
        f"Two workers resume the same stalled case at once ({backend}, {against}, {tier})",
        injected=f"a worker dies after {STALL_AFTER_STEP} (heartbeat goes stale), then two app "
        f"runtimes resume the case at once ({against})",
        runs=RESUME_CASES,
        lost_writes=lost,
        silent_overwrites=silent,
        observed=f"{one_winner}/{RESUME_CASES} cases resumed by exactly one worker and completed; "
        f"{conflicts} typed CaseConflict{untried}; "
        f"{duplicate_effects} duplicate side effects",
    )
    assert silent == 0 and lost == 0 and duplicate_effects == 0
    assert one_winner == RESUME_CASES
    # Every race had a loser, and it was told so with a typed conflict.
    assert conflicts == RESUME_CASES and nothing_to_do == 0
