"""The HTTP API under races a fault hunt found, on the real stack (each cold backend, each
write mode and without Redis): a failed run resumed while follow-ups arrive, a review
decision posted after an earlier decision's run failed, a follow-up after it, a follow-up
racing a submit.

Failures are injected through the app's `after_step` hook (raising once after a step:
any error after an agent's record write and before LangGraph saves the step)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from e2e_payloads import duplicate_charges
from test_conversation import StepGate, gated_client, gated_runtime

from support_cases.auth import ROLE_REVIEW
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from support_cases.service import case_config
from support_cases.settings import AppSettings
from tests.support.effects import provider_calls


@pytest.fixture(scope="module")
def gate() -> StepGate:
    return StepGate()


@pytest.fixture(
    scope="module",
    params=[
        ("cosmos", "write-behind"),
        ("postgres", "write-through"),
        ("postgres", "write-behind"),
        ("cosmos", "write-through"),
        ("postgres", "cold-only"),
        ("cosmos", "cold-only"),
    ],
    ids=lambda p: "-".join(p),
)
async def runtime(
    request: pytest.FixtureRequest, e2e_settings: Callable[..., AppSettings], gate: StepGate
) -> AsyncIterator[Runtime]:
    backend, mode = request.param
    async with gated_runtime(e2e_settings, gate, backend, mode, "hunt") as opened:
        yield opened


@pytest.fixture
async def client(
    runtime: Runtime, gate: StepGate, bearer: Callable[..., dict[str, str]]
) -> AsyncIterator[httpx.AsyncClient]:
    async with gated_client(runtime, gate, bearer("e2e-client")) as http:
        yield http


@pytest.fixture
def case_id() -> str:
    return f"case-hunt-{uuid.uuid4().hex[:16]}"


def escalated(case_id: str) -> dict[str, Any]:
    return {
        "case_id": case_id,
        "customer_id": "cust-escalated",
        "text": "The hotel charged me twice and I can't log in",
        "transactions": duplicate_charges(612.40, merchant="Hotel Europa"),
    }


async def until_idle(runtime: Runtime, client: httpx.AsyncClient, case_id: str) -> list[dict]:
    deadline = time.monotonic() + 60
    while True:
        await runtime.service.wait_idle()
        r = await client.get(f"/api/cases/{case_id}/runs")
        assert r.status_code == 200, r.text
        runs = r.json()["runs"]
        if not any(run["status"] == "running" for run in runs) and (
            not any(run["status"] == "queued" for run in runs)
            or any(run["status"] == "awaiting_review" for run in runs)
        ):
            return runs
        assert time.monotonic() < deadline, runs
        await asyncio.sleep(0.05)


async def performed(runtime: Runtime, case_id: str, kind: str) -> int:
    return len(await provider_calls(runtime, case_id, kind))


async def to_review(client: httpx.AsyncClient, runtime: Runtime, case_id: str) -> None:
    r = await client.post("/api/cases", json=escalated(case_id))
    assert r.status_code in (201, 202), r.text
    await until_idle(runtime, client, case_id)
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "awaiting_review", case


async def failed(
    answer: httpx.Response, client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """`answer` started a run that fails: the runtime waits only 0.5 s for a run (202 after
    it), which a loaded machine's run can outlast, so the failure is read once it rests."""
    assert answer.status_code in (200, 201, 202), answer.text
    await until_idle(runtime, client, case_id)
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "failed", case


async def test_a_resumed_failed_run_is_listed_running_and_a_reject_follow_up_is_refused(
    client: httpx.AsyncClient, runtime: Runtime, gate: StepGate, case_id: str
) -> None:
    """A run that failed (an agent raised) is resumed by an operator: while it runs again
    the case is in a run (a `reject` follow-up is refused), and once it completes the
    runs list says so."""
    gate.fail_once.add("policy")
    await failed(await client.post("/api/cases", json=demo_case(case_id)), client, runtime, case_id)
    runs = (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]
    assert [r["status"] for r in runs] == ["failed"]

    gate.hold("refund")
    resumed = await client.post(f"/api/cases/{case_id}/resume")
    assert resumed.status_code == 202, resumed.text
    await asyncio.wait_for(gate.reached["refund"].wait(), 30)
    during = (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]
    rejected = await client.post(
        f"/api/cases/{case_id}/messages", json={"text": "hello?", "strategy": "reject"}
    )
    gate.open()
    await until_idle(runtime, client, case_id)
    case = (await client.get(f"/api/cases/{case_id}")).json()
    after = (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]
    observed = {
        "case": case["status"],
        "run during resume": [r["status"] for r in during],
        "reject follow-up during resume": rejected.status_code,
        "runs after": [(r["kind"], r["status"]) for r in after],
    }
    assert observed == {
        "case": "completed",
        "run during resume": ["running"],
        "reject follow-up during resume": 409,
        "runs after": [("intake", "completed")],
    }, observed


async def test_a_decision_after_an_earlier_decisions_run_failed_is_refused_not_ignored(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    bearer: Callable[..., dict],
) -> None:
    """rev-a approves; the run that decision resumed fails at its review step (the case is
    `failed`; its checkpoint still holds the interrupt, with rev-a's answer pending). rev-b
    then rejects: that was accepted (200) while the run applied rev-a's approval (the
    answer LangGraph had stored) and refunded. A decision on a case not awaiting review
    is refused (404 to another reviewer, who may not see the case); resumed, the case
    goes on with rev-a's recorded decision, which is what the record says."""
    await to_review(client, runtime, case_id)
    gate.fail_once.add("human_review")
    first = await client.post(
        f"/api/cases/{case_id}/review",
        json={"decision": "approve"},
        headers=bearer("rev-a", [ROLE_REVIEW]),
    )
    await failed(first, client, runtime, case_id)
    after = (await client.get(f"/api/cases/{case_id}")).json()
    assert after["awaiting_review"] is None, after  # no longer offered for review
    second = await client.post(
        f"/api/cases/{case_id}/review",
        json={"decision": "reject"},
        headers=bearer("rev-b", [ROLE_REVIEW]),
    )
    assert second.status_code in (404, 409), second.text
    resumed = await client.post(f"/api/cases/{case_id}/resume")
    assert resumed.status_code in (200, 202), resumed.text
    await until_idle(runtime, client, case_id)
    case = (await client.get(f"/api/cases/{case_id}")).json()
    observed = (
        case["status"],
        case["review"]["reviewer_name"],
        case["review"]["decision"],
        await performed(runtime, case_id, "refund"),
    )
    assert observed == ("completed", "rev-a", "approve", 1), observed


async def test_a_submit_whose_case_a_follow_up_took_at_once_answers_with_the_case(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """POST /cases stores the case (its intake run marked running), then starts its run. A
    follow-up that lands in between (here: while the intake's `run_queued` event is slow to
    publish) once took the case, and the submit answered 409 "being worked on" for the case
    it had just created (read as "not created"). The submit now holds the run lock from
    before the create: the follow-up is queued behind the first run, and the submit answers
    with its case."""
    events = runtime.service._events
    publish = events.publish
    slowed, go_on = asyncio.Event(), asyncio.Event()

    async def slow_intake_event(target: str, event: str, **fields: Any) -> None:
        if target == case_id and event == "run_queued" and fields.get("kind") == "intake":
            slowed.set()
            await go_on.wait()
        await publish(target, event, **fields)

    monkeypatch.setattr(events, "publish", slow_intake_event)
    gate.hold("intake")
    submit = asyncio.create_task(client.post("/api/cases", json=demo_case(case_id)))
    await asyncio.wait_for(slowed.wait(), 30)
    follow_up = await client.post(
        f"/api/cases/{case_id}/messages",
        json={"text": "Also, my invoice is missing", "strategy": "interrupt"},
    )
    assert follow_up.status_code == 202, follow_up.text
    go_on.set()
    await asyncio.wait_for(gate.reached["intake"].wait(), 30)
    answer = await submit
    gate.open()
    await until_idle(runtime, client, case_id)
    stored = await runtime.store.get(case_id)
    assert stored is not None  # the case was created
    assert answer.status_code in (201, 202), (answer.status_code, answer.text)


async def test_a_follow_up_after_a_failed_decision_run_leaves_record_and_state_agreeing(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    bearer: Callable[..., dict],
) -> None:
    """rev-a's approval is accepted (200) but its run fails in the review step, after the
    review section was written. A follow-up then starts a new run over that checkpoint:
    LangGraph drops the failed review task (and the approval with it) and the new run asks
    for a review again; the case record said rev-a approved. The run starting after a
    failed one now sets the agents' sections back to what its starting state holds."""
    await to_review(client, runtime, case_id)
    gate.fail_once.add("human_review")
    first = await client.post(
        f"/api/cases/{case_id}/review",
        json={"decision": "approve"},
        headers=bearer("rev-a", [ROLE_REVIEW]),
    )
    await failed(first, client, runtime, case_id)
    m = await client.post(f"/api/cases/{case_id}/messages", json={"text": "Any news?"})
    assert m.status_code in (200, 202), m.text
    await until_idle(runtime, client, case_id)
    case = (await client.get(f"/api/cases/{case_id}")).json()
    snap = await runtime.graph.aget_state(case_config(case_id))
    observed = {
        "status": case["status"],
        "asks for review": case["awaiting_review"] is not None,
        "record review": (case["review"] or {}).get("decision"),
        "checkpoint review": (snap.values.get("review") or {}).get("decision"),
    }
    # The record and the checkpoint must agree on whether (and how) the case was reviewed.
    assert observed["record review"] == observed["checkpoint review"], observed
