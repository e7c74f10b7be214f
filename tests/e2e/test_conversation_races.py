"""Follow-ups, resumes and the timer racing one another on the real stack (each cold backend,
each write mode once): what a race hunt found.

A run is held open after a chosen step (the app's `after_step` seam); where the window is
before a step's stop check or around a run-index write, the app's own call is held or made
to meet a busy index there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from test_conversation import StepGate, escalated, gated_client, gated_runtime

from state import VersionConflict, WorkflowRecord
from support_cases.demo import demo_case
from support_cases.records import write_section
from support_cases.runs import RUN_SECTION, RUNNER_ID, utcnow
from support_cases.runtime import Runtime
from support_cases.service import RESULT_SECTIONS, RunProgress, case_config
from support_cases.settings import AppSettings

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
    async with gated_runtime(e2e_settings, gate, backend, mode, "conv-races") as opened:
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
    runtime: Runtime, client: httpx.AsyncClient, case_id: str
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    while True:
        await asyncio.wait_for(runtime.service.wait_idle(), 60)
        runs = await runs_of(client, case_id)
        if not any(run["status"] in ("queued", "running") for run in runs):
            return runs
        assert time.monotonic() < deadline, runs
        await asyncio.sleep(0.05)


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

    async def busy_index(added: str) -> None:
        if added in busy_once:
            busy_once.remove(added)
            raise VersionConflict(f"index of {added}", 1, 2)
        await add(added)

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

    # The worker driving the resumed run dies; its heartbeat goes stale.
    await runtime.service.close()
    gate.open()

    def long_ago(record: WorkflowRecord) -> object:
        run = record.sections[RUN_SECTION]
        assert run["status"] == "running"
        return {**run, "heartbeat_at": (utcnow() - timedelta(hours=1)).isoformat()}

    await write_section(runtime.store, case_id, RUN_SECTION, long_ago, agent_id=RUNNER_ID)
    report = await runtime.service.resume_stale()
    assert case_id in report.resumed, report
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

    index = tracker._index
    indexed_once = asyncio.Event()
    timer_done = asyncio.Event()

    async def index_then_wait_for_the_timer(indexed: str) -> None:
        await index(indexed)
        if indexed == case_id and not indexed_once.is_set():
            indexed_once.set()
            await timer_done.wait()

    monkeypatch.setattr(tracker, "_index", index_then_wait_for_the_timer)
    gate.hold("billing")
    posting = asyncio.ensure_future(
        client.post(f"/api/cases/{case_id}/messages", json={"text": CHARGED_AND_LOCKED})
    )
    await asyncio.wait_for(indexed_once.wait(), 30)
    await runtime.service.resume_stale()  # the tick: the case rests, it leaves the index
    timer_done.set()
    assert (await posting).status_code == 202
    await asyncio.wait_for(gate.reached["billing"].wait(), 30)

    # The worker driving the follow-up's run dies; its heartbeat goes stale.
    await runtime.service.close()
    gate.open()

    def long_ago(record: WorkflowRecord) -> object:
        run = record.sections[RUN_SECTION]
        assert run["status"] == "running"
        return {**run, "heartbeat_at": (utcnow() - timedelta(hours=1)).isoformat()}

    await write_section(runtime.store, case_id, RUN_SECTION, long_ago, agent_id=RUNNER_ID)
    report = await runtime.service.resume_stale()
    assert case_id in report.resumed, report
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed", "completed"]


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

    async def register_then_wait_for_the_timer(indexed: str) -> None:
        await register(indexed)
        if indexed == case_id and not registered.is_set():
            registered.set()
            await timer_done.wait()

    monkeypatch.setattr(tracker, "register", register_then_wait_for_the_timer)
    gate.hold("billing")
    posting = asyncio.ensure_future(client.post("/api/cases", json=demo_case(case_id)))
    await asyncio.wait_for(registered.wait(), 30)
    await runtime.service.resume_stale()  # the tick: no record yet
    timer_done.set()
    assert (await posting).status_code == 202
    await asyncio.wait_for(gate.reached["billing"].wait(), 30)

    # The worker driving the first run dies; its heartbeat goes stale.
    await runtime.service.close()
    gate.open()

    def long_ago(record: WorkflowRecord) -> object:
        run = record.sections[RUN_SECTION]
        assert run["status"] == "running"
        return {**run, "heartbeat_at": (utcnow() - timedelta(hours=1)).isoformat()}

    await write_section(runtime.store, case_id, RUN_SECTION, long_ago, agent_id=RUNNER_ID)
    report = await runtime.service.resume_stale()
    assert case_id in report.resumed, report
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed"]
