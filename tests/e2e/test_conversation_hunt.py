"""Follow-ups racing the run they target or one another, the timer racing them, and the
event stream, on the real stack (each cold backend, each write mode once): what fault and
race hunts found.

A run is held open after a chosen step (the app's `after_step` seam), or a request is held
while it has the case's run lock (a delay in a read it makes), so the follow-up arrives
exactly in the window; where the window is before a step's stop check or around a
run-index write, the app's own call is held or made to meet a busy index there."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from test_conversation import (
    INVOICE,
    StepGate,
    conversation,
    customer_messages,
    escalated,
    gated_client,
    gated_runtime,
)

from agent_state_cli.cli import sse_frames
from state import VersionConflict, WorkflowRecord
from support_cases import runs as runs_module
from support_cases.demo import demo_case
from support_cases.records import write_section
from support_cases.runs import RUN_SECTION, RUNNER_ID, RunTracker, shard_of, utcnow
from support_cases.runtime import Runtime
from support_cases.service import RESULT_SECTIONS, RunProgress, case_config, run_lock_name
from support_cases.settings import AppSettings
from tests.support.effects import provider_calls

CHARGED_AND_LOCKED = "I was charged again and now my account is locked"
THANKS = "Thanks, that is all"


@pytest.fixture(scope="module")
def gate() -> StepGate:
    return StepGate()


@pytest.fixture(
    scope="module",
    params=[("cosmos", "write-behind"), ("postgres", "write-through")],
    ids=lambda param: "-".join(param),
)
async def runtime(
    request: pytest.FixtureRequest, e2e_settings: Callable[..., AppSettings], gate: StepGate
) -> AsyncIterator[Runtime]:
    backend, mode = request.param
    async with gated_runtime(e2e_settings, gate, backend, mode, "conv-hunt") as opened:
        yield opened


@pytest.fixture
async def client(
    runtime: Runtime, gate: StepGate, bearer: Callable[..., dict[str, str]]
) -> AsyncIterator[httpx.AsyncClient]:
    async with gated_client(runtime, gate, bearer("e2e-client")) as http:
        yield http


async def runs_of(client: httpx.AsyncClient, case_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/cases/{case_id}/runs")
    assert response.status_code == 200, response.text
    return list(response.json()["runs"])


async def until_idle(
    runtime: Runtime, client: httpx.AsyncClient, case_id: str, *, within: float = 60
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    while True:
        await runtime.service.wait_idle()
        runs = await runs_of(client, case_id)
        if not any(run["status"] in ("queued", "running") for run in runs):
            return runs
        assert time.monotonic() < deadline, runs
        await asyncio.sleep(0.05)


def hold_the_rollbacks_delete(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event]:
    """The checkpointer's `adelete_for_runs` held until `release` is set; `reached` once it
    is called (the queue's runner caught rolling the run back)."""
    checkpointer = runtime.graph.checkpointer
    reached, release = asyncio.Event(), asyncio.Event()
    delete_for_runs = checkpointer.adelete_for_runs

    async def held_delete(run_ids: Any) -> None:
        reached.set()
        await release.wait()
        await delete_for_runs(run_ids)

    monkeypatch.setattr(checkpointer, "adelete_for_runs", held_delete)
    return reached, release


async def rollback_sent_during_the_last_step(
    client: httpx.AsyncClient, gate: StepGate, case_id: str, reached: asyncio.Event
) -> str:
    """The demo case held in its last step, a rollback sent, the step let go; back once
    the rollback's delete is reached, with the rollback's run id."""
    gate.hold("response")
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code == 202, response.text
    await asyncio.wait_for(gate.reached["response"].wait(), 30)
    rollback = await client.post(
        f"/api/cases/{case_id}/messages", json={"text": INVOICE, "strategy": "rollback"}
    )
    assert rollback.status_code == 202, rollback.text
    gate.open()
    await asyncio.wait_for(reached.wait(), 30)  # the queue's runner is rolling it back
    return str(rollback.json()["run"]["run_id"])


async def test_a_rollback_sent_during_the_runs_last_step_still_rolls_the_run_back(
    client: httpx.AsyncClient, runtime: Runtime, gate: StepGate, case_id: str
) -> None:
    """The stop is looked for as each step starts: a rollback that comes while the run's
    last step goes finds no step left to stop at. Accepted (202), it must still discard
    the run, not let it end as completed and run after it as a plain enqueue."""
    gate.hold("response")
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code == 202, response.text
    await asyncio.wait_for(gate.reached["response"].wait(), 30)
    rollback = await client.post(
        f"/api/cases/{case_id}/messages", json={"text": INVOICE, "strategy": "rollback"}
    )
    assert rollback.status_code == 202, rollback.text
    gate.open()
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["rolled_back", "completed"], runs
    assert runs[0]["stopped_by"] == rollback.json()["run"]["run_id"]
    assert {e["kind"] for e in runs[0]["discarded_effects"]} == {"refund", "reset_link"}
    # The conversation starts with the follow-up; the effects were reused, not redone.
    assert customer_messages(await conversation(runtime, case_id)) == [INVOICE]
    for kind in ("refund", "reset_link"):
        assert len(await provider_calls(runtime, case_id, kind)) == 1


async def test_a_run_a_rollback_reached_in_its_last_step_is_never_shown_completed(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run whose last step a rollback reached is rolled back once it ends: until then
    it is not at rest. Answering "completed" (with the response the rollback discards)
    and announcing `run_completed` would acknowledge a result that is then taken back."""
    reached, release = hold_the_rollbacks_delete(runtime, monkeypatch)
    await rollback_sent_during_the_last_step(client, gate, case_id, reached)
    try:
        shown = (await client.get(f"/api/cases/{case_id}")).json()
        intake = (await runs_of(client, case_id))[0]["run_id"]
        found = await runtime.service.events.check(None).read(case_id, count=1000)
        announced = [(event.data["event"], event.data.get("run_id")) for event in found]
    finally:
        release.set()
    assert shown["status"] == "running", shown
    assert ("run_completed", intake) not in announced, announced
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["rolled_back", "completed"], runs


async def test_a_run_whose_last_step_fails_while_a_rollback_waits_is_rolled_back(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rollback sent during the run's last step, which then fails (raises after writing
    its section): the run is rolled back as if the step had ended, never shown failed (nor
    announced so), the follow-up runs from the state before it, and the record's sections
    agree with that state."""
    reached, release = hold_the_rollbacks_delete(runtime, monkeypatch)
    failing = [True]
    finished = RunProgress.node_finished

    async def fail_the_held_step(self: RunProgress, node: str, *args: Any) -> None:
        if node == "response_agent" and failing:
            failing.clear()
            raise RuntimeError("injected failure in the run's last step")
        await finished(self, node, *args)

    monkeypatch.setattr(RunProgress, "node_finished", fail_the_held_step)
    rollback_run = await rollback_sent_during_the_last_step(client, gate, case_id, reached)
    try:
        shown = (await client.get(f"/api/cases/{case_id}")).json()
        intake = (await runs_of(client, case_id))[0]
    finally:
        release.set()
    assert not failing  # the step did fail
    assert shown["status"] == "running", shown
    assert intake["status"] == "running", intake
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["rolled_back", "completed"], runs
    assert runs[0]["stopped_by"] == rollback_run
    assert runs[0]["error"] is None, runs[0]
    assert {e["kind"] for e in runs[0]["discarded_effects"]} == {"refund", "reset_link"}
    found = await runtime.service.events.check(None).read(case_id, count=1000)
    announced = [(event.data["event"], event.data.get("run_id")) for event in found]
    assert ("run_failed", intake["run_id"]) not in announced, announced
    assert ("run_rolled_back", intake["run_id"]) in announced, announced
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "completed", case
    assert customer_messages(await conversation(runtime, case_id)) == [INVOICE]
    record, state = await sections_and_state(runtime, case_id)
    assert record == state
    for kind in ("refund", "reset_link"):
        assert len(await provider_calls(runtime, case_id, kind)) == 1


async def test_a_follow_up_queued_while_a_refused_resume_holds_the_case_is_run(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resume of a case at rest is refused (409), but it holds the case's run lock while
    it looks: a follow-up accepted then (202) leaves its run to the holder. The holder must
    look at the queue when it lets go, as a holder whose run ended does, not leave the run
    queued until the timer's next tick."""
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    reached, release = asyncio.Event(), asyncio.Event()
    read_state = runtime.graph.aget_state

    async def slow_read(config: Any, **kwargs: Any) -> Any:
        if not reached.is_set():
            reached.set()
            await release.wait()
        return await read_state(config, **kwargs)

    monkeypatch.setattr(runtime.graph, "aget_state", slow_read)
    resume = asyncio.ensure_future(client.post(f"/api/cases/{case_id}/resume"))
    await asyncio.wait_for(reached.wait(), 30)
    follow_up = await client.post(f"/api/cases/{case_id}/messages", json={"text": INVOICE})
    assert follow_up.status_code == 202, follow_up.text
    assert follow_up.json()["run"]["status"] == "queued"
    release.set()
    refused = await resume
    assert refused.status_code == 409, refused.text
    # Well before the timer's next tick (a minute).
    runs = await until_idle(runtime, client, case_id, within=10)
    assert [r["status"] for r in runs] == ["completed", "completed"], runs


async def test_the_timer_ends_a_paused_run_a_follow_up_stopped_when_nobody_took_the_queue(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """Another runner held the case when the follow-up came (it was left the queue) and
    let go without running it: the timer ends the paused run and runs the follow-up."""
    response = await client.post("/api/cases", json=escalated(case_id))
    assert response.status_code in (201, 202), response.text
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["awaiting_review"]
    held = await runtime.store.lock(run_lock_name(case_id), ttl_ms=60_000)
    try:
        queued = await client.post(
            f"/api/cases/{case_id}/messages", json={"text": INVOICE, "strategy": "rollback"}
        )
        assert queued.status_code == 202, queued.text
    finally:
        await runtime.store.unlock(held)
    report = await runtime.service.resume_stale()
    assert case_id in report.resumed
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["rolled_back", "awaiting_review"]
    assert customer_messages(await conversation(runtime, case_id)) == [INVOICE]


async def test_events_whose_text_has_unicode_line_separators_reach_a_line_reading_client(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """A customer's text may hold U+2028, U+2029 or U+0085, which JSON leaves raw: a
    client reading the stream by lines with Python's rules (httpx's `iter_lines`, the
    CLI's `follow`) would cut the event's `data` there, lose the event, and never see the
    `run_completed` it waits for. Each event must parse whole."""
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    text = "Line one\u2028line two\u2029and\x85three"
    posted = await client.post(f"/api/cases/{case_id}/messages", json={"text": text})
    assert posted.status_code in (200, 202), posted.text
    await until_idle(runtime, client, case_id)
    stream = await client.get(f"/api/cases/{case_id}/events", params={"seconds": 0})
    assert stream.status_code == 200, stream.text
    frames = list(sse_frames(stream.iter_lines()))
    events = [json.loads(frame.data) for frame in frames]
    queued = [e for e in events if e["event"] == "run_queued" and e.get("kind") == "message"]
    assert [e["text"] for e in queued] == [text]
    assert [e["event"] for e in events].count("run_completed") == 2


async def test_a_new_cases_first_run_is_driven_when_an_enqueued_follow_up_took_the_case_first(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """POST /cases stores the case, its intake run marked running, then starts that run. An
    enqueued follow-up landing in between once took the case, found the intake "running"
    and left it (to a dead runner's timer): nobody drove the intake until its heartbeat went
    stale (5 minutes by default). The submit now holds the case's run lock from before its
    create: the follow-up is queued for it, and both runs are driven at once."""
    events = runtime.service._events
    publish = events.publish
    slowed, go_on = asyncio.Event(), asyncio.Event()

    async def slow_intake_event(target: str, event: str, **fields: Any) -> None:
        if target == case_id and event == "run_queued" and fields.get("kind") == "intake":
            slowed.set()
            await go_on.wait()
        await publish(target, event, **fields)

    monkeypatch.setattr(events, "publish", slow_intake_event)
    submit = asyncio.ensure_future(client.post("/api/cases", json=demo_case(case_id)))
    await asyncio.wait_for(slowed.wait(), 30)
    follow_up = await client.post(f"/api/cases/{case_id}/messages", json={"text": INVOICE})
    assert (follow_up.status_code, follow_up.json()["run"]["status"]) == (202, "queued")
    go_on.set()
    answer = await submit
    assert answer.status_code in (201, 202), answer.text
    runs = await until_idle(runtime, client, case_id, within=15)
    assert [r["status"] for r in runs] == ["completed", "completed"], runs


async def until_status(
    client: httpx.AsyncClient, case_id: str, index: int, status: str
) -> list[dict[str, Any]]:
    """The runs once the `index`th is `status` (without waiting for the case to go idle)."""
    deadline = time.monotonic() + 30
    while True:
        runs = await runs_of(client, case_id)
        if len(runs) > index and runs[index]["status"] == status:
            return runs
        assert time.monotonic() < deadline, runs
        await asyncio.sleep(0.05)


def heartbeat_long_ago(record: WorkflowRecord) -> object:
    """The run section of a running case whose worker died long ago."""
    run = record.sections[RUN_SECTION]
    assert run["status"] == "running"
    return {**run, "heartbeat_at": (utcnow() - timedelta(hours=1)).isoformat()}


async def resumed_after_its_worker_died(runtime: Runtime, gate: StepGate, case_id: str) -> None:
    """The worker driving the case's run (held at the gate) dies, its heartbeat goes stale,
    and the timer's next tick must find the case and resume it."""
    await runtime.service.close()
    gate.open()
    await write_section(runtime.store, case_id, RUN_SECTION, heartbeat_long_ago, agent_id=RUNNER_ID)
    report = await runtime.service.resume_stale()
    assert case_id in report.resumed, report


async def sections_and_state(runtime: Runtime, case_id: str) -> tuple[dict[str, Any], ...]:
    """The agents' sections as the record holds them, and as the graph state holds them."""
    record = await runtime.store.get_fresh(case_id)
    assert record is not None
    state = (await runtime.graph.aget_state(case_config(case_id))).values
    return (
        {name: record.sections.get(name) for name in RESULT_SECTIONS},
        {name: state.get(name) for name in RESULT_SECTIONS},
    )


async def test_an_interrupt_that_cuts_off_a_parallel_step_leaves_record_and_state_agreeing(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Billing and account run in one superstep. The account step passed its stop check and
    wrote its section; the interrupt lands before billing's check, which stops the run:
    LangGraph cancels the account step, so its result never reaches a checkpoint. The next
    run starts from that checkpoint: the record must not keep the cut-off step's section."""
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    record, state = await sections_and_state(runtime, case_id)
    assert record == state and state["account"]["issue"] == "login"

    billing_may_check = asyncio.Event()
    check = RunProgress.node_started

    async def late_billing_check(self: RunProgress, node: str) -> None:
        if node == "billing_agent" and not billing_may_check.is_set():
            await billing_may_check.wait()
        await check(self, node)

    monkeypatch.setattr(RunProgress, "node_started", late_billing_check)
    gate.hold("account")
    first = await client.post(f"/api/cases/{case_id}/messages", json={"text": CHARGED_AND_LOCKED})
    assert first.status_code == 202, first.text
    await asyncio.wait_for(gate.reached["account"].wait(), 30)
    stopping = await client.post(
        f"/api/cases/{case_id}/messages", json={"text": THANKS, "strategy": "interrupt"}
    )
    assert stopping.status_code == 202, stopping.text
    billing_may_check.set()
    await until_status(client, case_id, 1, "interrupted")
    gate.open()
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed", "interrupted", "completed"]

    record, state = await sections_and_state(runtime, case_id)
    # The interrupted run's account step never reached a checkpoint: the state still holds
    # the first run's account result, and so must the record.
    assert state["account"]["issue"] == "login"
    assert record == state
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["account"] == state["account"]


async def test_a_resume_that_meets_a_busy_run_index_never_leaves_a_running_case_unindexed(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed case rests, so the timer dropped it from the run index. Its resume finds the
    index busy: the case must not end up marked running where the timer never looks (a
    worker dying during that run would leave it stalled for good)."""
    tracker = runtime.service._tracker
    gate.fail_once.add("policy")
    response = await client.post("/api/cases", json=escalated(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    assert (await client.get(f"/api/cases/{case_id}")).json()["status"] == "failed"
    await runtime.service.resume_stale()  # the timer's tick: a case at rest leaves the index
    assert case_id not in await tracker.active_cases()

    add = tracker._add_to_index
    busy_once = [case_id]

    async def busy_index(added: str) -> str:
        if added in busy_once:
            busy_once.remove(added)
            raise VersionConflict(f"index of {added}", 1, 2)
        return await add(added)

    monkeypatch.setattr(tracker, "_add_to_index", busy_index)
    gate.hold("policy")
    refused = await client.post(f"/api/cases/{case_id}/resume")
    # Refused with nothing written: the case is as it was, and the client retries.
    assert refused.status_code == 503, refused.text
    assert "run index is busy" in refused.json()["error"]
    assert (await client.get(f"/api/cases/{case_id}")).json()["status"] == "failed"
    resumed = await client.post(f"/api/cases/{case_id}/resume")
    assert resumed.status_code == 202, resumed.text
    await asyncio.wait_for(gate.reached["policy"].wait(), 30)

    # The worker driving the resumed run dies; the timer resumes the case.
    await resumed_after_its_worker_died(runtime, gate, case_id)
    await until_idle(runtime, client, case_id)
    assert (await client.get(f"/api/cases/{case_id}")).json()["status"] == "awaiting_review"


async def test_a_follow_up_queued_while_the_timer_drops_its_case_is_resumed_after_a_crash(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The follow-up found its case in the run index (so added nothing), then the timer's
    tick, which had seen the case at rest, dropped it and checked it before the follow-up's
    run landed on the record. The worker then dies during that run: the timer must still
    find the case and resume it."""
    tracker = runtime.service._tracker
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    assert case_id in await tracker.active_cases()

    race = hold_the_index_for_a_tick(tracker, case_id, monkeypatch, busy_after=False)
    gate.hold("billing")
    posting = asyncio.ensure_future(
        client.post(f"/api/cases/{case_id}/messages", json={"text": CHARGED_AND_LOCKED})
    )
    await asyncio.wait_for(race.indexed.wait(), 30)
    await runtime.service.resume_stale()  # the tick: the case rests, it leaves the index
    race.ticked.set()
    assert (await posting).status_code == 202
    await asyncio.wait_for(gate.reached["billing"].wait(), 30)

    # The worker driving the follow-up's run dies; the timer resumes the case.
    await resumed_after_its_worker_died(runtime, gate, case_id)
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed", "completed"]


async def test_a_follow_up_whose_index_re_check_meets_a_busy_shard_is_never_acknowledged_lost(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, and the follow-up's look-up of its case after queueing the run (which would
    put the dropped case back) meets a busy shard. Answered 202 then, the worker dying
    during the run would leave the case where the timer never looks: the request must not
    be acknowledged until the case is indexed (the client's retry is)."""
    tracker = runtime.service._tracker
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)

    race = hold_the_index_for_a_tick(tracker, case_id, monkeypatch, busy_after=True)
    gate.hold("billing")
    key = {"Idempotency-Key": f"{case_id}-follow-up"}
    message = {"text": CHARGED_AND_LOCKED}
    posting = asyncio.ensure_future(
        client.post(f"/api/cases/{case_id}/messages", json=message, headers=key)
    )
    await asyncio.wait_for(race.indexed.wait(), 30)
    await runtime.service.resume_stale()  # the tick: the case rests, it leaves the index
    race.ticked.set()
    answer = await posting
    assert race.busy.is_set()
    if answer.status_code != 202:
        # Refused, not acknowledged: the client sends the message again.
        assert answer.status_code == 503, answer.text
        assert "run index is busy" in answer.json()["error"]
        answer = await client.post(f"/api/cases/{case_id}/messages", json=message, headers=key)
        assert answer.status_code in (200, 202), answer.text
    await asyncio.wait_for(gate.reached["billing"].wait(), 30)

    # The worker driving the follow-up's run dies; the timer resumes the case.
    await resumed_after_its_worker_died(runtime, gate, case_id)
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed", "completed"]


async def test_a_resume_whose_index_re_check_meets_a_busy_shard_is_never_acknowledged_lost(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed case rests, still indexed. Its resume finds it in the run index (so adds
    nothing), then the timer's tick, which saw it at rest, drops it and checks it before the
    resume marks it running; the resume's look-up after its mark meets a busy shard.
    Answered 202 then, the worker dying during the run would leave the case where the timer
    never looks: the resume must not be acknowledged until the case is indexed."""
    tracker = runtime.service._tracker
    gate.fail_once.add("policy")
    response = await client.post("/api/cases", json=escalated(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)
    assert (await client.get(f"/api/cases/{case_id}")).json()["status"] == "failed"
    assert case_id in await tracker.active_cases()

    race = hold_the_index_for_a_tick(tracker, case_id, monkeypatch, busy_after=True)
    gate.hold("policy")
    resuming = asyncio.ensure_future(client.post(f"/api/cases/{case_id}/resume"))
    await asyncio.wait_for(race.indexed.wait(), 30)
    await runtime.service.resume_stale()  # the tick: the case rests, it leaves the index
    race.ticked.set()
    answer = await resuming
    assert race.busy.is_set()
    if answer.status_code != 202:
        # Refused, not acknowledged; the case was marked running (as a worker dying right
        # after its mark leaves it): it reads stalled once its heartbeat is, and the
        # client's resume then puts it back in the index first.
        assert answer.status_code == 503, answer.text
        assert "run index is busy" in answer.json()["error"]
        assert not gate.reached["policy"].is_set()
        await write_section(
            runtime.store, case_id, RUN_SECTION, heartbeat_long_ago, agent_id=RUNNER_ID
        )
        answer = await client.post(f"/api/cases/{case_id}/resume")
        assert answer.status_code == 202, answer.text
    await asyncio.wait_for(gate.reached["policy"].wait(), 30)

    # The worker driving the resumed run dies; the timer resumes the case.
    await resumed_after_its_worker_died(runtime, gate, case_id)
    await until_idle(runtime, client, case_id)
    assert (await client.get(f"/api/cases/{case_id}")).json()["status"] == "awaiting_review"


async def test_two_rollbacks_sent_at_once_while_the_case_awaits_review_are_both_applied(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """A rollback sent while the case awaits review ends the paused run (README: "interrupt
    and rollback end the paused run"), whatever other stopping follow-up came with it: the
    second one stops the run the first one started, it does not wait for a review decision
    like an `enqueue`."""
    response = await client.post("/api/cases", json=escalated(case_id))
    assert response.status_code in (201, 202), response.text
    assert [r["status"] for r in await until_idle(runtime, client, case_id)] == ["awaiting_review"]
    answers = await asyncio.gather(
        *(
            client.post(
                f"/api/cases/{case_id}/messages", json={"text": text, "strategy": "rollback"}
            )
            for text in (CHARGED_AND_LOCKED, THANKS)
        )
    )
    assert all(answer.status_code in (200, 202) for answer in answers), answers
    await asyncio.wait_for(runtime.service.wait_idle(), 60)
    runs = await runs_of(client, case_id)
    assert [r["status"] for r in runs] == ["rolled_back", "rolled_back", "awaiting_review"]
    first, second = runs[1], runs[2]
    assert runs[0]["stopped_by"] == first["run_id"] and first["stopped_by"] == second["run_id"]
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "awaiting_review"


async def test_a_case_submitted_while_the_timer_drops_it_is_resumed_after_a_crash(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new case is indexed before its record exists; a tick that finds the index entry
    without a record drops it (a submit that died before creating it). A submit still
    creating it must not lose its entry so: its worker dying during the first run would
    leave the case stalled where the timer never looks."""
    tracker = runtime.service._tracker
    register = tracker.register
    registered = asyncio.Event()
    timer_done = asyncio.Event()

    async def register_then_wait_for_the_timer(indexed: str) -> str:
        indexed_at = await register(indexed)
        if indexed == case_id and not registered.is_set():
            registered.set()
            await timer_done.wait()
        return indexed_at

    monkeypatch.setattr(tracker, "register", register_then_wait_for_the_timer)
    gate.hold("billing")
    posting = asyncio.ensure_future(client.post("/api/cases", json=demo_case(case_id)))
    await asyncio.wait_for(registered.wait(), 30)
    await runtime.service.resume_stale()  # the tick: no record yet
    timer_done.set()
    assert (await posting).status_code == 202
    await asyncio.wait_for(gate.reached["billing"].wait(), 30)

    # The worker driving the first run dies; the timer resumes the case.
    await resumed_after_its_worker_died(runtime, gate, case_id)
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed"]


@pytest.mark.parametrize("slow", ["submit stuck past the stale period", "entry a dead submit left"])
async def test_a_case_submitted_while_the_timer_drops_its_old_index_entry_is_resumed_after_a_crash(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
    slow: str,
) -> None:
    """As above, with an index entry older than the stale period when the tick sees it
    without a record, so the tick drops it as a dead submit's: the submit was stuck that
    long before creating its case, or its case id's entry is one an earlier submit that
    died before creating it left. The case created just after must still be found once
    its worker dies."""
    tracker = runtime.service._tracker
    stale_after = timedelta(seconds=runtime.settings.case_stale_after_seconds)
    if slow == "entry a dead submit left":
        await tracker.register(case_id)

        def long_ago(record: WorkflowRecord) -> object:
            cases = dict(record.sections["cases"])
            return {**cases, case_id: (utcnow() - 2 * stale_after).isoformat()}

        await write_section(runtime.store, shard_of(case_id), "cases", long_ago, agent_id=RUNNER_ID)
    register = tracker.register
    registered = asyncio.Event()
    timer_done = asyncio.Event()

    async def register_then_wait_for_the_timer(indexed: str) -> str:
        indexed_at = await register(indexed)
        if indexed == case_id and not registered.is_set():
            if slow == "submit stuck past the stale period":
                # The clocks move on past the stale period while the submit waits.
                ahead = stale_after + timedelta(seconds=1)
                monkeypatch.setattr(runs_module, "utcnow", lambda: utcnow() + ahead)
            registered.set()
            await timer_done.wait()
        return indexed_at

    monkeypatch.setattr(tracker, "register", register_then_wait_for_the_timer)
    gate.hold("billing")
    posting = asyncio.ensure_future(client.post("/api/cases", json=demo_case(case_id)))
    await asyncio.wait_for(registered.wait(), 30)
    report = await runtime.service.resume_stale()  # the tick: no record, indexed long ago
    assert case_id not in report.skipped, report
    timer_done.set()
    assert (await posting).status_code == 202
    await asyncio.wait_for(gate.reached["billing"].wait(), 30)

    # The worker driving the first run dies; the timer resumes the case.
    await resumed_after_its_worker_died(runtime, gate, case_id)
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed"]


async def test_a_follow_up_refused_for_a_busy_index_after_queueing_is_told_as_queued_once(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The follow-up's run is queued, then its index re-check meets a busy shard: 503, and
    the client's retry replays it (and starts it). Its events still tell it was queued, as
    for any run: the refused request published nothing, and a replay used to publish nothing
    either."""
    tracker = runtime.service._tracker
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case_id)

    add = tracker._add_to_index
    calls: list[str] = []

    async def busy_on_the_re_check(added: str) -> str:
        if added == case_id:
            calls.append(added)
            if len(calls) == 2:  # the look-up after the run was queued
                raise VersionConflict(f"index of {added}", 1, 2)
        return await add(added)

    monkeypatch.setattr(tracker, "_add_to_index", busy_on_the_re_check)
    key = {"Idempotency-Key": f"{case_id}-follow-up"}
    message = {"text": INVOICE}
    refused = await client.post(f"/api/cases/{case_id}/messages", json=message, headers=key)
    assert refused.status_code == 503, refused.text
    answer = await client.post(f"/api/cases/{case_id}/messages", json=message, headers=key)
    assert answer.status_code in (200, 202), answer.text
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed", "completed"]
    events = await client.get(f"/api/cases/{case_id}/events", params={"seconds": 0})
    kinds = [frame.event for frame in sse_frames(events.text.splitlines())]
    assert kinds.count("run_started") == 2
    assert kinds.count("run_queued") == 2, kinds


@dataclass
class IndexRace:
    """`indexed`: the request looked its case up in the run index (and waits); the test
    runs the timer's tick, then sets `ticked`; `busy`: the case's next index write after
    the tick met a busy shard (once)."""

    indexed: asyncio.Event
    ticked: asyncio.Event
    busy: asyncio.Event


def hold_the_index_for_a_tick(
    tracker: RunTracker, case_id: str, monkeypatch: pytest.MonkeyPatch, *, busy_after: bool
) -> IndexRace:
    """The case's first index look-up waits for the test's tick; with `busy_after`, its
    next index write after the tick meets a busy shard."""
    index, add = tracker._index, tracker._add_to_index
    race = IndexRace(asyncio.Event(), asyncio.Event(), asyncio.Event())

    async def index_then_wait_for_the_timer(indexed: str) -> str:
        indexed_at = await index(indexed)
        if indexed == case_id and not race.indexed.is_set():
            race.indexed.set()
            await race.ticked.wait()
        return indexed_at

    async def busy_after_the_timer(added: str) -> str:
        if added == case_id and race.ticked.is_set() and not race.busy.is_set():
            race.busy.set()
            raise VersionConflict(f"index of {added}", 1, 2)
        return await add(added)

    monkeypatch.setattr(tracker, "_index", index_then_wait_for_the_timer)
    if busy_after:
        monkeypatch.setattr(tracker, "_add_to_index", busy_after_the_timer)
    return race
