"""Two workers resume the same case at once: one commits, the other gets a typed conflict.

Store level: two workers (separate connections) write the same record at the
same expected version, many times. App level: two app instances (separate
runtimes) send opposite review decisions for the same interrupted case at the
same moment, with the hot tier's run lock and without any hot tier (Redis down
or not configured: only the cold store's versions guard the case).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from state.errors import VersionConflict
from state.factory import backends_for
from state.settings import Settings
from state.tiered import TieredStateStore

from .apps import open_runtime, review_case
from .conftest import Recorder

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
            performed = await left.runtime.provider.performed(f"{case_id}:refund")
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
