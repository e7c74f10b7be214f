"""Follow-ups racing the run they target, and the event stream, on the real stack (each
cold backend, each write mode once): what a fault hunt found.

A run is held open after a chosen step (the app's `after_step` seam), or a request is held
while it has the case's run lock (a delay in a read it makes), so the follow-up arrives
exactly in the window."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
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
from support_cases.demo import demo_case
from support_cases.effects import idempotency_key
from support_cases.runtime import Runtime
from support_cases.service import run_lock_name
from support_cases.settings import AppSettings


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
        assert len(await runtime.provider.performed(idempotency_key(case_id, kind))) == 1


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
    checkpointer = runtime.graph.checkpointer
    reached, release = asyncio.Event(), asyncio.Event()
    delete_for_runs = checkpointer.adelete_for_runs

    async def held_delete(run_ids: Any) -> None:
        reached.set()
        await release.wait()
        await delete_for_runs(run_ids)

    monkeypatch.setattr(checkpointer, "adelete_for_runs", held_delete)
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
    """POST /cases stores the case, its intake run marked running, and only then takes the
    run lock. An enqueued follow-up landing in between takes the case, finds the intake
    "running" and leaves it (to a dead runner's timer); the submit finds the case taken and
    answers 202. Nobody drives the intake until its heartbeat goes stale (5 minutes by
    default) and the timer resumes it."""
    events = runtime.service._events
    publish = events.publish
    slowed, go_on = asyncio.Event(), asyncio.Event()

    async def slow_intake_event(target: str, event: str, **fields: Any) -> None:
        if target == case_id and event == "run_queued" and fields.get("kind") == "intake":
            slowed.set()
            await go_on.wait()
        await publish(target, event, **fields)

    monkeypatch.setattr(events, "publish", slow_intake_event)
    reached, release = asyncio.Event(), asyncio.Event()
    drain = runtime.service._drain_queue

    async def held_drain(target: str, guard: Any) -> None:
        # The follow-up holds the case while the submit tries to take it.
        if target == case_id and not reached.is_set():
            reached.set()
            await release.wait()
        await drain(target, guard)

    monkeypatch.setattr(runtime.service, "_drain_queue", held_drain)
    submit = asyncio.ensure_future(client.post("/api/cases", json=demo_case(case_id)))
    await asyncio.wait_for(slowed.wait(), 30)
    follow_up = asyncio.ensure_future(
        client.post(f"/api/cases/{case_id}/messages", json={"text": INVOICE})
    )
    await asyncio.wait_for(reached.wait(), 30)
    go_on.set()
    answer = await submit
    assert answer.status_code in (201, 202), answer.text
    release.set()
    assert (await follow_up).status_code == 202
    runs = await until_idle(runtime, client, case_id, within=15)
    assert [r["status"] for r in runs] == ["completed", "completed"], runs
