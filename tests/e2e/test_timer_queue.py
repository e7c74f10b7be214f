"""The timer and the run queue on the real stack (each cold backend, each write mode
once): a worker dies (its tasks cancelled by `CaseService.close`) with runs queued, between
ending a run a follow-up stopped and starting the follow-up's run, or during a decision's
run; two workers' ticks and a follow-up race to take the same case; the tick's report of
a queue it leaves or cannot start, and of a case paused for review. Each run is started
once, in order, by whoever holds the case; a dead worker's heartbeat is set long ago, as
time would."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from test_conversation import (
    INVOICE,
    LOGIN_AGAIN,
    StepGate,
    conversation,
    customer_messages,
    escalated,
    gated_client,
    gated_runtime,
)
from test_conversation_hunt import THANKS, heartbeat_long_ago, until_idle

from state.errors import BackendUnavailable
from support_cases.demo import demo_case
from support_cases.models import (
    CaseStatus,
    CaseSubmission,
    FollowUpStrategy,
    ResumeReport,
    RunStatus,
)
from support_cases.records import write_section
from support_cases.runs import RUN_SECTION, RUNNER_ID, new_run_entry
from support_cases.runtime import Runtime
from support_cases.service import message_run_id, run_lock_name
from support_cases.settings import AppSettings


@pytest.fixture
def gate() -> StepGate:
    return StepGate()


@pytest.fixture(
    params=[("cosmos", "write-behind"), ("postgres", "write-through")],
    ids=lambda param: "-".join(param),
)
async def runtime(
    request: pytest.FixtureRequest, e2e_settings: Callable[..., AppSettings], gate: StepGate
) -> AsyncIterator[Runtime]:
    backend, mode = request.param
    async with gated_runtime(e2e_settings, gate, backend, mode, "timer-queue") as opened:
        yield opened


@pytest.fixture
async def client(
    runtime: Runtime, gate: StepGate, bearer: Callable[..., dict[str, str]]
) -> AsyncIterator[httpx.AsyncClient]:
    async with gated_client(runtime, gate, bearer("e2e-client")) as http:
        yield http


async def died_before_the_next_run(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    strategy: str,
    monkeypatch: pytest.MonkeyPatch,
    dies_in: str = "start_next",
) -> None:
    """The demo case at rest; a follow-up (INVOICE) held in its billing step, stopped by a
    second one (THANKS, `strategy`); the worker dies in the run tracker's `dies_in`: as it
    starts the second one's run (the stopped run ended), or as it ends the stopped run;
    its heartbeat then goes stale."""
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    gate.hold("billing")
    first = await client.post(f"/api/cases/{case_id}/messages", json={"text": INVOICE})
    assert first.status_code == 202, first.text
    await asyncio.wait_for(gate.reached["billing"].wait(), 30)

    tracker = runtime.service._tracker
    reached, never = asyncio.Event(), asyncio.Event()

    async def dies_here(*args: Any, **kwargs: Any) -> Any:
        reached.set()
        await never.wait()

    monkeypatch.setattr(tracker, dies_in, dies_here)
    stopping = await client.post(
        f"/api/cases/{case_id}/messages", json={"text": THANKS, "strategy": strategy}
    )
    assert stopping.status_code == 202, stopping.text
    gate.open()
    await asyncio.wait_for(reached.wait(), 30)
    await runtime.service.close()
    monkeypatch.undo()
    await write_section(runtime.store, case_id, RUN_SECTION, heartbeat_long_ago, agent_id=RUNNER_ID)
    runs = [r["status"] for r in (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]]
    stopped = "rolled_back" if strategy == "rollback" else "interrupted"
    assert runs == ["completed", stopped if dies_in == "start_next" else "running", "queued"], runs
    assert (await client.get(f"/api/cases/{case_id}")).json()["status"] == "stalled"


@pytest.mark.parametrize("dies_in", ["start_next", "end_stopped"])
@pytest.mark.parametrize("strategy", ["rollback", "interrupt"])
async def test_the_timer_starts_the_follow_up_a_dead_worker_stopped_a_run_for(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    strategy: str,
    dies_in: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await died_before_the_next_run(
        client, runtime, gate, case_id, strategy, monkeypatch, dies_in=dies_in
    )
    report = await runtime.service.resume_stale()
    assert case_id in report.resumed, report
    runs = await until_idle(runtime, client, case_id)
    stopped = "rolled_back" if strategy == "rollback" else "interrupted"
    assert [r["status"] for r in runs] == ["completed", stopped, "completed"], runs
    messages = customer_messages(await conversation(runtime, case_id))
    assert messages.count(THANKS) == 1, messages
    assert (INVOICE in messages) == (strategy == "interrupt"), messages


@pytest.mark.parametrize("strategy", ["rollback", "interrupt"])
async def test_a_resume_of_a_case_whose_worker_died_after_a_stop_runs_only_the_follow_up(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    strategy: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The case reads stalled, so a resume is accepted: it must not run the stopped run
    again (a rolled-back message back in the conversation), only the follow-up's."""
    await died_before_the_next_run(client, runtime, gate, case_id, strategy, monkeypatch)
    resumed = await client.post(f"/api/cases/{case_id}/resume")
    assert resumed.status_code in (200, 202), resumed.text
    runs = await until_idle(runtime, client, case_id)
    stopped = "rolled_back" if strategy == "rollback" else "interrupted"
    assert [r["status"] for r in runs] == ["completed", stopped, "completed"], runs
    messages = customer_messages(await conversation(runtime, case_id))
    assert messages.count(THANKS) == 1, messages
    assert (INVOICE in messages) == (strategy == "interrupt"), messages


async def test_a_decision_for_a_paused_run_an_interrupt_ended_before_its_worker_died_is_refused(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    reviewer: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The interrupt's runner ended the paused run and died before starting the follow-up's
    run: the record still says "awaiting review" (the next run's mark was never written).
    A decision sent then is for the run the interrupt ended: refused (409), as any decision
    sent after the interrupt; the timer's run of the follow-up asks for review anew."""
    response = await client.post("/api/cases", json=escalated(case_id))
    assert response.status_code in (201, 202), response.text
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["awaiting_review"]

    tracker = runtime.service._tracker
    reached, never = asyncio.Event(), asyncio.Event()

    async def dies_here(*args: Any, **kwargs: Any) -> Any:
        reached.set()
        await never.wait()

    monkeypatch.setattr(tracker, "start_next", dies_here)
    stopping = await client.post(
        f"/api/cases/{case_id}/messages", json={"text": INVOICE, "strategy": "interrupt"}
    )
    assert stopping.status_code == 202, stopping.text
    await asyncio.wait_for(reached.wait(), 30)
    await runtime.service.close()
    monkeypatch.undo()
    runs = [r["status"] for r in (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]]
    assert runs == ["interrupted", "queued"], runs

    decided = await client.post(
        f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
    )
    assert decided.status_code == 409, decided.text
    report = await runtime.service.resume_stale()
    assert case_id in report.resumed, report
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["interrupted", "awaiting_review"], runs
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "awaiting_review" and case["review"] is None, case


async def test_a_tick_that_found_a_run_stalled_does_not_resume_it_once_another_tick_left_it_failed(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two workers' ticks find the same stalled run. One resumes it and the run fails; the
    other, which read the case stalled before that, must not resume the failed run: the
    timer resumes stalled runs only (a failed one is resumed when someone asks)."""
    gate.hold("billing")
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code == 202, response.text
    await asyncio.wait_for(gate.reached["billing"].wait(), 30)
    await runtime.service.close()  # this worker dies
    gate.open()
    await write_section(runtime.store, case_id, RUN_SECTION, heartbeat_long_ago, agent_id=RUNNER_ID)

    other = await Runtime.open(runtime.settings)
    try:
        looked, go = asyncio.Event(), asyncio.Event()
        flushed = other.service._backlog_flushed

        async def held_after_its_look(case: str, deadline: float | None) -> bool:
            looked.set()
            await go.wait()
            return await flushed(case, deadline)

        monkeypatch.setattr(other.service, "_backlog_flushed", held_after_its_look)
        late_tick = asyncio.ensure_future(other.service.resume_stale())
        await asyncio.wait_for(looked.wait(), 30)

        gate.fail_once.add("policy")  # the first tick's run (this worker's graph) fails
        first = await runtime.service.resume_stale()
        assert case_id in first.resumed, first
        assert (await client.get(f"/api/cases/{case_id}")).json()["status"] == "failed"

        go.set()
        late = await late_tick
        assert case_id not in late.resumed, late
        await other.service.wait_idle()
        case = (await client.get(f"/api/cases/{case_id}")).json()
        assert case["status"] == "failed", case["status"]
    finally:
        await other.service.wait_idle()
        await other.close()


FOLLOW_UPS = ("first follow-up", "second follow-up", "third follow-up")


async def queued_by_a_worker_that_died(runtime: Runtime, case_id: str) -> None:
    """Follow-ups queued on a case at rest by a worker that died before starting them."""
    for text in FOLLOW_UPS:
        entry = new_run_entry(
            message_run_id(case_id, text),
            "message",
            RunStatus.QUEUED,
            text=text,
            strategy=FollowUpStrategy.ENQUEUE,
        )
        await runtime.service._tracker.enqueue(
            case_id, entry, FollowUpStrategy.ENQUEUE, agent_id="case-api"
        )


async def ticks_racing_a_follow_up(
    runtime: Runtime, client: httpx.AsyncClient, case_id: str, text: str, *, late_tick: bool = False
) -> tuple[list[ResumeReport], list[dict[str, Any]]]:
    """Another worker's tick, this one's (and, `late_tick`, this one's again) and a follow-up
    (`text`, accepted) at once; their reports, and the case's runs once it rests."""
    other = await Runtime.open(runtime.settings)
    try:
        ticks = [other.service.resume_stale(), runtime.service.resume_stale()]
        if late_tick:
            ticks.append(runtime.service.resume_stale())
        follow_up = client.post(f"/api/cases/{case_id}/messages", json={"text": text})
        sent, *reports = await asyncio.gather(follow_up, *ticks)
        assert sent.status_code in (200, 202), sent.text
        await other.service.wait_idle()
        runs = await until_idle(runtime, client, case_id)
    finally:
        await other.service.wait_idle()
        await other.close()
    return reports, runs


async def test_two_workers_ticks_and_a_follow_up_start_a_dead_workers_queue_once_in_order(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    await queued_by_a_worker_that_died(runtime, case_id)

    _, runs = await ticks_racing_a_follow_up(runtime, client, case_id, THANKS, late_tick=True)
    assert [r["status"] for r in runs] == ["completed"] * 5, runs
    assert [r["text"] for r in runs[1:]] == [*FOLLOW_UPS, THANKS], runs
    messages = customer_messages(await conversation(runtime, case_id))
    assert messages[1:] == [*FOLLOW_UPS, THANKS], messages


@pytest.mark.parametrize("step", ["intake", "billing"])
async def test_two_ticks_resume_a_dead_workers_follow_up_run_then_its_queue_each_once(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    step: str,
) -> None:
    """A follow-up's run dies in its `step` with runs queued behind it; two workers' ticks
    and a new follow-up race to take the case: each message goes into the graph once."""
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    gate.hold(step)
    first = await client.post(f"/api/cases/{case_id}/messages", json={"text": INVOICE})
    assert first.status_code == 202, first.text
    await asyncio.wait_for(gate.reached[step].wait(), 30)
    await queued_by_a_worker_that_died(runtime, case_id)
    await runtime.service.close()  # this worker dies
    gate.open()
    await write_section(runtime.store, case_id, RUN_SECTION, heartbeat_long_ago, agent_id=RUNNER_ID)

    reports, runs = await ticks_racing_a_follow_up(runtime, client, case_id, THANKS)
    assert case_id in reports[0].resumed + reports[1].resumed, reports
    assert [r["status"] for r in runs] == ["completed"] * 6, runs
    messages = customer_messages(await conversation(runtime, case_id))
    assert messages[1:] == [INVOICE, *FOLLOW_UPS, THANKS], messages


async def test_a_tick_reports_a_queue_it_leaves_to_the_runner_holding_the_case_as_skipped(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """Runs queued on a case at rest whose run lock another runner holds: the tick leaves
    them to it, and says so (skipped, which its sweep spares), rather than not at all."""
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    await queued_by_a_worker_that_died(runtime, case_id)
    held = await runtime.store.lock(run_lock_name(case_id), ttl_ms=60_000)
    try:
        report = await runtime.service.resume_stale()
    finally:
        await runtime.store.unlock(held)
    assert case_id not in report.resumed, report
    assert "another runner" in report.skipped.get(case_id, ""), report
    report = await runtime.service.resume_stale()
    assert case_id in report.resumed, report
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed"] * 4, runs


@pytest.mark.parametrize("strategy", ["rollback", "interrupt"])
async def test_two_ticks_and_a_follow_up_racing_over_a_dead_workers_stop_end_it_once(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    strategy: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await died_before_the_next_run(
        client, runtime, gate, case_id, strategy, monkeypatch, dies_in="end_stopped"
    )
    _, runs = await ticks_racing_a_follow_up(runtime, client, case_id, LOGIN_AGAIN)
    stopped = "rolled_back" if strategy == "rollback" else "interrupted"
    assert [r["status"] for r in runs] == ["completed", stopped, "completed", "completed"], runs
    messages = customer_messages(await conversation(runtime, case_id))
    expected = [INVOICE, THANKS, LOGIN_AGAIN] if strategy == "interrupt" else [THANKS, LOGIN_AGAIN]
    assert messages[1:] == expected, messages


async def test_a_decision_whose_run_the_worker_stopped_as_it_shut_down_is_answered_202(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    reviewer: dict[str, str],
) -> None:
    """The worker shuts down (`close`) while a decision's run is going, a follow-up queued
    behind it: the decision is answered 202 (its run is not finished; the timer resumes
    it), not 200 as if the run had come to rest."""
    response = await client.post("/api/cases", json=escalated(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    gate.hold("refund")
    deciding = asyncio.ensure_future(
        client.post(f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer)
    )
    await asyncio.wait_for(gate.reached["refund"].wait(), 30)
    queued = await client.post(f"/api/cases/{case_id}/messages", json={"text": INVOICE})
    assert queued.status_code == 202, queued.text
    await runtime.service.close()
    gate.open()
    decided = await deciding
    assert decided.json()["status"] == "running", decided.text
    assert decided.status_code == 202, decided.text

    await write_section(runtime.store, case_id, RUN_SECTION, heartbeat_long_ago, agent_id=RUNNER_ID)
    report = await runtime.service.resume_stale()
    assert case_id in report.resumed, report
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed", "completed"], runs
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["review"]["decision"] == "approve" and case["refund"]["status"] == "issued"


async def test_a_queue_the_tick_could_not_start_is_logged_and_counted_as_failed(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The tick's start of a dead worker's queue meets a tier out of reach: one failing case
    is logged once and counted as failed (README), not reported resumed with nothing said."""
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    await queued_by_a_worker_that_died(runtime, case_id)

    async def out_of_reach(*args: Any, **kwargs: Any) -> Any:
        raise BackendUnavailable("postgres", "connection refused (injected)")

    monkeypatch.setattr(runtime.service._tracker, "start_next", out_of_reach)
    with caplog.at_level(logging.WARNING, logger="support_cases.service"):
        report = await runtime.service.resume_stale()
    assert case_id not in report.resumed, report
    assert "BackendUnavailable" in report.failed.get(case_id, ""), report
    # Once, with its traceback (the queue task's end logs it), not once more by the tick.
    assert_logged_once_as_error(caplog, case_id, BackendUnavailable)

    monkeypatch.undo()
    report = await runtime.service.resume_stale()
    assert case_id in report.resumed, report
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed"] * 4, runs


async def test_a_case_awaiting_review_leaves_the_run_index_with_a_tick_until_a_run_is_queued(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """The timer has nothing to do for a case paused for review: its tick lets it go, and
    the next writes nothing for it (not put back as it is dropped, a write every tick for
    as long as the review takes). A follow-up queued behind the review puts it back."""
    response = await client.post("/api/cases", json=escalated(case_id))
    assert response.status_code in (201, 202), response.text
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["awaiting_review"]
    tracker = runtime.service._tracker
    assert case_id in await tracker.active_cases()
    await runtime.service.resume_stale()
    assert case_id not in await tracker.active_cases()

    queued = await client.post(f"/api/cases/{case_id}/messages", json={"text": INVOICE})
    assert queued.status_code == 202, queued.text
    report = await runtime.service.resume_stale()
    assert "behind a review" in report.skipped.get(case_id, ""), report
    assert case_id in await tracker.active_cases()


async def test_a_queue_a_follow_up_started_that_fails_in_the_background_is_logged(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A follow-up on a case at rest starts its queue in the background; that queue meets a
    tier out of reach after the request's answer: its failure is logged at error level with
    the case's id (nobody waits for it), and the timer then starts what it left queued."""
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    starting = asyncio.Event()

    async def out_of_reach(*args: Any, **kwargs: Any) -> Any:
        # After the request stops waiting for its run: a failure only the task sees.
        await starting.wait()
        raise BackendUnavailable("postgres", "connection refused (injected)")

    monkeypatch.setattr(runtime.service._tracker, "start_next", out_of_reach)
    monkeypatch.setattr(runtime.service, "_sync_wait", 0.0)
    with caplog.at_level(logging.ERROR, logger="support_cases.service"):
        queued = await client.post(f"/api/cases/{case_id}/messages", json={"text": INVOICE})
        assert queued.status_code == 202, queued.text
        starting.set()
        await runtime.service.wait_idle()
    failed = [
        record
        for record in caplog.records
        if record.name == "support_cases.service"
        and record.levelno >= logging.ERROR
        and case_id in record.getMessage()
    ]
    assert failed, caplog.text
    assert any(
        record.exc_info and isinstance(record.exc_info[1], BackendUnavailable) for record in failed
    ), caplog.text

    monkeypatch.undo()
    report = await runtime.service.resume_stale()
    assert case_id in report.resumed, report
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed", "completed"], runs


async def test_a_queue_cancelled_as_the_worker_stops_is_not_logged_as_failed(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Shutdown (`close`) cancels a queue going in the background: not an error."""
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    reached, never = asyncio.Event(), asyncio.Event()

    async def stuck(*args: Any, **kwargs: Any) -> Any:
        reached.set()
        await never.wait()

    monkeypatch.setattr(runtime.service._tracker, "start_next", stuck)
    monkeypatch.setattr(runtime.service, "_sync_wait", 0.0)
    with caplog.at_level(logging.ERROR, logger="support_cases.service"):
        queued = await client.post(f"/api/cases/{case_id}/messages", json={"text": INVOICE})
        assert queued.status_code == 202, queued.text
        await asyncio.wait_for(reached.wait(), 30)
        await runtime.service.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def assert_logged_once_as_error(
    caplog: pytest.LogCaptureFixture, case_id: str, error: type[BaseException]
) -> None:
    """The service logged one record at warning level or above naming `case_id`: at error
    level, with `error`'s traceback."""
    logged = [
        record
        for record in caplog.records
        if record.name == "support_cases.service"
        and record.levelno >= logging.WARNING
        and case_id in record.getMessage()
    ]
    assert len(logged) == 1, caplog.text
    assert logged[0].levelno == logging.ERROR, caplog.text
    assert isinstance(logged[0].exc_info and logged[0].exc_info[1], error), caplog.text


async def cancel_once(started: asyncio.Event, request: asyncio.Future[Any]) -> None:
    """Cancels `request` once `started` is set; it ends cancelled."""
    await asyncio.wait_for(started.wait(), 30)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request


async def test_a_cancelled_decisions_run_that_could_not_start_is_logged_once(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    reviewer: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A decision cancelled (its client gone) while marking its run running, and the mark
    then meets a tier out of reach: nobody waits for that run, whose failure is logged once
    at error level with the case's id (the task's end), not a warning more besides."""
    response = await client.post("/api/cases", json=escalated(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    tracker = runtime.service._tracker
    marking, fail = asyncio.Event(), asyncio.Event()

    async def mark_out_of_reach(*args: Any, **kwargs: Any) -> Any:
        marking.set()
        await fail.wait()
        raise BackendUnavailable("postgres", "connection refused (injected)")

    monkeypatch.setattr(tracker, "mark", mark_out_of_reach)
    with caplog.at_level(logging.WARNING, logger="support_cases.service"):
        deciding = asyncio.ensure_future(
            client.post(
                f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
            )
        )
        await cancel_once(marking, deciding)
        fail.set()
        await runtime.service.wait_idle()
    assert_logged_once_as_error(caplog, case_id, BackendUnavailable)


async def test_a_cancelled_submits_first_run_that_fails_in_the_background_is_logged_as_error(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A submit cancelled while its case is created: the case's first run starts in the
    background, and meets a tier out of reach as it ends. Nobody waits for it: logged once,
    at error level with the case's id, as any background run's failure is."""
    store, tracker = runtime.store, runtime.service._tracker
    create, mark = store.create, tracker.mark
    creating, created = asyncio.Event(), asyncio.Event()

    async def create_held(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == case_id:
            creating.set()
            await created.wait()
        return await create(name, *args, **kwargs)

    async def rest_out_of_reach(name: str, status: Any, *args: Any, **kwargs: Any) -> Any:
        if name == case_id and status is not CaseStatus.RUNNING:
            raise BackendUnavailable("postgres", "connection refused (injected)")
        return await mark(name, status, *args, **kwargs)

    monkeypatch.setattr(store, "create", create_held)
    monkeypatch.setattr(tracker, "mark", rest_out_of_reach)
    with caplog.at_level(logging.WARNING, logger="support_cases.service"):
        submitting = asyncio.ensure_future(
            runtime.service.submit(CaseSubmission.model_validate(demo_case(case_id)), None)
        )
        await cancel_once(creating, submitting)
        created.set()
        await runtime.service.wait_idle()
    assert_logged_once_as_error(caplog, case_id, BackendUnavailable)
