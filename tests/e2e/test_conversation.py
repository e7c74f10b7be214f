"""Cases as conversations, end to end on the real stack (both cold backends and both write
modes, Redis in front): follow-up messages under each strategy, the runs list, and the case's events
over Server-Sent Events.

A run is held open at a chosen step (the app's `after_step` seam) so a follow-up
arrives while it is in progress, deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from support_cases.api import create_app
from support_cases.auth import ROLE_REVIEW, ROLE_SUBMIT
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from support_cases.service import case_config, run_lock_name
from support_cases.settings import AppSettings
from tests.support.cosmos import drop_container
from tests.support.effects import provider_calls
from tests.support.postgres import own_database
from tests.support.sse import parse_sse

INVOICE = "I also can't download my invoice"
LOGIN_AGAIN = "The reset link did not arrive, I still cannot log in"
THANKS = "Thanks, that is all"


class StepGate:
    """Holds the named steps of every run open until released; fails those in `fail_once`
    once each, after the step (raising, as any error after an agent's record write)."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.reached: dict[str, asyncio.Event] = {}
        self.release: dict[str, asyncio.Event] = {}
        self.fail_once: set[str] = set()

    def hold(self, step: str) -> None:
        self.held.add(step)
        self.reached[step] = asyncio.Event()
        self.release[step] = asyncio.Event()

    def open(self) -> None:
        for event in self.release.values():
            event.set()
        self.held.clear()

    def disarm(self) -> None:
        """Open every held step and drop the failures no run took: the gate is the
        module's, and a test that failed before its case reached an armed step would
        otherwise fail the next test's run on this worker."""
        self.open()
        self.fail_once.clear()

    async def hook(self, step: str) -> None:
        if step in self.fail_once:
            self.fail_once.discard(step)
            raise RuntimeError(f"injected failure after {step}")
        if step in self.held:
            self.reached[step].set()
            await self.release[step].wait()


@pytest.fixture(scope="module")
def gate() -> StepGate:
    return StepGate()


@asynccontextmanager
async def gated_runtime(
    e2e_settings: Callable[..., AppSettings],
    gate: StepGate,
    backend: str,
    mode: str,
    container_prefix: str,
) -> AsyncIterator[Runtime]:
    """The app on `backend` in `mode` (`cold-only`: without Redis), its steps held by
    `gate`. A short wait: a request answers 202 while the held run goes on. A Cosmos
    container or Postgres database of its own, dropped after: the emulator's
    cross-partition queries scan the whole container, and the suite's shared one should
    not grow by these cases for every test after; and a timer tick run here (which
    resumes every stalled case it finds) must not find a case another test left
    "running" on purpose, to be held at this gate with the tick waiting on it."""
    with contextlib.ExitStack() as owned:
        own: dict[str, object]
        if backend == "cosmos":
            own = {"cosmos_container": f"{container_prefix}-{uuid.uuid4().hex[:12]}"}
        else:
            server = e2e_settings(backend).postgres_url
            assert server is not None
            own = {"postgres_url": owned.enter_context(own_database(server.get_secret_value()))}
        if mode == "cold-only":
            settings = e2e_settings(backend, redis_url=None, case_sync_wait_seconds=0.5, **own)
        else:
            settings = e2e_settings(
                backend, state_write_mode=mode, case_sync_wait_seconds=0.5, **own
            )
            assert (settings.write_mode.value == "write-behind") == (mode == "write-behind")
        opened = await Runtime.open(settings, after_step=gate.hook)
        try:
            yield opened
        finally:
            gate.disarm()
            await opened.service.wait_idle()
            await opened.close()
            if backend == "cosmos":
                await drop_container(settings)


@asynccontextmanager
async def gated_client(
    runtime: Runtime, gate: StepGate, headers: dict[str, str]
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app; once done, the held steps go on and the runs end."""
    transport = httpx.ASGITransport(app=create_app(runtime))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://cases.test", headers=headers, timeout=60
        ) as http:
            yield http
    finally:
        gate.disarm()
        await runtime.service.wait_idle()


# Each cold backend, and each write mode once (a run's checkpoints in Redis until its
# boundary, or every step in the cold store).
@pytest.fixture(
    scope="module",
    params=[("cosmos", "write-behind"), ("postgres", "write-through")],
    ids=lambda param: "-".join(param),
)
async def runtime(
    request: pytest.FixtureRequest, e2e_settings: Callable[..., AppSettings], gate: StepGate
) -> AsyncIterator[Runtime]:
    backend, mode = request.param
    async with gated_runtime(e2e_settings, gate, backend, mode, "conversation") as opened:
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
    """The runs once none is queued or running (the runs go on in the background)."""
    deadline = time.monotonic() + 60
    while True:
        await runtime.service.wait_idle()
        runs = await runs_of(client, case_id)
        if not any(run["status"] in ("queued", "running") for run in runs):
            return runs
        assert time.monotonic() < deadline, runs
        await asyncio.sleep(0.05)


async def post(
    client: httpx.AsyncClient, case_id: str, text: str, strategy: str | None = None, **headers: str
) -> httpx.Response:
    body: dict[str, Any] = {"text": text}
    if strategy:
        body["strategy"] = strategy
    return await client.post(f"/api/cases/{case_id}/messages", json=body, headers=headers)


async def submitted(
    client: httpx.AsyncClient, runtime: Runtime, case: dict[str, Any]
) -> dict[str, Any]:
    """Submit a case and wait for its run to rest (an answer may come before: 202)."""
    response = await client.post("/api/cases", json=case)
    assert response.status_code in (201, 202), response.text
    await until_idle(runtime, client, case["case_id"])
    return dict((await client.get(f"/api/cases/{case['case_id']}")).json())


async def answered(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    text: str,
    strategy: str | None = None,
) -> dict[str, Any]:
    """Post a follow-up and wait until the case's runs rest; its run as the list has it."""
    response = await post(client, case_id, text, strategy)
    assert response.status_code in (200, 202), response.text
    run_id = response.json()["run"]["run_id"]
    runs = await until_idle(runtime, client, case_id)
    return next(run for run in runs if run["run_id"] == run_id)


async def conversation(runtime: Runtime, case_id: str) -> list[dict[str, Any]]:
    state = await runtime.graph.aget_state(case_config(case_id))
    return list(state.values.get("messages", []))


def customer_messages(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "customer"]


async def start_held(client: httpx.AsyncClient, gate: StepGate, case_id: str, step: str) -> None:
    """Submit case_8842 (as `case_id`) and hold its run after `step`."""
    gate.hold(step)
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code == 202, response.text
    await asyncio.wait_for(gate.reached[step].wait(), 30)


async def test_a_follow_up_after_rest_runs_the_agents_it_needs_and_answers_everything(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    await submitted(client, runtime, demo_case(case_id))
    response = await post(client, case_id, INVOICE)
    assert response.status_code in (200, 202), response.text
    assert response.headers["location"] == f"/api/cases/{case_id}/runs"
    runs = await until_idle(runtime, client, case_id)
    run = runs[-1]
    assert run["run_id"] == response.json()["run"]["run_id"]
    assert run["status"] == "completed" and run["kind"] == "message"
    assert run["strategy"] == "enqueue"  # the default strategy

    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "completed"
    assert INVOICE in case["final_response"]
    assert "refunded 49.99 USD" in case["final_response"]  # the whole case, not only the new
    steps = case["completed_steps"]
    # The invoice is about money: billing ran again; the account agent was not needed.
    assert steps.count("billing") == 2 and steps.count("account") == 1
    assert steps.count("intake") == 2 and steps.count("response") == 2
    # The refund is not issued twice for one case.
    assert len(await provider_calls(runtime, case_id, "refund")) == 1
    assert customer_messages(await conversation(runtime, case_id)) == [
        demo_case(case_id)["text"],
        INVOICE,
    ]

    await answered(client, runtime, case_id, LOGIN_AGAIN)
    await answered(client, runtime, case_id, THANKS)
    steps = (await client.get(f"/api/cases/{case_id}")).json()["completed_steps"]
    # Access: the account agent; a thank-you: neither billing nor account, straight to policy.
    assert steps.count("account") == 2 and steps.count("billing") == 2
    assert steps.count("policy") == 4
    runs = await runs_of(client, case_id)
    assert [r["kind"] for r in runs] == ["intake", "message", "message", "message"]
    assert all(r["status"] == "completed" and r["duration_seconds"] >= 0 for r in runs)


async def test_a_follow_up_saying_the_customer_still_cannot_log_in_reaches_the_account_agent(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """Found by review: "I haven't been able to log in since Monday" read as no access
    problem, so the follow-up went straight to policy and nobody looked at the account."""
    await submitted(client, runtime, demo_case(case_id))
    run = await answered(client, runtime, case_id, "I haven't been able to log in since Monday")
    assert run["status"] == "completed"
    steps = (await client.get(f"/api/cases/{case_id}")).json()["completed_steps"]
    assert steps.count("account") == 2 and steps.count("policy") == 2


async def test_a_failure_armed_by_a_test_that_ended_first_does_not_fail_the_next_tests_run(
    runtime: Runtime, gate: StepGate, bearer: Callable[..., dict[str, str]], case_id: str
) -> None:
    """The gate outlives a test: one that armed a step's failure and failed before its case
    reached that step (its submit refused, say) left the next test's run to fail there."""
    async with gated_client(runtime, gate, bearer("e2e-client")):
        gate.fail_once.add("policy")  # and the test ends before any run reaches policy
    async with gated_client(runtime, gate, bearer("e2e-client")) as client:
        case = await submitted(client, runtime, demo_case(case_id))
    assert case["status"] == "completed", case


async def test_reject_answers_409_while_a_run_is_in_progress(
    client: httpx.AsyncClient, runtime: Runtime, gate: StepGate, case_id: str
) -> None:
    await start_held(client, gate, case_id, "billing")
    refused = await post(client, case_id, INVOICE, "reject")
    assert refused.status_code == 409, refused.text
    assert "run in progress" in refused.json()["error"]
    gate.open()
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed"]  # nothing was queued
    accepted = await answered(client, runtime, case_id, INVOICE, "reject")
    assert accepted["status"] == "completed"


async def test_enqueue_runs_each_message_once_in_arrival_order_after_the_current_run(
    client: httpx.AsyncClient, runtime: Runtime, gate: StepGate, case_id: str
) -> None:
    await start_held(client, gate, case_id, "billing")
    first = await post(client, case_id, INVOICE, "enqueue")
    second = await post(client, case_id, THANKS, "enqueue")
    for response in (first, second):
        assert response.status_code == 202, response.text
        assert response.json()["run"]["status"] == "queued"
    gate.open()
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed"] * 3
    assert [r["text"] for r in runs[1:]] == [INVOICE, THANKS]
    assert [r["run_id"] for r in runs[1:]] == [
        first.json()["run"]["run_id"],
        second.json()["run"]["run_id"],
    ]
    # FIFO: each run started after the one before it ended.
    for earlier, later in itertools.pairwise(runs):
        assert later["started_at"] >= earlier["ended_at"]
    assert customer_messages(await conversation(runtime, case_id)) == [
        demo_case(case_id)["text"],
        INVOICE,
        THANKS,
    ]


async def test_interrupt_stops_the_run_at_its_next_step_and_the_new_run_starts_from_its_state(
    client: httpx.AsyncClient, runtime: Runtime, gate: StepGate, case_id: str
) -> None:
    await start_held(client, gate, case_id, "billing")
    response = await post(client, case_id, INVOICE, "interrupt")
    assert response.status_code == 202, response.text
    gate.open()
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["interrupted", "completed"]
    assert runs[0]["stopped_by"] == runs[1]["run_id"]
    case = (await client.get(f"/api/cases/{case_id}")).json()
    steps = case["completed_steps"]
    # The first run's progress was kept (intake, billing, account); it stopped before policy.
    assert steps[:3] == ["intake", "billing", "account"] or steps[:3] == [
        "intake",
        "account",
        "billing",
    ]
    assert steps.count("policy") == 1 and steps.count("response") == 1
    assert case["refund"]["status"] == "issued"
    assert customer_messages(await conversation(runtime, case_id)) == [
        demo_case(case_id)["text"],
        INVOICE,
    ]
    # The interrupted run's checkpoints are still there.
    first_run = [
        s
        async for s in runtime.graph.aget_state_history(case_config(case_id))
        if (s.metadata or {}).get("run_id") == runs[0]["run_id"]
    ]
    assert first_run


async def test_a_run_an_interrupt_stopped_is_not_traced_as_a_failure(
    client: httpx.AsyncClient, runtime: Runtime, gate: StepGate, case_id: str
) -> None:
    """A follow-up's stop ends the run at a step boundary by raising `RunStopped`: what the
    caller asked for, as LangGraph's interrupt is for an agent's span, not an error for
    Application Insights to count among the failures."""
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "the app installs an SDK provider"
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    try:
        await start_held(client, gate, case_id, "billing")
        assert (await post(client, case_id, INVOICE, "interrupt")).status_code == 202
        gate.open()
        runs = await until_idle(runtime, client, case_id)
        assert [r["status"] for r in runs] == ["interrupted", "completed"]
        spans = [
            span
            for span in exporter.get_finished_spans()
            if span.name == "case.run" and span.attributes.get("case_id") == case_id
        ]
    finally:
        processor.shutdown()
    assert len(spans) == 2
    assert all(span.status.status_code is not StatusCode.ERROR for span in spans), [
        (span.status.status_code, [event.name for event in span.events]) for span in spans
    ]
    assert sorted(str(span.attributes.get("outcome")) for span in spans) == [
        "None",
        "RunStopped",
    ]


async def test_rollback_discards_the_run_and_reports_the_side_effects_it_had_done(
    client: httpx.AsyncClient, runtime: Runtime, gate: StepGate, case_id: str
) -> None:
    # Held after the refund went out: the rolled-back run has done two side effects.
    await start_held(client, gate, case_id, "refund")
    response = await post(client, case_id, INVOICE, "rollback")
    assert response.status_code == 202, response.text
    gate.open()
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["rolled_back", "completed"]
    discarded = {effect["kind"]: effect for effect in runs[0]["discarded_effects"]}
    assert set(discarded) == {"refund", "reset_link"}
    # None of its checkpoints is left; the new run started from before it.
    history = [s async for s in runtime.graph.aget_state_history(case_config(case_id))]
    assert history
    assert not [s for s in history if (s.metadata or {}).get("run_id") == runs[0]["run_id"]]
    assert customer_messages(await conversation(runtime, case_id)) == [INVOICE]
    # Its side effects are not repeated: the new run found them done and reused them.
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["refund"]["reference"] == discarded["refund"]["result"]["reference"]
    for kind in ("refund", "reset_link"):
        assert len(await provider_calls(runtime, case_id, kind)) == 1
    # The follow-up speaks of no access problem, so the new run's account step finds no
    # issue in it: the link the rolled-back run sent went out all the same, and the case
    # says so.
    sent = discarded["reset_link"]
    assert case["account"]["reset_link_sent"] is True
    assert case["account"]["reset_reference"] == sent["result"]["reference"]
    assert sent["result"]["reference"] in case["final_response"]
    assert len(await provider_calls(runtime, case_id, "reset_link")) == 1


async def test_a_follow_up_waits_behind_a_review_and_runs_after_the_decision(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, reviewer: dict[str, str]
) -> None:
    assert (await submitted(client, runtime, escalated(case_id)))["status"] == "awaiting_review"
    queued = await post(client, case_id, INVOICE)
    assert queued.status_code == 202 and queued.json()["run"]["status"] == "queued"
    assert (await post(client, case_id, THANKS, "reject")).status_code == 409
    decided = await client.post(
        f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
    )
    assert decided.status_code in (200, 202), decided.text
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["completed", "completed"]
    assert runs[1]["started_at"] >= runs[0]["ended_at"]


async def test_messages_are_idempotent_on_their_key(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    await submitted(client, runtime, demo_case(case_id))
    first = await post(client, case_id, INVOICE, **{"Idempotency-Key": "follow-up-1"})
    again = await post(client, case_id, INVOICE, **{"Idempotency-Key": "follow-up-1"})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["run"]["run_id"] == first.json()["run"]["run_id"]
    other = await post(client, case_id, THANKS, **{"Idempotency-Key": "follow-up-1"})
    assert other.status_code == 422, other.text
    runs = await until_idle(runtime, client, case_id)
    assert len(runs) == 2
    assert customer_messages(await conversation(runtime, case_id)).count(INVOICE) == 1


async def test_bad_messages_and_strangers_are_refused_before_anything_is_written(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    bearer: Callable[..., dict[str, str]],
) -> None:
    await submitted(client, runtime, demo_case(case_id))
    for body in ({}, {"text": ""}, {"text": "x", "strategy": "later"}, {"text": "x", "extra": 1}):
        response = await client.post(f"/api/cases/{case_id}/messages", json=body)
        assert response.status_code == 422, (body, response.text)
    missing = await post(client, "case-e2e-nobody-has-this", INVOICE)
    assert missing.status_code == 404
    stranger = await client.post(
        f"/api/cases/{case_id}/messages",
        json={"text": INVOICE},
        headers=bearer("someone-else", [ROLE_SUBMIT]),
    )
    assert stranger.status_code == 404
    reviewer = await client.post(
        f"/api/cases/{case_id}/messages",
        json={"text": INVOICE},
        headers=bearer("a-reviewer", [ROLE_REVIEW]),
    )
    assert reviewer.status_code == 403
    assert len(await runs_of(client, case_id)) == 1


async def test_events_tell_each_run_and_step_and_resume_after_the_last_id(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    await submitted(client, runtime, demo_case(case_id))
    await answered(client, runtime, case_id, INVOICE)
    response = await client.get(f"/api/cases/{case_id}/events", params={"seconds": 0})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    kinds = [e["event"] for e in events]
    assert kinds[:3] == ["run_queued", "run_started", "node_started"]
    assert kinds.count("run_completed") == 2 and kinds.count("run_queued") == 2
    finished = [e for e in events if e["event"] == "node_finished"]
    assert {e["node"] for e in finished} >= {"intake", "billing_agent", "response_agent"}
    billing = next(e for e in finished if e["node"] == "billing_agent")
    assert billing["section"] == "billing" and "duplicate" in billing["summary"]
    assert events[-1]["event"] == "run_completed" and events[-1]["queued"] == 0
    assert len({e["id"] for e in events}) == len(events)

    middle = events[len(events) // 2]["id"]
    rest = await client.get(
        f"/api/cases/{case_id}/events", params={"seconds": 0}, headers={"Last-Event-ID": middle}
    )
    assert parse_sse(rest.text) == events[len(events) // 2 + 1 :]
    bad = await client.get(
        f"/api/cases/{case_id}/events", params={"seconds": 0}, headers={"Last-Event-ID": "x"}
    )
    assert bad.status_code == 422


async def test_a_live_stream_gets_the_next_run_as_it_happens(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    await submitted(client, runtime, demo_case(case_id))
    backlog = parse_sse(
        (await client.get(f"/api/cases/{case_id}/events", params={"seconds": 0})).text
    )
    seen: list[dict[str, Any]] = []

    async def listen() -> None:
        # In process (httpx's ASGITransport) the body arrives when the stream ends: the
        # window only has to outlast the run. Streaming over a socket is `test_cli`'s and
        # the SSE fault test's.
        async with client.stream(
            "GET",
            f"/api/cases/{case_id}/events",
            params={"seconds": 8},
            headers={"Last-Event-ID": backlog[-1]["id"]},
        ) as stream:
            buffer = ""
            async for chunk in stream.aiter_text():
                buffer += chunk
                *frames, buffer = buffer.split("\n\n")
                seen.extend(parse_sse("\n\n".join(frames)))
                if any(e["event"] == "run_completed" for e in seen):
                    return

    listener = asyncio.ensure_future(listen())
    await asyncio.sleep(0.3)
    await post(client, case_id, INVOICE)
    await asyncio.wait_for(listener, 30)
    assert seen[0]["event"] == "run_queued" and seen[-1]["event"] == "run_completed"


def escalated(case_id: str) -> dict[str, Any]:
    """case_8842 with a refund above the review threshold."""
    case = demo_case(case_id)
    for transaction in case["transactions"]:
        transaction["amount"] = 900.0
    return case


async def test_an_interrupt_ends_a_run_paused_for_review_and_its_run_asks_again(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, reviewer: dict[str, str]
) -> None:
    assert (await submitted(client, runtime, escalated(case_id)))["status"] == "awaiting_review"
    await answered(client, runtime, case_id, INVOICE, "interrupt")
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["interrupted", "awaiting_review"]
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "awaiting_review" and case["review"] is None
    decided = await client.post(
        f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
    )
    assert decided.status_code in (200, 202), decided.text
    assert [r["status"] for r in await until_idle(runtime, client, case_id)] == [
        "interrupted",
        "completed",
    ]


async def test_a_decision_for_a_run_a_follow_up_stopped_is_refused_and_the_queue_runs(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, reviewer: dict[str, str]
) -> None:
    assert (await submitted(client, runtime, escalated(case_id)))["status"] == "awaiting_review"
    # Another runner holds the case: the follow-up is queued and asks the paused run to stop.
    held = await runtime.store.lock(run_lock_name(case_id), ttl_ms=60_000)
    try:
        queued_run = await post(client, case_id, INVOICE, "rollback")
        assert queued_run.status_code == 202, queued_run.text
    finally:
        await runtime.store.unlock(held)
    decided = await client.post(
        f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
    )
    assert decided.status_code == 409, decided.text
    assert "stopped by follow-up" in decided.json()["error"]
    # The refused decision held the case meanwhile: it runs the queue the follow-up left to
    # it as it lets go (not the timer).
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["rolled_back", "awaiting_review"]
    assert customer_messages(await conversation(runtime, case_id)) == [INVOICE]


async def test_a_rollback_sets_the_record_back_to_the_state_before_the_run(
    client: httpx.AsyncClient,
    runtime: Runtime,
    gate: StepGate,
    case_id: str,
    reviewer: dict[str, str],
) -> None:
    assert (await submitted(client, runtime, escalated(case_id)))["status"] == "awaiting_review"
    # The decision's run (the intake run, resumed) is held after its refund went out.
    gate.hold("refund")
    decided = await client.post(
        f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
    )
    assert decided.status_code == 202, decided.text
    await asyncio.wait_for(gate.reached["refund"].wait(), 30)
    assert (await post(client, case_id, THANKS, "rollback")).status_code == 202
    gate.open()
    runs = await until_idle(runtime, client, case_id)
    assert [r["status"] for r in runs] == ["rolled_back", "awaiting_review"]
    assert {e["kind"] for e in runs[0]["discarded_effects"]} == {"refund", "reset_link"}
    # The approval belonged to the discarded run: the record no longer shows it, and the
    # new run asks for a review of its own.
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "awaiting_review"
    assert case["review"] is None
    assert case["awaiting_review"]["refund_amount"] == case["policy"]["refund_amount"]
    # Rejected this time: the refund the discarded run issued still went out, once, and
    # the case says so rather than "refused".
    issued = {e["kind"]: e for e in runs[0]["discarded_effects"]}["refund"]["result"]
    rejected = await client.post(
        f"/api/cases/{case_id}/review", json={"decision": "reject"}, headers=reviewer
    )
    assert rejected.status_code in (200, 202), rejected.text
    await until_idle(runtime, client, case_id)
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "completed"
    assert case["review"]["decision"] == "reject"
    assert case["refund"]["status"] == "issued"
    assert case["refund"]["reference"] == issued["reference"]
    assert issued["reference"] in case["final_response"]
    assert len(await provider_calls(runtime, case_id, "refund")) == 1


async def test_only_a_new_cases_first_run_seeds_its_fence_unread(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first run of a case just created vouches for the record's fence (no runner
    can have raised it above the run's); a follow-up's run marked the record itself, and a
    cold-tier lease claimed since could be above its token: its seed reads the record."""
    saver = runtime.service._saver
    assert saver is not None
    seeded: list[bool] = []
    seed = saver.aseed_fence

    async def recorded(thread_id: str, fence: int, *, record_checked: bool = False) -> None:
        if thread_id == case_id:
            seeded.append(record_checked)
        await seed(thread_id, fence, record_checked=record_checked)

    monkeypatch.setattr(saver, "aseed_fence", recorded)
    await submitted(client, runtime, demo_case(case_id))
    response = await post(client, case_id, INVOICE)
    assert response.status_code in (200, 202), response.text
    runs = await until_idle(runtime, client, case_id)
    assert [run["status"] for run in runs] == ["completed", "completed"]
    assert seeded == [True, False]
