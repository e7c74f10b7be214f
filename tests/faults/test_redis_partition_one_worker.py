"""One worker cut off from Redis while Redis stays up (with its data) and another worker
still reaches it: a partition, not an outage.

Worker A reaches Redis through a `LoopbackProxy` the test cuts; worker B reaches it
directly. Both share the cold tier. What A acknowledges while cut must hold for B: B
must not act on the older record or checkpoint Redis still holds for the case, whether it
decides, resumes or runs a follow-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from devstack import RedisServer
from support_cases.agents import StepHook
from support_cases.models import CaseStatus, FollowUp, FollowUpStrategy
from support_cases.runs import shard_of
from support_cases.settings import AppSettings
from tests.support.effects import provider_calls
from tests.support.stale import stalling_quickly

from .apps import App, Decided, open_runtime, review_case, submission
from .proxy import LoopbackProxy


@pytest.fixture
def redis_proxy(
    redis_server: Callable[..., RedisServer],
) -> Iterator[tuple[RedisServer, LoopbackProxy]]:
    server = redis_server()
    proxy = LoopbackProxy(server.port).start()
    try:
        yield server, proxy
    finally:
        proxy.stop()


@contextlib.asynccontextmanager
async def _workers(
    settings_for: Callable[..., AppSettings],
    backend: str,
    redis_proxy: tuple[RedisServer, LoopbackProxy],
    *,
    after_step_a: StepHook | None = None,
    after_step_b: StepHook | None = None,
    quick: bool = False,
    **overrides: object,
) -> AsyncIterator[tuple[App, App]]:
    """Worker A, reaching Redis through the proxy the test cuts, and worker B, directly;
    `quick`: runs read stalled after a second, and calls wait a second for a run."""
    server, proxy = redis_proxy
    direct = f"redis://127.0.0.1:{server.port}/0"
    through = f"redis://127.0.0.1:{proxy.port}/0"

    def settings(redis_url: str) -> AppSettings:
        if not quick:
            return settings_for(backend, redis_url=redis_url, **overrides)
        return stalling_quickly(
            settings_for(backend, redis_url=redis_url, case_sync_wait_seconds=1, **overrides)
        )

    async with (
        open_runtime(settings(through), after_step_a) as a,
        open_runtime(settings(direct), after_step_b) as b,
    ):
        yield a, b


async def _review_of(app: App, case_id: str) -> Any:
    record = await app.runtime.backends.cold.get(case_id)
    assert record is not None
    return record.sections.get("review"), record


async def _approved_while_cut(a: App, b: App, proxy: LoopbackProxy, case_id: str) -> None:
    """A case awaiting review, read by both workers (Redis caches its record and interrupt
    checkpoint); then A, cut off from Redis, approves it: refund paid, case completed."""
    await review_case(b, case_id)
    for app in (a, b):
        assert (await app.runtime.service.status(case_id)).status is CaseStatus.AWAITING_REVIEW
    proxy.cut("reset")
    approved = await a.decide(case_id, "approve", "alice")
    await a.runtime.service.wait_idle()
    assert approved.accepted, approved
    assert (await a.runtime.service.status(case_id)).status is CaseStatus.COMPLETED


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_decision_applied_by_a_cut_off_worker_holds_for_a_worker_that_reaches_redis(
    backend: str,
    settings_for: Callable[..., AppSettings],
    redis_proxy: tuple[RedisServer, LoopbackProxy],
) -> None:
    _, proxy = redis_proxy
    async with _workers(settings_for, backend, redis_proxy) as (a, b):
        case_id = f"partition-review-{uuid.uuid4().hex[:8]}"
        await _approved_while_cut(a, b, proxy, case_id)

        # The case is completed and acknowledged as approved. Another reviewer's late
        # decision reaches worker B, which reaches Redis.
        second: Decided = await b.decide(case_id, "reject", "bob")
        await b.runtime.service.wait_idle()
        proxy.restore()
        await asyncio.sleep(1.5)

        review, _ = await _review_of(a, case_id)
        performed = await provider_calls(a.runtime, case_id, "refund")
        assert second.conflict and not second.accepted, (
            f"worker B accepted a second decision on a completed case: {second}"
        )
        assert review["decision"] == "approve", review
        assert len(performed) == 1, performed


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
async def test_a_decision_run_left_by_a_cut_off_worker_is_resumed_by_another_worker(
    backend: str,
    settings_for: Callable[..., AppSettings],
    redis_proxy: tuple[RedisServer, LoopbackProxy],
) -> None:
    """A, cut off from Redis, applies an approval and pays the refund, then hangs before
    the refund step is checkpointed (a worker frozen mid-run). B's timer must resume the
    stalled run from what A acknowledged: the approval stands, the refund is paid once,
    and the case completes as an undisturbed one would."""
    _, proxy = redis_proxy
    hold = asyncio.Event()
    release = asyncio.Event()

    async def hang_after_refund(step: str) -> None:
        if step == "refund" and hold.is_set():
            await release.wait()

    async with _workers(
        settings_for, backend, redis_proxy, after_step_a=hang_after_refund, quick=True
    ) as (a, b):
        case_id = f"partition-hang-{uuid.uuid4().hex[:8]}"
        try:
            await review_case(b, case_id)
            for app in (a, b):
                assert (
                    await app.runtime.service.status(case_id)
                ).status is CaseStatus.AWAITING_REVIEW
            proxy.cut("reset")
            hold.set()
            approved = await a.decide(case_id, "approve", "alice")
            assert approved.accepted, approved  # acknowledged: the decision is A's to apply
            await asyncio.sleep(2.0)  # A's heartbeat goes stale (it hangs inside a step)

            report = await b.runtime.service.resume_stale()
            await b.runtime.service.wait_idle()
            record = await b.runtime.backends.cold.get(case_id)
            assert record is not None
            status = record.sections.get("run", {}).get("status")
            review = record.sections.get("review")
            performed = await provider_calls(b.runtime, case_id, "refund")
            assert len(performed) == 1
            assert review is not None and review["decision"] == "approve", review
            assert status == CaseStatus.COMPLETED.value, (
                f"B's timer left the run A stalled in {status!r} (report {report})"
            )
        finally:
            release.set()
            proxy.restore()


PARTITION_RACE_TRIES = 4


@pytest.mark.parametrize("backend", ["postgres"])
async def test_two_workers_decide_the_same_review_across_a_partition(
    backend: str,
    settings_for: Callable[..., AppSettings],
    redis_proxy: tuple[RedisServer, LoopbackProxy],
) -> None:
    """test_concurrent_resume's race, with one side cut off from Redis: A guards the case
    with the cold-tier lease, B with the Redis run lock. Still one winner, a typed
    conflict for the other, and the refund follows the decision on record."""
    _, proxy = redis_proxy
    bad: list[str] = []
    async with _workers(settings_for, backend, redis_proxy) as (a, b):
        arrived: list[asyncio.Event] = []

        def interleaved(app: App) -> None:
            """Both workers check the case before either marks it running (the order a
            slow network gives; forced here so each attempt races)."""
            tracker = app.runtime.service._tracker
            mark = tracker.mark

            async def mark_after_the_other(case_id: str, status: CaseStatus, **kw: Any) -> int:
                if status is CaseStatus.RUNNING and arrived:
                    mine = arrived.pop()
                    mine.set()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in both)), timeout=3)
                return await mark(case_id, status, **kw)

            tracker.mark = mark_after_the_other  # type: ignore[method-assign]

        interleaved(a)
        interleaved(b)
        for attempt in range(PARTITION_RACE_TRIES):
            case_id = f"partition-race-{attempt}-{uuid.uuid4().hex[:8]}"
            await review_case(b, case_id)
            both = [asyncio.Event(), asyncio.Event()]
            arrived[:] = list(both)
            proxy.cut("reset")
            try:
                outcomes = await asyncio.gather(
                    a.decide(case_id, "approve", "reviewer-a"),
                    b.decide(case_id, "reject", "reviewer-b"),
                )
                await a.runtime.service.wait_idle()
                await b.runtime.service.wait_idle()
            finally:
                proxy.restore()
            record = await a.runtime.backends.cold.get(case_id)
            assert record is not None
            review = record.sections.get("review") or {}
            refund = record.sections.get("refund") or {}
            performed = await provider_calls(a.runtime, case_id, "refund")
            accepted = [o for o in outcomes if o.accepted]
            if len(accepted) != 1:
                bad.append(f"{case_id}: {len(accepted)} decisions accepted {outcomes}")
                continue
            expected = accepted[0].decision
            if review.get("decision") != expected or (len(performed) == 1) != (
                expected == "approve"
            ):
                bad.append(
                    f"{case_id}: accepted {expected}, record says {review.get('decision')}, "
                    f"refund {refund.get('status')}, {len(performed)} paid"
                )
            await asyncio.sleep(1.2)  # A's settling after the cut
    assert not bad, bad


@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_run_started_after_a_cut_off_timer_dropped_its_case_stays_in_the_run_index(
    backend: str,
    settings_for: Callable[..., AppSettings],
    redis_proxy: tuple[RedisServer, LoopbackProxy],
) -> None:
    """A's timer, cut off from Redis, drops a case at rest from the run index (in the cold
    tier alone: Redis keeps the older index that lists it). B then starts a run of the
    case and indexes it: it must land in the index, or a run B leaves stalled is never
    found by any timer."""
    _, proxy = redis_proxy
    hold = asyncio.Event()
    release = asyncio.Event()

    async def hang(step: str) -> None:
        if hold.is_set():
            await release.wait()

    async with _workers(settings_for, backend, redis_proxy, after_step_b=hang, quick=True) as (
        a,
        b,
    ):
        case_id = f"partition-index-{uuid.uuid4().hex[:8]}"
        shard = shard_of(case_id)
        try:
            await b.runtime.service.submit(submission(case_id), None)
            await b.runtime.service.wait_idle()
            assert (await b.runtime.service.status(case_id)).status is CaseStatus.COMPLETED
            cached = await b.runtime.store.get(shard)  # the index as Redis holds it
            assert cached is not None and case_id in cached.sections["cases"]

            proxy.cut("reset")
            await a.runtime.service.resume_stale()  # a tick: the case rests, it leaves
            dropped = await a.runtime.backends.cold.get(shard)
            assert dropped is not None and case_id not in dropped.sections["cases"]

            hold.set()
            await b.runtime.service.post_message(case_id, FollowUp(text="any news?"), None)
            await asyncio.sleep(2.0)  # B's run hangs: its heartbeat goes stale
            index = await b.runtime.backends.cold.get(shard)
            assert index is not None
            report = await b.runtime.service.resume_stale()
            assert case_id in index.sections["cases"], (
                f"a running case is missing from the run index; the timer sees only {report}"
            )
        finally:
            release.set()
            proxy.restore()


@pytest.mark.parametrize("strategy", [FollowUpStrategy.ENQUEUE, FollowUpStrategy.INTERRUPT])
@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_follow_up_run_by_another_worker_goes_on_from_a_cut_off_workers_decision(
    backend: str,
    strategy: FollowUpStrategy,
    settings_for: Callable[..., AppSettings],
    redis_proxy: tuple[RedisServer, LoopbackProxy],
) -> None:
    """A, cut off from Redis, approves a case (refund paid, case completed). The
    customer's follow-up reaches B, which reaches Redis: its run must start from the
    approved state (the decision stands for follow-ups), not from the interrupt
    checkpoint Redis still caches (which asks for review again, the approval lost)."""
    _, proxy = redis_proxy
    async with _workers(settings_for, backend, redis_proxy) as (a, b):
        case_id = f"partition-followup-{uuid.uuid4().hex[:8]}"
        try:
            await _approved_while_cut(a, b, proxy, case_id)
            sent = await b.runtime.service.post_message(
                case_id, FollowUp(text="thanks, when will I see it?", strategy=strategy), None
            )
            await b.runtime.service.wait_idle()
        finally:
            proxy.restore()
        record = await b.runtime.backends.cold.get(case_id)
        assert record is not None
        run = record.sections["run"]
        review = record.sections.get("review")
        runs = {e["run_id"]: e["status"] for e in record.sections["runs"]}
        performed = await provider_calls(b.runtime, case_id, "refund")
        state = await b.runtime.service._graph.aget_state({"configurable": {"thread_id": case_id}})
        assert len(performed) == 1, performed
        assert review is not None and review["decision"] == "approve", review
        assert "review" in state.values and not state.interrupts, (
            f"the follow-up {sent.run.run_id} ran from a state without A's approval: "
            f"interrupts {state.interrupts}, case {run['status']}, runs {runs}"
        )
        assert run["status"] == CaseStatus.COMPLETED.value, (run, runs)


async def test_a_follow_up_run_a_cut_off_worker_left_is_resumed_under_its_own_run_id(
    settings_for: Callable[..., AppSettings],
    redis_proxy: tuple[RedisServer, LoopbackProxy],
) -> None:
    """A, cut off from Redis, starts a follow-up's run and hangs in it (a worker frozen
    mid-run); Redis still caches the record from before, whose current run is the first.
    B's timer resumes the stalled follow-up run: its events must name that run, the one
    the case's runs list shows completed, not the first run Redis's copy names."""
    _, proxy = redis_proxy
    hold = asyncio.Event()
    release = asyncio.Event()

    async def hang(step: str) -> None:
        if hold.is_set():
            await release.wait()

    async with _workers(settings_for, "postgres", redis_proxy, after_step_a=hang, quick=True) as (
        a,
        b,
    ):
        case_id = f"partition-resume-id-{uuid.uuid4().hex[:8]}"
        try:
            await b.runtime.service.submit(submission(case_id), None)
            await b.runtime.service.wait_idle()
            assert (await b.runtime.service.status(case_id)).status is CaseStatus.COMPLETED
            proxy.cut("reset")
            hold.set()
            sent = await a.runtime.service.post_message(
                case_id, FollowUp(text="thanks, when will I see it?"), None
            )
            follow_up = sent.run.run_id
            await asyncio.sleep(2.0)  # A's heartbeat goes stale (it hangs inside a step)

            report = await b.runtime.service.resume_stale()
            await b.runtime.service.wait_idle()
        finally:
            release.set()
            proxy.restore()
        assert case_id in report.resumed, report
        record = await b.runtime.backends.cold.get(case_id)
        assert record is not None
        runs = {e["run_id"]: e["status"] for e in record.sections["runs"]}
        assert runs[follow_up] == "completed", runs
        events = b.runtime.backends.events
        assert events is not None
        told = [(e.data["event"], e.data["run_id"]) for e in await events.read(case_id)]
        # The first run's, as B ran it; then the follow-up run's, as B's timer resumed it
        # (A's events went nowhere: it could not reach Redis).
        first_ends = told.index(("run_completed", told[0][1])) + 1
        assert {run_id for _, run_id in told[first_ends:]} == {follow_up}, (follow_up, told)
        assert ("run_completed", follow_up) in told, told
